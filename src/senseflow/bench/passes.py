"""Network passes per training iteration: counted by instrumentation, next to each method's minimum.

A *pass* is one call of a network's backbone (the teacher's CFG runs the conditional and
unconditional halves as ONE batched call, so it is one pass).  Kinds:

* ``forward_grad`` -- a forward that builds an autograd graph (its output requires grad);
* ``forward_nograd`` -- a forward without one (teacher / fake predictions in DMD2, no-grad G samples);
* ``backward`` -- a backward through that network (counted by a hook on the forward's output, so a
  backward that reaches a frozen network -- SiD's teacher -- counts too);
* ``rollouts`` / ``rollout_forwards`` -- backward-simulation rollouts of G
  (:meth:`FewStepGenerator.simulate`: ``k`` no-grad steps, ``k`` drawn per rollout) and the
  forwards inside them; these forwards are NOT in ``generator/forward_nograd``.  The minimum
  fixes the number of rollouts; their forwards must equal the steps those rollouts asked for.

:data:`MINIMUM` is written from /work/shared/ALGORITHMS.md (section named next to each entry);
:func:`count_passes` runs real iterations through the trainer with hooks on the networks.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, Iterator

import torch
from torch import nn

NETWORKS: tuple[str, ...] = ("generator", "teacher", "fake_score", "discriminator")
KINDS: tuple[str, ...] = ("forward_grad", "forward_nograd", "backward")

# Minimum passes per iteration, by method and iteration type ("generator": an iteration with a G
# step, "fake": one without), with the adversarial term off.  Keys "network/kind"; absent = 0.
_DMD2_G = {  # ALGORITHMS.md "DMD2": G loss = G forward (grad) on a backward-simulated input, teacher
    # (guidance) and fake score without grad; fake-score loss on sg(G samples) -- the same sample
    # (the released DMD2 trains the guidance turn on generator_turn's detached image).
    "generator/rollouts": 1, "generator/forward_grad": 1, "generator/backward": 1,
    "teacher/forward_nograd": 1, "fake_score/forward_nograd": 1,
    "fake_score/forward_grad": 1, "fake_score/backward": 1,
}
_DMD2_FAKE = {  # ALGORITHMS.md "DMD2" / TTUR: the fake score updates every iteration on a no-grad G sample
    "generator/rollouts": 1, "generator/forward_nograd": 1,
    "fake_score/forward_grad": 1, "fake_score/backward": 1,
}
MINIMUM: dict[str, dict[str, dict[str, int]]] = {
    "dmd2": {"generator": _DMD2_G, "fake": _DMD2_FAKE},
    # ALGORITHMS.md "SenseFlow additions / ISG": + one teacher Euler step (no grad) and one G step
    # (no grad) for the ISG target; x_hat reuses G's own forward.  IDA is a parameter update (no pass).
    "senseflow": {"generator": {**_DMD2_G, "teacher/forward_nograd": 2, "generator/forward_nograd": 1},
                  "fake": _DMD2_FAKE},
    # ALGORITHMS.md "SiD-DiT": one fake update (on sg(x_g) of a k-step rollout: k-1 no-grad steps + the
    # last without grad), then one G update (rollout, last step with grad; teacher and fake forwards
    # with gradients flowing through both into x_g).  Each update draws its own rollout, as the
    # released training loop does (ml-sid-dit training/sid_dit_training_loop.py); sharing one would
    # keep G's graph alive through the fake update.
    "sid": {"generator": {
        "generator/rollouts": 2, "generator/forward_nograd": 1, "generator/forward_grad": 1,
        "generator/backward": 1, "fake_score/forward_grad": 2, "fake_score/backward": 2,
        "teacher/forward_grad": 1, "teacher/backward": 1}},
}


def iteration_kind(phases: list[str]) -> str:
    return "generator" if "generator" in phases else "fake"


def minimum(method: str, phases: list[str], extra_terms: bool = False) -> dict[str, int] | None:
    """The minimum passes of one iteration running ``phases``; ``None`` where none is tabulated
    (a discriminator phase, or ``extra_terms`` -- e.g. a GAN head on the fake score: the
    adversarial variants are not in the table)."""
    table = MINIMUM.get(method)
    if table is None or extra_terms or "discriminator" in phases:
        return None
    kind = iteration_kind(phases)
    return dict(table.get(kind, table.get("generator")))


def _first_grad_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out if out.requires_grad else None
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    for v in values:
        t = _first_grad_tensor(v)
        if t is not None:
            return t
    return None


class PassCounter:
    """Counts passes of named networks (forward hooks; a hook on each graph-building output for backward)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._rollout_depth = 0

    @contextlib.contextmanager
    def installed(self, nets: dict[str, nn.Module], generator: Any = None) -> Iterator["PassCounter"]:
        """Hook ``nets`` (name -> module); with ``generator`` (a :class:`FewStepGenerator`) also
        wrap its ``simulate`` so that rollout forwards are told apart."""
        handles = []
        for name, net in nets.items():
            handles.append(net.register_forward_hook(self._post(name), always_call=True))
        if generator is not None:
            orig = generator.simulate

            def simulate(noise, cond, k, rng):
                self.counts["generator/rollouts"] += 1
                self.counts["generator/rollout_steps"] += int(k)
                self._rollout_depth += 1
                try:
                    return orig(noise, cond, k, rng)
                finally:
                    self._rollout_depth -= 1
            generator.simulate = simulate
        try:
            yield self
        finally:
            if generator is not None:
                del generator.simulate
            for h in handles:
                h.remove()

    def _post(self, name: str):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if name == "generator" and self._rollout_depth:
                self.counts["generator/rollout_forwards"] += 1
                return
            t = _first_grad_tensor(out) if torch.is_grad_enabled() else None
            if t is None:
                self.counts[f"{name}/forward_nograd"] += 1
                return
            self.counts[f"{name}/forward_grad"] += 1

            def on_backward(grad: torch.Tensor) -> None:
                self.counts[f"{name}/backward"] += 1
            t.register_hook(on_backward)
        return hook

    def take(self) -> dict[str, int]:
        out = dict(self.counts)
        self.counts.clear()
        return out


