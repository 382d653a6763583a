"""One-factor-at-a-time study of what limits students on the Gaussian-mixture ground truth (docs/ground_truth.md).

Each variant is the baseline RunSpec with ONE change; results are appended to ``<out>/factors.jsonl``
as they finish (a stopped sweep keeps what it measured) and ``<out>/factors.md`` is rewritten
from everything in that file.

    OMP_NUM_THREADS=1 python benchmarks/gmm_factors.py --variants senseflow-4,dmd2-4-ttur10 --seeds 0
    python benchmarks/gmm_factors.py --list
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

from torch import Tensor
from tqdm.auto import tqdm

from senseflow.toy.gmm.bench import load_or_fit_teacher
from senseflow.toy.gmm.mixture import GaussianMixture
from senseflow.toy.gmm.run import EvalSet, RunSpec, distil
from senseflow.toy.gmm.teacher import GMMAdapter, VelocityMLP

#: name -> (method, steps, changes to RunSpec).  Baselines are the toy recipes without CFG, distilling the MLP
#: teacher (RunSpec default; `senseflow toy gmm` defaults to the exact one, = the `*-exactteacher` variants).
VARIANTS: dict[str, tuple[str, int, dict[str, Any]]] = {}


def _v(name: str, method: str, steps: int, **changes: Any) -> None:
    VARIANTS[name] = (method, steps, changes)


for m in ("senseflow", "dmd2", "sid"):
    for k in (1, 4):
        _v(f"{m}-{k}", m, k)
        _v(f"{m}-{k}-ema", m, k, ema_decay=0.99)
        _v(f"{m}-{k}-ema0.999", m, k, ema_decay=0.999)
        _v(f"{m}-{k}-lr3e-4", m, k, lr_g=3e-4, lr_fake=3e-4)
        _v(f"{m}-{k}-lr1e-3", m, k, lr_g=1e-3, lr_fake=1e-3)
        _v(f"{m}-{k}-fakelr3x", m, k, lr_fake=3e-4)
        _v(f"{m}-{k}-b1024", m, k, batch_size=1024)
        _v(f"{m}-{k}-it4000", m, k, iterations=4000)
        _v(f"{m}-{k}-exactteacher", m, k, teacher="exact")
        _v(f"{m}-{k}-real", m, k, real_data=True)
for m in ("senseflow", "dmd2"):
    for k in (1, 4):
        _v(f"{m}-{k}-ttur1", m, k, method_overrides={"ttur": 1})
        _v(f"{m}-{k}-ttur10", m, k, method_overrides={"ttur": 10})
        _v(f"{m}-{k}-dmdtime-teacher", m, k, method_overrides={"dmd_time": {"kind": "teacher"}})
        _v(f"{m}-{k}-dmdtime-high", m, k, method_overrides={"dmd_time": {"kind": "uniform", "low": 0.2, "high": 0.98}})
        _v(f"{m}-{k}-faketime-uniform", m, k,
           method_overrides={"fake_time": {"kind": "uniform", "low": 0.02, "high": 0.98}})
        _v(f"{m}-{k}-backward0", m, k, real_data=True, method_overrides={"backward_probability": 0.0})
        _v(f"{m}-{k}-cfg2", m, k, method_overrides={"real_guidance": {"cfg": 2.0}})
_v("senseflow-4-noida", "senseflow", 4, method_overrides={"ida": False})
_v("senseflow-4-noisg", "senseflow", 4, method_overrides={"isg_weight": 0.0})
for w in (1.0, 2.0, 4.0):  # ISG is what holds SenseFlow's mode weights: does more of it hold them tighter?
    for k in (1, 4):
        _v(f"senseflow-{k}-isg{w:g}", "senseflow", k, method_overrides={"isg_weight": w})
        _v(f"senseflow-{k}-isg{w:g}-ema", "senseflow", k, ema_decay=0.99, method_overrides={"isg_weight": w})
for m in ("senseflow", "dmd2", "sid"):
    for k in (1, 4):
        _v(f"{m}-{k}-lrg3e-5-ema", m, k, lr_g=3e-5, ema_decay=0.99)  # a slower G against the same fake score
_v("senseflow-1-noida", "senseflow", 1, method_overrides={"ida": False})
_v("senseflow-1-tin0.3-noisg", "senseflow", 1, generator_input_time=0.3, method_overrides={"isg_weight": 0.0})
_v("senseflow-1-tin0.3-noida", "senseflow", 1, generator_input_time=0.3, method_overrides={"ida": False})
_v("dmd2-1-lr1e-3-it3000", "dmd2", 1, lr_g=1e-3, lr_fake=1e-3, iterations=3000)
# 1 step: G queried at an earlier time with the noise scaled to it (SiD's sigma_init; first_input_time)
GAN = {"gan_head": {"enabled": True}}
GAN10 = {"gan_head": {"enabled": True, "generator_weight": 5e-2, "classifier_weight": 1e-1}}  # 10x the released weights
for m in ("senseflow", "dmd2", "sid"):
    for tin in (0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 0.85):
        _v(f"{m}-1-tin{tin}", m, 1, generator_input_time=tin)
        _v(f"{m}-1-tin{tin}-lr1e-3", m, 1, generator_input_time=tin, lr_g=1e-3, lr_fake=1e-3)
for m in ("senseflow", "dmd2"):
    for k in (1, 4):
        # DMD2's GAN head on the fake score, real samples from the mixture (free here)
        _v(f"{m}-{k}-gan", m, k, real_data=True, method_overrides=GAN)
        _v(f"{m}-{k}-gan10", m, k, real_data=True, method_overrides=GAN10)
    _v(f"{m}-1-gan-lr1e-3", m, 1, real_data=True, lr_g=1e-3, lr_fake=1e-3, method_overrides=GAN)
    for tin in (0.2, 0.3, 0.7):
        _v(f"{m}-1-tin{tin}-gan", m, 1, real_data=True, generator_input_time=tin, method_overrides=GAN)
        _v(f"{m}-1-tin{tin}-gan10", m, 1, real_data=True, generator_input_time=tin, method_overrides=GAN10)
    for k in (1, 4):
        _v(f"{m}-{k}-gan10-ema", m, k, real_data=True, ema_decay=0.99, method_overrides=GAN10)
        _v(f"{m}-{k}-ttur10-ema", m, k, ema_decay=0.99, method_overrides={"ttur": 10})
        _v(f"{m}-{k}-b1024-ema", m, k, batch_size=1024, ema_decay=0.99)
# 4 steps: the first anchor's prediction is a 1-step sample too (backward simulation trains it): query it earlier
for m in ("senseflow", "dmd2", "sid"):
    for tin in (0.3, 0.5, 0.85):
        _v(f"{m}-4-tin{tin}-ema", m, 4, generator_input_time=tin, ema_decay=0.99)
# 4 steps: a last anchor nearer the data (the last step denoises from t = 0.1 instead of 0.25)
for m in ("senseflow", "dmd2"):
    _v(f"{m}-4-anchlow-ema", m, 4, anchors=(1.0, 0.6, 0.3, 0.1), ema_decay=0.99)
    _v(f"{m}-4-tin0.85-anchlow-ema", m, 4, anchors=(1.0, 0.6, 0.3, 0.1), generator_input_time=0.85, ema_decay=0.99)
# 4 steps: the student is too wide along each mode's narrowest axes and too tight along its widest
# (--mode-shape).  Structure at the 0.05-0.15 scale of the components is resolved by the DMD gradient mainly
# at low noise (t <~ 0.15), which a uniform 0.02-0.98 DMD time reaches one draw in ten:
# put the DMD time (and the fake score's) at low noise
LOW = {"kind": "uniform", "low": 0.02, "high": 0.3}
for m in ("senseflow", "dmd2"):
    T85 = {"generator_input_time": 0.85, "ema_decay": 0.99}
    _v(f"{m}-4-tin0.85-dmdlow-ema", m, 4, **T85, method_overrides={"dmd_time": LOW})
    _v(f"{m}-4-tin0.85-dmdlow-fakelow-ema", m, 4, **T85, method_overrides={"dmd_time": LOW, "fake_time": LOW})
    _v(f"{m}-4-tin0.85-lrg3e-4-ema", m, 4, **T85, lr_g=3e-4)  # the 1-step student's faster G, at 4 steps
    _v(f"{m}-4-tin0.85-ttur1-ema", m, 4, **T85, method_overrides={"ttur": 1})  # and its G update every iteration
    # the 1-step lever on the first anchor: half the 4-step outliers are trails between modes, decided early
    _v(f"{m}-4-tin0.85-reg4-ema", m, 4, **T85, regression_weight=4.0)
    # is the real score (the MLP backbone, itself too tight along the wide axes) what holds precision?
    _v(f"{m}-4-tin0.85-exactteacher-ema", m, 4, **T85, teacher="exact")
    # fake-score lag: twice the fake-score updates per G update (compare at equal G updates: 2x the iterations)
    _v(f"{m}-4-tin0.85-ttur10-ema", m, 4, **T85, method_overrides={"ttur": 10})
    _v(f"{m}-4-tin0.85-ttur20-ema", m, 4, **T85, method_overrides={"ttur": 20})
    # the sampler: deterministic Euler steps between anchors, in training (backward simulation) and evaluation
    _v(f"{m}-4-tin0.85-euler-ema", m, 4, **T85, sampler="euler")
    _v(f"{m}-4-euler-ema", m, 4, ema_decay=0.99, sampler="euler")
    _v(f"{m}-4-tin0.85-dmdlogn-ema", m, 4, **T85, method_overrides={
        "dmd_time": {"kind": "logit_normal", "mean": -1.0, "std": 1.0, "low": 0.02, "high": 0.98}})
# 4 steps: every anchor's x0 output is scored by DMD and trains the fake score, so the fake score models a mixture
# of the four anchors' outputs and the last anchor may compensate for the earlier ones (the 4-step students' mode
# centres sit 0.13-0.22 from the true means, the 1-step students' 0.07): train the last anchor only
for m in ("senseflow", "dmd2"):
    _v(f"{m}-4-last-ema", m, 4, ema_decay=0.99, trained_anchors=(3,))
    _v(f"{m}-4-tin0.85-last-ema", m, 4, generator_input_time=0.85, ema_decay=0.99, trained_anchors=(3,))
    _v(f"{m}-4-last2-ema", m, 4, ema_decay=0.99, trained_anchors=(2, 3))
# ... or keep every anchor trained and give each its own fake score (AnchorFakeScores; SenseFlow without IDA,
# whose parameter blend pairs one fake score with G)
_v("dmd2-4-fakeperanchor-ema", "dmd2", 4, ema_decay=0.99, fake_per_anchor=True)
_v("dmd2-4-fakeperanchor-ttur20-ema", "dmd2", 4, ema_decay=0.99, fake_per_anchor=True, method_overrides={"ttur": 20})
_v("senseflow-4-noida-fakeperanchor-ema", "senseflow", 4, ema_decay=0.99, fake_per_anchor=True,
   method_overrides={"ida": False})
# a constant lr leaves Adam's jitter in G and in the fake score (the backbone was fitted with a cosine decay to 0)
for m in ("senseflow", "dmd2"):
    _v(f"{m}-4-cosine-ema", m, 4, ema_decay=0.99, lr_schedule="cosine")
    _v(f"{m}-4-tin0.85-cosine-ema", m, 4, generator_input_time=0.85, ema_decay=0.99, lr_schedule="cosine")
_v("senseflow-4-noida-ema", "senseflow", 4, ema_decay=0.99, method_overrides={"ida": False})
_v("dmd2-1-tin0.3-dmdlow", "dmd2", 1, generator_input_time=0.3, method_overrides={"dmd_time": LOW})
_v("dmd2-1-tin0.3-dmdlow-fakelow", "dmd2", 1, generator_input_time=0.3,
   method_overrides={"dmd_time": LOW, "fake_time": LOW})
# DMD (v1)'s regression on teacher ODE pairs next to the DMD loss (toy/gmm/regression.py), 1 step
for m in ("senseflow", "dmd2"):
    for w in (0.25, 1.0, 4.0, 20.0, 100.0):
        _v(f"{m}-1-tin0.3-reg{w:g}", m, 1, generator_input_time=0.3, regression_weight=w)
        _v(f"{m}-1-reg{w:g}", m, 1, regression_weight=w)
# the 1-step student with the regression term is bound by its optimisation (docs/ground_truth.md, third session):
# more G updates per iteration (TTUR 1), a faster G, and an EMA of G
REG4 = {"generator_input_time": 0.3, "regression_weight": 4.0}
_v("dmd2-1-tin0.3-reg4-ema", "dmd2", 1, **REG4, ema_decay=0.99)
for ema, etag in ((None, ""), (0.99, "-ema"), (0.999, "-ema0.999")):
    _v(f"dmd2-1-tin0.3-reg4-ttur1{etag}", "dmd2", 1, **REG4, ema_decay=ema, method_overrides={"ttur": 1})
    _v(f"dmd2-1-tin0.3-reg4-lrg3e-4{etag}", "dmd2", 1, **REG4, ema_decay=ema, lr_g=3e-4)
    _v(f"dmd2-1-tin0.3-reg4-dmdlow{etag}", "dmd2", 1, **REG4, ema_decay=ema, method_overrides={"dmd_time": LOW})
    _v(f"dmd2-1-tin0.3-reg4-ttur1-lrg3e-4{etag}", "dmd2", 1, **REG4, ema_decay=ema, lr_g=3e-4,
       method_overrides={"ttur": 1})
# pushed DMD2 (issue #13: 3x generator lr, TTUR 1), with and without IDA at several lambdas
for lr, tag in ((3e-4, "push3"), (1e-3, "push10")):
    _v(f"dmd2-4-{tag}", "dmd2", 4, lr_g=lr, method_overrides={"ttur": 1})
    for lam in (0.9, 0.98, 0.995):
        _v(f"sfida-4-{tag}-lam{lam}", "senseflow", 4, lr_g=lr,
           method_overrides={"ttur": 1, "isg_weight": 0.0, "ida": True, "ida_lambda": lam})


def table(rows: list[dict[str, Any]]) -> str:
    keys = ("precision", "coverage", "mode_tv", "sw2", "recall", "class_acc", "log_density")
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    out = "| variant | seeds | " + " | ".join(keys) + " | s/run |\n|---|---:|" + "---:|" * (len(keys) + 1) + "\n"
    for name, rs in by.items():
        cells = []
        for k in keys:
            vals = [r["final"][k] for r in rs]
            m = statistics.fmean(vals)
            s = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{m:.3f}" + (f" ± {s:.3f}" if s else ""))
        secs = statistics.fmean(r["seconds"] for r in rs)
        out += f"| {name} | {len(rs)} | " + " | ".join(cells) + f" | {secs:.0f} |\n"
        if rs[0].get("final_ema"):
            cells = [f"{statistics.fmean(r['final_ema'][k] for r in rs):.3f}" for k in keys]
            out += f"| {name} (EMA) | {len(rs)} | " + " | ".join(cells) + " | |\n"
    return out


def world(args: argparse.Namespace) -> tuple[GaussianMixture, VelocityMLP, EvalSet]:
    """The study's mixture, its MLP backbone (``--teacher-*``, cached in runs/gmm) and the fixed evaluation draws."""
    mixture = GaussianMixture.random(16, 4, 5, seed=0)
    mlp = load_or_fit_teacher(mixture, "D16_C4_M5_s0", Path("runs/gmm"), args.teacher_width, 3, args.teacher_fit_steps,
                              time_law=args.teacher_law)
    return mixture, mlp, EvalSet.make(mixture, GMMAdapter(mixture), args.eval_samples)


