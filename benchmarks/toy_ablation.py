"""The miniature ablation in the toy world (docs/toy.md, "Ablation").

Which parts of SenseFlow matter, measured on the shipped toy teacher:

    .venv/bin/python benchmarks/toy_ablation.py run --out runs/ablation --jobs 2
    .venv/bin/python benchmarks/toy_ablation.py report --out runs/ablation

``run`` first samples the teacher (1 / 2 / 4 / 8 / 32 Euler steps with CFG) on a fixed evaluation set, then
trains every variant x seed in its own single-threaded process (``--jobs`` at a time), scoring the
student every ``--eval-every`` iterations on the same evaluation set.  Each run writes
``<out>/<variant>/seed<k>.json`` atomically, so an interrupted ablation resumes where it stopped
(finished runs are skipped).  ``report`` prints the table (mean +- std over seeds of the final
scores, the best score along the curve and the drop from it: a stability figure) and writes
``table.md`` and ``curves.png``.

Every variant is a shipped toy recipe plus ``--set`` overrides, listed in ``VARIANTS``; the
evaluation set is the same for every run (its seed is fixed), the training seed varies.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

EVAL_SEED = 0


@dataclass(frozen=True)
class Variant:
    recipe: str
    steps: int
    label: str
    overrides: tuple[str, ...] = field(default_factory=tuple)


# The "pushed" pair tests the paper's stability claim: a generator learning rate 3x the recipe's
# and TTUR 1 (one fake-score update per generator update instead of 5), with and without IDA.
PUSHED = ("optim.generator.lr=3.0e-4", "method.ttur=1")
VARIANTS: dict[str, Variant] = {
    "dmd2": Variant("dmd2", 4, "DMD2 (TTUR 5)"),
    "dmd2_ida": Variant("senseflow", 4, "DMD2 + IDA", ("method.isg_weight=0.0",)),
    "dmd2_gan": Variant("dmd2", 4, "DMD2 + its GAN head (G 5e-3, D 1e-2)", ("method.gan_head.enabled=true",)),
    "senseflow": Variant("senseflow", 4, "DMD2 + IDA + ISG (SenseFlow)"),
    "senseflow_vfm": Variant("senseflow_vfm", 4, "SenseFlow + VFM discriminator"),
    "sid": Variant("sid", 4, "SiD (data-free)"),
    "senseflow_2step": Variant("senseflow", 2, "SenseFlow, 2 steps"),
    "senseflow_1step": Variant("senseflow", 1, "SenseFlow, 1 step"),
    "dmd2_pushed": Variant("dmd2", 4, "DMD2 pushed (lr_G 3e-4, TTUR 1)", PUSHED),
    "dmd2_ida_pushed": Variant("senseflow", 4, "DMD2 + IDA pushed (lr_G 3e-4, TTUR 1)",
                               PUSHED + ("method.isg_weight=0.0",)),
}
TEACHER_STEPS = (1, 2, 4, 8, 32)


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _common_sets(args: argparse.Namespace) -> list[str]:
    # every variant is judged on its raw weights, as in the tables of docs/toy.md, even if a recipe keeps an EMA
    sets = ["generator.ema=null"] + ([f"paths.teacher={args.teacher}"] if args.teacher else [])
    return sets + ([f"paths.prompts={args.prompts}"] if args.prompts else [])


# -- one run (a subprocess) ----------------------------------------------------------------------
def run_one(args: argparse.Namespace) -> None:
    from safetensors.torch import load_file

    from senseflow import api
    from senseflow.config import load_config, opens_positions
    from senseflow.toy.demo import RECIPES, STUDENT_ANCHORS, EvalSet, StudentTracker
    from senseflow.toy.evaluator import ToyEvaluator
    from senseflow.train.trainer import TrainerHooks

    variant = VARIANTS[args.variant]
    out = Path(args.out)
    run_dir = out / "train" / args.variant / f"seed{args.seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a run that died before writing its result starts over
    sets = [f"paths.output={run_dir}",
            f"generator.anchors={STUDENT_ANCHORS[variant.steps]}", f"train.seed={args.seed}",
            f"train.steps={args.iterations}", "train.progress=false",
            *_common_sets(args), *variant.overrides]
    config = load_config(RECIPES / f"{variant.recipe}.yaml", sets)
    tracker = StudentTracker(ToyEvaluator.load(), config.generator.sampler, args.eval_every)
    trainer = api.build_trainer(config, resume="never", hooks=TrainerHooks(on_step=[tracker]))
    tracker.evalset = EvalSet(trainer.method.models.teacher.adapter, args.eval_prompts, args.per_prompt, EVAL_SEED,
                              trainer.device, open_positions=opens_positions(config.paths.prompts))
    tracker.reference = load_file(str(out / "teacher32.safetensors"))["images"]
    tracker(trainer, 0)
    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0
    _write_json(out / args.variant / f"seed{args.seed}.json",
                {"variant": args.variant, "label": variant.label, "recipe": variant.recipe, "steps": variant.steps,
                 "overrides": list(variant.overrides), "seed": args.seed, "iterations": args.iterations,
                 "train_seconds": round(seconds, 1), "final": tracker.curve[-1], "curve": tracker.curve})


# -- the whole ablation --------------------------------------------------------------------------
@torch.no_grad()
def teacher_baselines(args: argparse.Namespace) -> None:
    """Teacher at 1 / 2 / 4 / 8 / 32 Euler steps (CFG of the recipes) on the evaluation set; keeps the 32-step samples."""
    from safetensors.torch import save_file

    from senseflow.config import load_config, opens_positions
    from senseflow.toy.demo import RECIPES, EvalSet, sample_teacher
    from senseflow.teachers.base import Denoiser
    from senseflow.toy.evaluator import ToyEvaluator
    from senseflow.toy.teacher import TEACHER_ASSET, load_toy_teacher

    out = Path(args.out)
    if (out / "teacher.json").is_file():
        return
    adapter, backbone = load_toy_teacher(args.teacher or TEACHER_ASSET)
    teacher = Denoiser(backbone.eval(), adapter)
    evaluator = ToyEvaluator.load()
    # the prompts the recipes train on decide the evaluation set (open captions -> open prompts), as in the demo
    open_prompts = opens_positions(load_config(RECIPES / "senseflow.yaml", _common_sets(args)).paths.prompts)
    evalset = EvalSet(adapter, args.eval_prompts, args.per_prompt, EVAL_SEED, torch.device("cpu"),
                      open_positions=open_prompts)
    samples = {steps: sample_teacher(teacher, evalset, steps, args.cfg) for steps in TEACHER_STEPS}
    ref = samples[32][0]
    rows = {}
    for steps, (images, spi) in samples.items():
        m = evaluator.evaluate(images, evalset.prompts, reference_teacher=None if steps == 32 else ref)
        rows[steps] = {"steps": steps, "nfe": 2 * steps, "cfg": args.cfg, "open_prompts": open_prompts,
                       "seconds_per_image": round(spi, 4),
                       **{k: round(float(m[k]), 4) for k in ("attr_acc", "fd_real", "fd_teacher", "diversity")
                          if k in m}}
        print(f"teacher {steps:2d} steps: {rows[steps]}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".teacher32.safetensors.tmp"
    save_file({"images": ref.contiguous()}, str(tmp))
    os.replace(tmp, out / "teacher32.safetensors")
    _write_json(out / "teacher.json", rows)


def run_all(args: argparse.Namespace) -> None:
    teacher_baselines(args)
    out = Path(args.out)
    todo = [(v, s) for v in (args.only or list(VARIANTS)) for s in args.seeds
            if not (out / v / f"seed{s}.json").is_file()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    print(f"{len(todo)} runs to do ({args.jobs} at a time, {args.iterations} iterations each)", flush=True)

    def launch(job: tuple[str, int]) -> tuple[str, int, int, float]:
        variant, seed = job
        cmd = [sys.executable, __file__, "one", "--out", args.out, "--variant", variant, "--seed", str(seed),
               "--iterations", str(args.iterations), "--eval-every", str(args.eval_every),
               "--eval-prompts", str(args.eval_prompts), "--per-prompt", str(args.per_prompt)]
        if args.teacher:
            cmd += ["--teacher", args.teacher]
        if args.prompts:
            cmd += ["--prompts", args.prompts]
        log = out / "logs" / f"{variant}_seed{seed}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(log, "w") as fh:
            rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        return variant, seed, rc, time.perf_counter() - t0

    failed = 0
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for variant, seed, rc, secs in pool.map(launch, todo):
            status = "ok" if rc == 0 else f"FAILED (rc {rc}, see {out}/logs/{variant}_seed{seed}.log)"
            failed += rc != 0
            print(f"{variant:18s} seed {seed}: {status} in {secs:.0f} s", flush=True)
    report(args)
    if failed:
        raise SystemExit(1)


# -- the report ----------------------------------------------------------------------------------
def _stats(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} +- {sd:.3f}"


def _load_runs(out: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for name in VARIANTS:
        files = sorted((out / name).glob("seed*.json"))
        if files:
            runs[name] = [json.loads(f.read_text()) for f in files]
    return runs


def report(args: argparse.Namespace) -> None:
    out = Path(args.out)
    teacher = json.loads((out / "teacher.json").read_text())
    runs = _load_runs(out)
    lines = ["| model | steps | NFE | seeds | attr_acc (init) | attr_acc (final) | attr_acc (best in training) | "
             "drop from best | fd_real (init) | fd_real (final) | fd_teacher (final) | train s/run |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for steps, row in sorted(teacher.items(), key=lambda kv: -int(kv[0])):
        fdt = f"{row['fd_teacher']:.1f}" if "fd_teacher" in row else "-"
        lines.append(f"| teacher, Euler, CFG {row['cfg']:g} | {steps} | {row['nfe']} | - | - | {row['attr_acc']:.3f} | - | - "
                     f"| - | {row['fd_real']:.1f} | {fdt} | - |")
    for name, rs in runs.items():
        init = [r["curve"][0] for r in rs]  # iteration 0: the student as initialised from the teacher
        final = [r["final"]["attr_acc"] for r in rs]
        # the best point *after* training started: a peak-then-decline is the instability we look for,
        # while a student that only ever loses against its initialisation shows in init vs final
        best = [max(c["attr_acc"] for c in r["curve"] if c["iteration"] > 0) for r in rs]
        drop = [b - f for b, f in zip(best, final)]
        fdr = statistics.fmean(r["final"]["fd_real"] for r in rs)
        fdt = statistics.fmean(r["final"]["fd_teacher"] for r in rs)
        secs = statistics.fmean(r["train_seconds"] for r in rs)
        v = rs[0]
        acc0 = statistics.fmean(c["attr_acc"] for c in init)
        fd0 = statistics.fmean(c["fd_real"] for c in init)
        lines.append(f"| {v['label']} | {v['steps']} | {v['steps']} | {len(rs)} | {acc0:.3f} | {_stats(final)} | "
                     f"{_stats(best)} | {_stats(drop)} | {fd0:.1f} | {fdr:.1f} | {fdt:.1f} | {secs:.0f} |")
    open_prompts = next(iter(teacher.values())).get("open_prompts")
    lines.append("\nEvaluation prompts: " + ("open (positions left out)." if open_prompts
                                               else "fully specified (positions given)."))
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print(table)
    if runs:
        plot(runs, teacher, out / "curves.png")


def plot(runs: dict[str, list[dict]], teacher: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("4-step methods", ["dmd2", "dmd2_ida", "senseflow", "senseflow_vfm", "sid"], ("32", "4")),
              ("SenseFlow, 1 / 2 / 4 steps", ["senseflow_1step", "senseflow_2step", "senseflow"], ("32", "2", "1")),
              ("pushed to instability", ["dmd2_pushed", "dmd2_ida_pushed"], ("32", "4"))]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5), sharex=True)
    styles = {"32": "--", "4": ":", "2": "-.", "1": (0, (1, 4))}
    for col, (title, names, teacher_lines) in enumerate(groups):
        for row, key in enumerate(("attr_acc", "fd_real")):
            ax = axes[row][col]
            for i, name in enumerate(n for n in names if n in runs):
                color = f"C{i}"
                for j, r in enumerate(runs[name]):
                    xs = [c["iteration"] for c in r["curve"]]
                    ax.plot(xs, [c[key] for c in r["curve"]], color=color, alpha=0.8, lw=1.2,
                            label=runs[name][0]["label"] if j == 0 else None)
            for steps in teacher_lines:
                if steps in teacher:
                    ax.axhline(teacher[steps][key], color="gray", linestyle=styles[steps], label=f"teacher {steps} steps")
            ax.set_title(f"{title}: {key}", fontsize=10)
            ax.set_xlabel("iteration")
            ax.legend(fontsize=7)
    fig.suptitle("toy ablation: each line is one seed (higher attr_acc and lower fd_real are better)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "one", "report"):
        s = sub.add_parser(name)
        s.add_argument("--out", default="runs/ablation")
        if name == "report":
            continue
        s.add_argument("--teacher", default=None, help="toy teacher folder (default: the shipped one)")
        s.add_argument("--prompts", default=None,
                       help="prompt source of every run, e.g. builtin:toy-world for closed captions "
                            "(default: the recipes'); open captions are judged on open evaluation prompts")
        s.add_argument("--iterations", type=int, default=150)
        s.add_argument("--eval-every", type=int, default=25)
        s.add_argument("--eval-prompts", type=int, default=64)
        s.add_argument("--per-prompt", type=int, default=2)
        if name == "run":
            s.add_argument("--jobs", type=int, default=2)
            s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
            s.add_argument("--only", nargs="+", choices=list(VARIANTS), default=None)
            s.add_argument("--cfg", type=float, default=3.0, help="teacher CFG (the recipes' real_guidance)")
        else:
            s.add_argument("--variant", choices=list(VARIANTS), required=True)
            s.add_argument("--seed", type=int, required=True)
    args = p.parse_args(argv)
    {"run": run_all, "one": run_one, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