def networks_of(models: Any) -> dict[str, nn.Module]:
    nets: dict[str, nn.Module] = {"teacher": models.teacher.backbone, "generator": models.generator.denoiser.backbone}
    if models.fake_score is not None:
        nets["fake_score"] = models.fake_score.backbone
    if models.discriminator is not None:
        nets["discriminator"] = models.discriminator
    return nets


def count_passes(trainer: Any, batch: Any, iterations: int) -> list[dict[str, Any]]:
    """Run ``iterations`` training iterations (as ``Trainer.fit`` does) and count each one's passes.

    Returns one record per iteration: ``phases``, ``counted`` and ``minimum`` (``None`` if not tabulated).
    """
    method = trainer.method
    extra = getattr(method, "gan", None) is not None  # a GAN head adds fake-score passes (not tabulated)
    counter = PassCounter()
    records = []
    with counter.installed(networks_of(method.models), method.models.generator):
        for _ in range(iterations):
            phases = method.phases(trainer.step)
            for phase in phases:
                trainer.run_phase(phase, batch)
            trainer.step += 1
            counted = counter.take()
            records.append({"phases": phases, "counted": counted, "minimum": minimum(method.name, phases, extra)})
    return records


def excess(record: dict[str, Any]) -> dict[str, int]:
    """Counted minus minimum for every key (0 everywhere when the iteration did no wasted pass).

    Rollout forwards are checked against the steps the rollouts asked for."""
    counted, mins = record["counted"], record["minimum"] or {}
    keys = {f"{n}/{k}" for n in NETWORKS for k in KINDS} | {"generator/rollouts"}
    out = {k: counted.get(k, 0) - mins.get(k, 0) for k in sorted(keys)}
    out["generator/rollout_forwards"] = counted.get("generator/rollout_forwards", 0) - counted.get(
        "generator/rollout_steps", 0)
    return out


def format_passes(method: str, records: list[dict[str, Any]]) -> str:
    """Per iteration type: counted passes (mean per iteration) next to the minimum."""
    lines = [f"  network passes per iteration ({method}; counted by hooks / minimum from ALGORITHMS.md)"]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_kind.setdefault(iteration_kind(r["phases"]), []).append(r)
    for kind, recs in by_kind.items():
        mins = recs[0]["minimum"]
        n = len(recs)
        lines.append(f"    {kind} iterations ({n}): phases {'+'.join(recs[0]['phases'])}")
        for net in NETWORKS:
            cells = []
            for k in KINDS + (("rollouts",) if net == "generator" else ()):
                key = f"{net}/{k}"
                c = sum(r["counted"].get(key, 0) for r in recs) / n
                m = None if mins is None else mins.get(key, 0)
                if c or m:
                    cells.append(f"{k} {c:g}" + ("" if m is None else f" (min {m})"))
            if net == "generator":
                rf = sum(r["counted"].get("generator/rollout_forwards", 0) for r in recs) / n
                steps = sum(r["counted"].get("generator/rollout_steps", 0) for r in recs) / n
                if rf or steps:
                    cells.append(f"rollout_forwards {rf:g} (min {steps:g} = steps drawn)")
            if cells:
                lines.append(f"      {net:<13} " + ", ".join(cells))
        wasted = sum(max(0, v) for r in recs for v in excess(r).values()) if mins is not None else None
        lines.append(f"      passes beyond the minimum: {'n/a (not tabulated)' if wasted is None else wasted}")
    return "\n".join(lines)


__all__ = ["KINDS", "MINIMUM", "NETWORKS", "PassCounter", "count_passes", "excess", "format_passes", "minimum"]