def backbone_tag(args: argparse.Namespace) -> str:
    """The suffix of run names and sample files for a backbone other than the first session's width 128 / 2000 steps."""
    if (args.teacher_width, args.teacher_fit_steps, args.teacher_law) == (128, 2000, "logit_normal"):
        return ""
    return f"-w{args.teacher_width}-s{args.teacher_fit_steps}-{args.teacher_law}"


def saved_samples(out: Path, strip: str) -> dict[str, Tensor]:
    """The final samples in ``out/samples`` (first seed of each variant, raw weights), named by stem less ``strip``."""
    from safetensors.torch import load_file

    return {f.stem.replace(strip, ""): load_file(str(f))["x"] for f in sorted((out / "samples").glob("*.safetensors"))}


def sample_rows(args: argparse.Namespace) -> tuple[GaussianMixture, EvalSet, dict[str, Tensor]]:
    """True samples, the backbone's own Euler 4/8/128 samples and the saved final samples (raw weights, first seed)
    of every folder in the comma-separated ``--out``, on the study's fixed evaluation draws."""
    from senseflow.teachers.base import Guidance
    from senseflow.toy.gmm.run import teacher_samples

    mixture, mlp, ev = world(args)
    rows = {"true samples": ev.reference}
    for n in (4, 8, 128):
        rows[f"backbone, Euler {n}"] = teacher_samples(mixture, mlp, n, ev, Guidance())
    for out in args.out.split(","):
        rows.update(saved_samples(Path(out), backbone_tag(args)))
    return mixture, ev, rows


