"""``senseflow demo``: distil the shipped toy teacher on CPU and show what the student gets right.

Steps: (1) sample the teacher at 32 Euler steps with CFG and at 4 Euler steps, (2) distil a
few-step student with the chosen method, evaluating it along the way, (3) write
``metrics.json``, ``grid.png`` (prompts x [teacher 32 | teacher 4 | student]) and ``curves.png``,
and print a short report.  Every number it prints is measured by this run.
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import load_config, opens_positions
from ..images import make_grid, save_png
from ..rng import derive_seed
from ..sampling import sample_ode
from ..teachers.base import Guidance
from ..train.trainer import Trainer, TrainerHooks

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "toy"
STUDENT_ANCHORS = {1: [1.0], 2: [1.0, 0.5], 3: [1.0, 0.667, 0.333], 4: [1.0, 0.75, 0.5, 0.25]}


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


class EvalSet:
    """Fixed prompts x seeds and fixed noise, so every model is judged on identical inputs."""

    def __init__(self, adapter, num_prompts: int, per_prompt: int, seed: int, device: torch.device,
                 open_positions: bool = False) -> None:
        from .world import evaluation_prompts

        base = evaluation_prompts(num_prompts, open_positions=open_positions)
        self.prompts = [p for p in base for _ in range(per_prompt)]
        self.cond = adapter.encode_prompts(self.prompts).to(device)
        g = torch.Generator().manual_seed(derive_seed(seed, "demo-eval-noise"))
        self.noise = torch.randn((len(self.prompts), *adapter.latent_shape()), generator=g).to(device)
        self.seed = seed

    def chunks(self, size: int = 128):
        for i in range(0, len(self.prompts), size):
            yield slice(i, i + size)


class StudentTracker:
    """A ``TrainerHooks.on_step`` hook: scores the student every ``eval_every`` iterations (the curves).

    ``evalset`` and ``reference`` (the teacher's 32-step samples, for ``fd_teacher``) are set once
    the trainer -- and with it the teacher adapter -- exists.
    """

    def __init__(self, evaluator, sampler: str, eval_every: int) -> None:
        self.evaluator, self.sampler, self.eval_every = evaluator, sampler, eval_every
        self.evalset: EvalSet | None = None
        self.reference: torch.Tensor | None = None
        self.curve: list[dict[str, float]] = []

    def __call__(self, trainer: Trainer, step: int) -> None:
        if step % self.eval_every and step != trainer.cfg.steps:
            return
        with trainer.eval_weights():      # the EMA when generator.ema keeps one
            images, _ = sample_student(trainer.method.models.generator, self.evalset, self.sampler)
        m = self.evaluator.evaluate(images, self.evalset.prompts, reference_teacher=self.reference)
        self.curve.append({"iteration": step, **_summary(m, ("attr_acc", "fd_real", "fd_teacher", "diversity")),
                           **{k: v for k, v in trainer.last_logs.items() if k.startswith("loss_")}})


@torch.no_grad()
def sample_teacher(teacher, evalset: EvalSet, steps: int, cfg: float) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    out = [sample_ode(teacher, evalset.noise[sl], evalset.cond[sl], steps, Guidance(cfg=cfg)) for sl in evalset.chunks()]
    images = teacher.adapter.decode(torch.cat(out)).clamp(-1, 1)
    return images, (time.perf_counter() - t0) / len(evalset.prompts)


@torch.no_grad()
def sample_student(generator, evalset: EvalSet, sampler: str = "stochastic") -> tuple[torch.Tensor, float]:
    was = generator.training
    generator.eval()
    g = torch.Generator().manual_seed(derive_seed(evalset.seed, "demo-student-noise"))
    t0 = time.perf_counter()
    out = [generator.sample(evalset.noise[sl], evalset.cond[sl], sampler=sampler, generator=g)
           for sl in evalset.chunks()]
    generator.train(was)
    images = generator.denoiser.adapter.decode(torch.cat(out)).clamp(-1, 1)
    return images, (time.perf_counter() - t0) / len(evalset.prompts)


def _summary(metrics: dict[str, float], keys: Sequence[str]) -> dict[str, float]:
    return {k: round(float(metrics[k]), 5) for k in keys if k in metrics}


def make_comparison_grid(columns: dict[str, torch.Tensor], prompts: list[str], rows: int, scale: int = 4):
    """A labelled grid: one row per prompt, one column per model."""
    import numpy as np
    from PIL import Image, ImageDraw

    names = list(columns)
    tiles = torch.stack([columns[n][:rows] for n in names], dim=1).flatten(0, 1)
    grid = make_grid(tiles, nrow=len(names), pad=4, scale=scale)
    cell = columns[names[0]].shape[-1] * scale + 4
    header, text_w = 18, 460
    canvas = Image.new("RGB", (grid.shape[1] + text_w, grid.shape[0] + header), "white")
    canvas.paste(Image.fromarray(grid), (0, header))
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(names):
        draw.text((4 + j * cell, 3), name, fill="black")
    for i in range(rows):
        lines = textwrap.wrap(prompts[i], width=70)  # long two-shape captions must stay readable, not cut off
        top = header + 4 + i * cell + cell // 2 - 6 * len(lines)
        for k, line in enumerate(lines):
            draw.text((grid.shape[1] + 6, top + 12 * k), line, fill="black")
    return np.asarray(canvas)


def plot_curves(curve: list[dict[str, float]], baselines: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [c["iteration"] for c in curve]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("attr_acc", "fd_real", "fd_teacher"),
                              ("attribute accuracy (higher is better)", "FD vs real images (lower is better)",
                               "FD vs teacher samples (lower is better)")):
        ax.plot(steps, [c.get(key, float("nan")) for c in curve], marker="o", label="student")
        for (name, m), style in zip(baselines.items(), ("--", ":")):
            if key in m:
                ax.axhline(m[key], linestyle=style, color="gray" if style == "--" else "red", label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def run_demo(out: Path, method: str = "senseflow", steps: int = 4, iterations: int | None = None,
             eval_prompts: int = 64, per_prompt: int = 4, eval_every: int = 50, seed: int = 0,
             overrides: Sequence[str] = (), progress: bool = True) -> dict[str, Any]:
    from .. import api
    from .evaluator import ToyEvaluator, paired_gain

    if steps not in STUDENT_ANCHORS:
        raise ValueError(f"--steps must be one of {sorted(STUDENT_ANCHORS)}")
    recipe = RECIPES / f"{method}.yaml"
    out = Path(out)
    sets = [f"paths.output={out / 'run'}", f"generator.anchors={STUDENT_ANCHORS[steps]}", f"train.seed={seed}",
            f"train.progress={str(progress).lower()}"]
    if iterations is not None:
        sets.append(f"train.steps={iterations}")
    config = load_config(recipe, sets + list(overrides))
    out.mkdir(parents=True, exist_ok=True)

    evaluator = ToyEvaluator.load()
    cfg_scale = _teacher_cfg(config)
    tracker = StudentTracker(evaluator, config.generator.sampler, eval_every)
    trainer = api.build_trainer(config, resume="auto", hooks=TrainerHooks(on_step=[tracker]))
    teacher = trainer.method.models.teacher
    # a world with open captions is judged on open prompts: that is where few-step sampling is hard
    open_positions = opens_positions(config.paths.prompts)
    evalset = tracker.evalset = EvalSet(teacher.adapter, eval_prompts, per_prompt, seed, trainer.device,
                                        open_positions=open_positions)

    kind = "open " if open_positions else ""
    print(f"[1/3] teacher baselines on {len(evalset.prompts)} samples ({eval_prompts} {kind}prompts x {per_prompt} "
          f"seeds), CFG {cfg_scale}", flush=True)
    teacher32, spi32 = sample_teacher(teacher, evalset, 32, cfg_scale)
    tracker.reference = teacher32
    teacher4, spi4 = sample_teacher(teacher, evalset, 4, cfg_scale)
    nfe_per_step = 2 if cfg_scale != 1.0 else 1
    m32 = evaluator.evaluate(teacher32, evalset.prompts)
    m4 = evaluator.evaluate(teacher4, evalset.prompts, reference_teacher=teacher32)
    keys = ("attr_acc", "fd_real")
    results: dict[str, Any] = {
        "teacher": {"steps": 32, "nfe": 32 * nfe_per_step, **_summary(m32, keys + ("diversity",)),
                    "seconds_per_image": spi32},
        "teacher_4step": {"steps": 4, "nfe": 4 * nfe_per_step, **_summary(m4, keys + ("fd_teacher", "diversity")),
                          "seconds_per_image": spi4},
    }
    print(f"      teacher 32 steps: attr_acc {m32['attr_acc']:.3f}  fd_real {m32['fd_real']:.2f}", flush=True)
    print(f"      teacher  4 steps: attr_acc {m4['attr_acc']:.3f}  fd_real {m4['fd_real']:.2f}", flush=True)

    print(f"[2/3] distilling a {steps}-step student with {method} for {config.train.steps} iterations", flush=True)
    if trainer.step == 0:
        tracker(trainer, 0)
    t0 = time.perf_counter()
    start_step = trainer.step
    trainer.fit()
    train_seconds = time.perf_counter() - t0
    _export_student(trainer, config, out / "run" / "student")

    print("[3/3] evaluating the student", flush=True)
    with trainer.eval_weights():          # the EMA when generator.ema keeps one
        student_images, spi_student = sample_student(trainer.method.models.generator, evalset,
                                                     config.generator.sampler)
    ms = evaluator.evaluate(student_images, evalset.prompts, reference_teacher=teacher32)
    results["student"] = {"method": method, "steps": steps, "nfe": steps,
                          **_summary(ms, keys + ("fd_teacher", "diversity")), "seconds_per_image": spi_student}
    # "does the student beat the 4-step teacher?" as a measurement: paired on the same prompts and noise
    results["student_vs_teacher_4step"] = {"attr_acc": paired_gain(
        evaluator.checks_per_image(student_images, evalset.prompts),
        evaluator.checks_per_image(teacher4, evalset.prompts), evalset.prompts, seed=seed)}
    results["train_seconds"] = round(train_seconds, 2)
    results["iterations"] = trainer.step - start_step
    results["curve"] = curve = tracker.curve

    rows = min(8, eval_prompts)
    idx = list(range(0, rows * per_prompt, per_prompt))
    grid = make_comparison_grid({"teacher 32 steps": teacher32[idx], "teacher 4 steps": teacher4[idx],
                                 f"student {steps} steps ({method})": student_images[idx]},
                                [evalset.prompts[i] for i in idx], rows)
    save_png(grid, out / "grid.png")
    plot_curves(curve, {"teacher 32 steps": results["teacher"], "teacher 4 steps": results["teacher_4step"]},
                out / "curves.png")
    _write_json_atomic(out / "metrics.json", results)
    print(report(results), flush=True)
    return results


def _export_student(trainer: Trainer, config, folder: Path) -> None:
    """``<out>/run/student/``, as ``senseflow train`` writes it: ``senseflow evaluate / generate --student <out>/run``.

    With ``generator.ema`` both weight sets are written and ``student.safetensors`` holds the served
    set (the EMA by default): the weights the demo's own numbers were measured with.
    """
    from ..export import export_student
    from ..train.ema import export_student_with_ema

    meta = {"family": config.teacher.family, "teacher": config.paths.teacher,
            "resolution": config.teacher.resolution, "sampler": config.generator.sampler,
            "method": config.method.name, "step": trainer.step}
    if trainer.ema is not None:
        export_student_with_ema(trainer, folder, meta)
    else:
        export_student(trainer.method.models.generator, folder, meta)


def _teacher_cfg(config) -> float:
    spec = getattr(config.method, "real_guidance", None) or getattr(config.method, "teacher_guidance", None)
    cfg = spec.cfg if spec is not None else None
    if isinstance(cfg, tuple):
        return float(sum(cfg) / 2)
    return float(cfg) if cfg is not None else 1.0


def report(results: dict[str, Any]) -> str:
    rows = [("teacher (32 steps)", results["teacher"]), ("teacher (4 Euler steps)", results["teacher_4step"]),
            (f"student ({results['student']['method']}, {results['student']['steps']} steps)", results["student"])]
    lines = ["", f"{'model':34s} {'NFE':>4s} {'attr_acc':>9s} {'fd_real':>8s} {'fd_teacher':>10s} {'s/img':>8s}"]
    for name, m in rows:
        fdt = f"{m['fd_teacher']:10.2f}" if "fd_teacher" in m else f"{'-':>10s}"
        lines.append(f"{name:34s} {m['nfe']:4d} {m['attr_acc']:9.3f} {m['fd_real']:8.2f} {fdt} "
                     f"{m['seconds_per_image']:8.4f}")
    versus = results.get("student_vs_teacher_4step", {}).get("attr_acc")
    if versus:
        lo, hi = versus["ci95"]
        lines.append(f"student - teacher (4 Euler steps): attr_acc {versus['gain']:+.3f} "
                     f"(95% interval over the {versus['num_prompts']} prompts: {lo:+.3f} .. {hi:+.3f})")
    lines.append(f"training: {results['iterations']} iterations in {results['train_seconds']:.0f} s")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory (metrics.json, grid.png, curves.png, run/)")
    p.add_argument("--method", default="senseflow", choices=["senseflow", "dmd2", "sid", "senseflow_vfm"])
    p.add_argument("--steps", type=int, default=4, choices=sorted(STUDENT_ANCHORS), help="student sampling steps")
    p.add_argument("--iterations", type=int, default=None, help="training iterations (default: the recipe's)")
    p.add_argument("--eval-prompts", type=int, default=64, help="evaluation prompts (x 4 seeds)")
    p.add_argument("--eval-every", type=int, default=50, help="evaluate the student every N iterations (curves)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe value (repeatable)")


def run_from_args(args: argparse.Namespace) -> int:
    run_demo(Path(args.out), args.method, args.steps, args.iterations, args.eval_prompts, eval_every=args.eval_every,
             seed=args.seed, overrides=args.set or [])
    return 0