def mode_shape_table(args: argparse.Namespace) -> str:
    """``metrics.mode_shape`` of :func:`sample_rows`: the per-axis spread inside the ellipsoids, axes ranked
    narrowest first."""
    from senseflow.toy.gmm.metrics import mode_shape

    mixture, ev, rows = sample_rows(args)
    d = mixture.dim
    q = max(1, d // 4)
    text = (f"| samples | precision | narrowest {q} axes | middle {d - 2 * q} | widest {q} |\n"
            "| --- | ---: | ---: | ---: | ---: |\n")
    for name, x in rows.items():
        prof = mode_shape(mixture, x, ev.labels)
        prec = ev.score(mixture, x)["precision"]
        text += (f"| {name} | {prec:.3f} | {float(prof[:q].mean()):.2f} | {float(prof[q:d - q].mean()):.2f} | "
                 f"{float(prof[d - q:].mean()):.2f} |\n")
    return text


def outlier_table(args: argparse.Namespace) -> str:
    """``metrics.outlier_profile`` of :func:`sample_rows`: where the imprecise samples are (near the edge of a
    mode, or stranded between two) and how far the modes' centres sit from the true ones."""
    from senseflow.toy.gmm.metrics import outlier_profile

    mixture, ev, rows = sample_rows(args)
    keys = ("outside", "near", "far", "trail", "centre_offset", "narrow_offset2", "narrow_var")
    text = "| samples | " + " | ".join(keys) + " |\n| --- |" + " ---: |" * len(keys) + "\n"
    for name, x in rows.items():
        prof = outlier_profile(mixture, x, ev.labels)
        text += f"| {name} | " + " | ".join(f"{prof[k]:.3f}" for k in keys) + " |\n"
    return text


def table_at(rows: list[dict[str, Any]], iteration: int) -> str:
    """Mean ± std over seeds at ``iteration`` of each run's history (and its EMA history), one row per variant."""
    keys = ("precision", "coverage", "mode_tv", "recall", "sw2")
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    out = "| variant | seeds | " + " | ".join(keys) + " |\n|---|---:|" + "---:|" * len(keys) + "\n"

    def cell(vals: list[float]) -> str:
        return f"{statistics.fmean(vals):.3f}" + (f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else "")

    for name, rs in by.items():
        for label, hist in (("", "history"), (" (EMA)", "ema_history")):
            points = [h for r in rs for h in r.get(hist, []) if h["iteration"] == iteration]
            if points:
                out += f"| {name}{label} | {len(points)} | " + " | ".join(cell([h[k] for h in points]) for k in keys) \
                    + " |\n"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="senseflow-4,dmd2-4", help="comma-separated variant names (see --list)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--out", default="runs/gmm")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-samples", type=int, default=4000)
    p.add_argument("--teacher-width", type=int, default=128, help="width of the MLP backbone (capacity factor)")
    p.add_argument("--teacher-fit-steps", type=int, default=2000, help="fit steps of the MLP backbone")
    p.add_argument("--teacher-law", default="logit_normal", help="time law of the backbone fit (teacher.fit_times)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--curves", default=None, metavar="PNG",
                   help="train nothing: plot the curves (mean over seeds) of the recorded runs in <out>/factors.jsonl")
    p.add_argument("--mode-shape", action="store_true",
                   help="train nothing: per-axis spread of the saved final samples in <out>/samples (--out: comma-separated "
                        "folders) and of the "
                        "backbone's Euler 4/8/128 samples (metrics.mode_shape), narrowest axes first")
    p.add_argument("--outliers", action="store_true",
                   help="train nothing: where the imprecise samples of --mode-shape's rows lie (metrics.outlier_profile):"
                        " near a mode's edge or stranded between two modes, and the modes' centre offsets")
    p.add_argument("--scatter", default=None, metavar="PNG",
                   help="train nothing: plot the saved final samples in <out>/samples (first seed of each variant)")
    p.add_argument("--table-at", type=int, default=None, metavar="ITERATION",
                   help="train nothing: mean ± std over seeds of the recorded runs in <out>/factors.jsonl at this "
                        "iteration (raw and EMA weights)")
    args = p.parse_args()
    if args.list:
        print("\n".join(VARIANTS))
        return
    if args.table_at is not None:
        recs = [json.loads(line) for line in (Path(args.out) / "factors.jsonl").read_text().splitlines() if line]
        print(table_at(recs, args.table_at))
        return
    if args.mode_shape:
        print(mode_shape_table(args))
        return
    if args.outliers:
        print(outlier_table(args))
        return
    if args.scatter:
        from senseflow.teachers.base import Guidance
        from senseflow.toy.gmm.bench import plot_scatter
        from senseflow.toy.gmm.run import teacher_samples
        mixture, mlp, ev = world(args)
        panels = {"true samples": ev.reference.float()}
        for n in (4, 128):
            panels[f"teacher MLP, Euler {n}"] = teacher_samples(mixture, mlp, n, ev, Guidance())
        panels.update(saved_samples(Path(args.out), backbone_tag(args)))
        plot_scatter(mixture, panels, ev.labels, Path(args.scatter))
        print(f"wrote {args.scatter} ({', '.join(panels)})")
        return
    if args.curves:
        from senseflow.toy.gmm.bench import plot_curves
        recs = [json.loads(line) for line in (Path(args.out) / "factors.jsonl").read_text().splitlines() if line]
        wanted = {v for v in args.variants.split(",") if v}
        if any(r["variant"].split("-w")[0] in wanted for r in recs):  # --variants picks the lines
            recs = [r for r in recs if r["variant"].split("-w")[0] in wanted]
        runs: dict[str, list[dict[str, Any]]] = {}
        for r in recs:
            name = re.sub(r"-w(\d+)-s\d+-\w+$", r" (w\1)", r["variant"])  # "<variant> (w<backbone width>)"
            runs.setdefault(name, []).append(r)
            if r.get("ema_history"):  # the EMA's line beside the raw weights' (it has no iteration-0 point)
                runs.setdefault(f"{name}, EMA", []).append({"history": r["ema_history"]})
        plot_curves(runs, Path(args.curves))
        print(f"wrote {args.curves} ({', '.join(f'{k}: {len(v)} seeds' for k, v in runs.items())})")
        return
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; see --list")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mixture, mlp, ev = world(args)
    tag = backbone_tag(args)
    if tag:  # the capacity factor: how good is the backbone itself?
        from senseflow.teachers.base import Guidance
        from senseflow.toy.gmm.run import teacher_samples
        for n in (4, 128):
            f = ev.score(mixture, teacher_samples(mixture, mlp, n, ev, Guidance()))
            tqdm.write(f"MLP teacher {tag[1:]}, Euler {n}: prec {f['precision']:.3f} "
                       f"cov {f['coverage']:.2f} tv {f['mode_tv']:.3f} sw2 {f['sw2']:.3f}")
    log = out / "factors.jsonl"
    for name, seed in tqdm([(n, s) for n in names for s in seeds], desc="gmm factors", dynamic_ncols=True):
        method, steps, changes = VARIANTS[name]
        spec = RunSpec(method=method, steps=steps, seed=seed, **{"iterations": args.iterations, **changes})
        t0 = time.perf_counter()
        pairs = Path("runs/gmm") / (f"pairs_D16_C4_M5_s0_w{args.teacher_width}_s{args.teacher_fit_steps}_"
                                    f"{args.teacher_law}_{spec.teacher}_n{spec.regression_pairs}_e32.safetensors")
        res = distil(mixture, mlp, spec, ev, eval_every=args.eval_every, pairs_cache=pairs)
        gen = res.pop("generator")
        if seed == seeds[0]:  # the final samples of the first seed, for --scatter
            from safetensors.torch import save_file
            from senseflow.toy.gmm.run import sample_generator
            (out / "samples").mkdir(exist_ok=True)
            save_file({"x": sample_generator(gen, ev).float().contiguous()},
                      str(out / "samples" / f"{name}{tag}_s{seed}.safetensors"))
        if tag:
            name = f"{name}{tag}"
        rec = {"variant": name, "seed": seed, "seconds": time.perf_counter() - t0, **res}
        with open(log, "a") as fh:
            fh.write(json.dumps(rec, default=str) + "\n")
        f = res["final"]
        tqdm.write(f"{name} s{seed}: prec {f['precision']:.3f} cov {f['coverage']:.2f} tv {f['mode_tv']:.3f} "
                   f"sw2 {f['sw2']:.3f} ({rec['seconds']:.0f}s)")
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    (out / "factors.md").write_text(table(rows))
    print(table([r for r in rows if r["variant"] in names]))


if __name__ == "__main__":
    main()
