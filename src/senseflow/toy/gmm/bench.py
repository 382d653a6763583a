"""``senseflow toy gmm``: the ground-truth benchmark -- teachers and students against the true mixture.

Writes ``table.md``, ``results.json``, ``curves.png`` (metrics over training) and ``scatter.png``
(samples projected on the two leading principal axes of the component means) to ``--out``.
Nothing is written until every argument has been validated.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

import torch
from pydantic import ValidationError
from tqdm.auto import tqdm

from ...config import parse_override
from ...teachers.base import Guidance, SenseflowError
from .metrics import METRICS
from .mixture import GaussianMixture
from .run import CONFIGS, EvalSet, RunSpec, distil, sample_generator, teacher_samples
from .teacher import TIME_LAWS, ExactVelocity, GMMAdapter, VelocityMLP, fit_mlp_teacher

TEACHER_STEPS: tuple[int, ...] = (1, 2, 4, 8, 32, 128)
SHOWN: tuple[str, ...] = ("class_acc", "precision", "coverage", "mode_tv", "recall", "sw2", "log_density")


def load_or_fit_teacher(mixture: GaussianMixture, mixture_key: str, out: Path | None, width: int, depth: int,
                        steps: int, progress: bool = True, time_law: str = "logit_normal") -> VelocityMLP:
    """The MLP teacher, cached as safetensors next to the results (refit when anything differs)."""
    from ...train.checkpoint import read_safetensors, save_safetensors

    law = "" if time_law == "logit_normal" else f"_{time_law}"
    path = None if out is None else out / f"teacher_{mixture_key}_w{width}_d{depth}_s{steps}{law}.safetensors"
    net = VelocityMLP(mixture.dim, mixture.num_classes, width, depth)
    if path is not None and path.is_file():
        net.load_state_dict(read_safetensors(path))
        return net.eval()
    net = fit_mlp_teacher(mixture, width, depth, steps, progress=progress, time_law=time_law)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(net, path)
    return net


def summarise(rows: Sequence[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """Mean and standard deviation over seeds of every metric."""
    out = {}
    for k in METRICS:
        vals = [r[k] for r in rows if k in r and math.isfinite(r[k])]
        if vals:
            out[k] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
    return out


def markdown_table(entries: list[tuple[str, dict[str, tuple[float, float]]]]) -> str:
    head = "| run | " + " | ".join(SHOWN) + " |\n|---|" + "---:|" * len(SHOWN) + "\n"
    lines = []
    for name, summ in entries:
        cells = []
        for k in SHOWN:
            if k not in summ:
                cells.append("")
                continue
            m, s = summ[k]
            digits = 2 if k == "log_density" else 3
            cells.append(f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if s > 0 else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: Path,
                metrics: Sequence[str] = ("precision", "sw2", "mode_tv", "coverage")) -> None:
    """Metric vs iteration, one line per run name (mean over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2))
    for ax, metric in zip(axes, metrics):
        for name, results in runs.items():
            its = [r["iteration"] for r in results[0]["history"]]
            vals = [statistics.fmean(res["history"][i][metric] for res in results) for i in range(len(its))]
            ax.plot(its, vals, label=name)
        ax.set_title(metric)
        ax.set_xlabel("iteration")
        if metric == "sw2":
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scatter(mixture: GaussianMixture, panels: dict[str, torch.Tensor], labels: torch.Tensor, path: Path,
                 max_points: int = 1500) -> None:
    """Samples of each panel on the two leading principal axes of all component means (class = colour)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = mixture.means.reshape(-1, mixture.dim)
    centred = means - means.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    proj = vh[:2].T
    centre = means.mean(0)
    mp = (means - centre) @ proj
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.3 * rows), squeeze=False)
    lim = float(mp.abs().max()) * 1.3
    for ax, (name, x) in zip(axes.flat, panels.items()):
        p = (x[:max_points].double() - centre) @ proj
        ax.scatter(p[:, 0], p[:, 1], s=2, c=labels[:max_points], cmap="tab10", vmin=0, vmax=9, alpha=0.6)
        ax.scatter(mp[:, 0], mp[:, 1], s=30, marker="x", c="k", linewidths=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_method_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``--set ttur=10 --set dmd_time.low=0.1`` -> nested dict (validated against the method config later)."""
    out: dict[str, Any] = {}
    for item in items:
        keys, value = parse_override(item)
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return out


def _int_list(text: str, name: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SenseflowError(f"--{name}: expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals) and name != "seeds":
        raise SenseflowError(f"--{name}: expected positive integers, got {text!r}")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/gmm", help="output folder (table.md, results.json, curves.png, scatter.png)")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--modes", type=int, default=5, help="modes per class")
    p.add_argument("--mixture-seed", type=int, default=0)
    p.add_argument("--methods", default="senseflow,dmd2,sid", help="comma-separated: senseflow, dmd2, sid")
    p.add_argument("--steps", default="1,4", help="student step counts, comma-separated")
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr-g", type=float, default=1e-4)
    p.add_argument("--lr-fake", type=float, default=1e-4)
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="cosine: every optimiser's lr decays along a half cosine to 0 over --iterations (docs/"
                        "ground_truth.md, fifth session: it settles the 4-step mode weights); constant: the recipes'")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--teacher", choices=("mlp", "exact"), default="exact",
                   help="mlp: distil the network teacher; exact: the analytic posterior is the teacher")
    # width 256 fitted 6000 steps: its own Euler-128 precision 0.990 (width 128 / 2000 steps: 0.929), the
    # ceiling of every student (docs/ground_truth.md); the fit (~6 min on one idle core) is cached in --out
    p.add_argument("--teacher-width", type=int, default=256)
    p.add_argument("--teacher-depth", type=int, default=3)
    p.add_argument("--teacher-train-steps", type=int, default=6000)
    p.add_argument("--teacher-law", choices=TIME_LAWS, default="logit_normal",
                   help="time law of the MLP backbone's fit (teacher.fit_times)")
    p.add_argument("--one-step-input-time", type=float, default=None, metavar="T",
                   help="1-step students: generator.first_input_time T: query G at time T for the pure noise, scaled to T "
                        "(SiD's sigma_init; docs/deviations.md); default: t = 1, the anchor itself")
    p.add_argument("--multi-step-input-time", type=float, default=None, metavar="T",
                   help="students with more than one step: the same for their first (pure-noise) anchor, whose "
                        "prediction backward simulation trains as a 1-step sample too (docs/ground_truth.md, third "
                        "session: T = 0.85 holds the 4-step mode weights); default: t = 1")
    p.add_argument("--one-step-regression", type=float, default=0.0, metavar="W",
                   help="1-step DMD2 / SenseFlow students: add DMD (v1)'s regression onto 65,536 teacher ODE pairs "
                        "(32 Euler steps, cached in --out) with weight W (toy/gmm/regression.py; docs/ground_truth.md, "
                        "fourth session: W = 4 with --lr-g 3e-4 --set ttur=1 --ema 0.99 reaches precision 0.90)")
    p.add_argument("--ema", type=float, default=None, help="also evaluate an EMA of the generator with this decay")
    p.add_argument("--real-data", action="store_true", help="batches carry true samples")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-samples", type=int, default=4000)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="method config field, e.g. --set ttur=10 (applies to every method that has it)")


def _check(args: argparse.Namespace) -> tuple[list[str], list[int], list[int], dict[str, Any]]:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in CONFIGS]
    if bad:
        raise SenseflowError(f"--methods: unknown {bad[0]!r} (choose from {', '.join(CONFIGS)})")
    steps = _int_list(args.steps, "steps")
    seeds = _int_list(args.seeds, "seeds")
    if min(args.dim, args.classes, args.modes, args.iterations, args.batch_size, args.eval_every) < 1:
        raise SenseflowError("--dim, --classes, --modes, --iterations, --batch-size and --eval-every must be >= 1")
    if args.eval_samples < 10 * args.classes:
        raise SenseflowError(f"--eval-samples must be >= 10 per class ({10 * args.classes})")
    if args.ema is not None and not 0.0 < args.ema < 1.0:
        raise SenseflowError("--ema must be in (0, 1)")
    for flag in ("one_step_input_time", "multi_step_input_time"):
        value = getattr(args, flag)
        if value is not None and not 0.0 < value < 1.0:
            raise SenseflowError(f"--{flag.replace('_', '-')} must be in (0, 1) (below the pure-noise anchor t = 1; "
                                 f"omit it for t = 1)")
    if args.one_step_regression < 0 or not math.isfinite(args.one_step_regression):
        raise SenseflowError("--one-step-regression must be a finite weight >= 0 (0: off)")
    if args.one_step_regression > 0:
        if 1 not in steps:
            raise SenseflowError("--one-step-regression trains 1-step students only: add 1 to --steps")
        if "sid" in methods:
            raise SenseflowError("--one-step-regression is DMD's term for DMD2 / SenseFlow: drop sid from --methods")
    overrides = parse_method_overrides(args.overrides)
    unused = [k for k in overrides if not any(k in CONFIGS[m].model_fields for m in methods)]
    if unused:
        raise SenseflowError(f"--set {unused[0]}: no such setting in {', '.join(methods)} (see docs/config.md)")
    for m in methods:  # validate every override before anything is written
        try:
            RunSpec(method=m, method_overrides=_for_method(m, overrides)).method_config()
        except ValidationError as exc:
            e = exc.errors()[0]
            where = ".".join(str(p) for p in e["loc"])
            raise SenseflowError(f"--set {where} for {m}: {e['msg']}") from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SenseflowError(f"--out {str(out)!r} exists and is not a directory")
    return methods, steps, seeds, overrides


def _for_method(method: str, overrides: dict[str, Any]) -> dict[str, Any]:
    fields = CONFIGS[method].model_fields
    return {k: v for k, v in overrides.items() if k in fields}


def run(args: argparse.Namespace) -> int:
    methods, steps, seeds, overrides = _check(args)
    out = Path(args.out)
    mixture = GaussianMixture.random(args.dim, args.classes, args.modes, seed=args.mixture_seed)
    key = f"D{args.dim}_C{args.classes}_M{args.modes}_s{args.mixture_seed}"
    out.mkdir(parents=True, exist_ok=True)
    mlp = load_or_fit_teacher(mixture, key, out, args.teacher_width, args.teacher_depth, args.teacher_train_steps,
                              time_law=args.teacher_law)
    adapter = GMMAdapter(mixture)
    ev = EvalSet.make(mixture, adapter, args.eval_samples)
    entries: list[tuple[str, dict[str, tuple[float, float]]]] = []
    results: dict[str, Any] = {"mixture": key, "teacher": args.teacher, "rows": {}}
    floor = ev.score(mixture, mixture.sample(ev.labels, torch.Generator().manual_seed(99)))
    entries.append(("true samples (floor)", summarise([floor])))
    results["rows"]["true samples"] = floor
    panels: dict[str, torch.Tensor] = {"true samples": ev.reference.float()}
    teachers = {"exact": ExactVelocity(mixture), "mlp": mlp}
    for tname, backbone in teachers.items():
        for n in TEACHER_STEPS:
            x = teacher_samples(mixture, backbone, n, ev, Guidance())
            row = ev.score(mixture, x)
            name = f"teacher {tname}, Euler {n}"
            entries.append((name, summarise([row])))
            results["rows"][name] = row
            if tname == args.teacher and n in (4, 128):
                panels[f"teacher {n} steps"] = x
    curves: dict[str, list[dict[str, Any]]] = {}
    jobs = [(m, k, s) for m in methods for k in steps for s in seeds]
    for m, k, s in tqdm(jobs, desc="gmm students", dynamic_ncols=True):
        spec = RunSpec(method=m, steps=k, iterations=args.iterations, batch_size=args.batch_size, lr_g=args.lr_g,
                       lr_fake=args.lr_fake, seed=s, teacher=args.teacher, method_overrides=_for_method(m, overrides),
                       real_data=args.real_data, ema_decay=args.ema,
                       generator_input_time=args.one_step_input_time if k == 1 else args.multi_step_input_time,
                       regression_weight=args.one_step_regression if k == 1 else 0.0, lr_schedule=args.lr_schedule)
        pairs = out / (f"pairs_{key}_w{args.teacher_width}_d{args.teacher_depth}_s{args.teacher_train_steps}_"
                       f"{args.teacher_law}_{args.teacher}_n{spec.regression_pairs}_e32.safetensors")
        res = distil(mixture, mlp, spec, ev, eval_every=args.eval_every, pairs_cache=pairs)
        gen = res.pop("generator")
        name = f"{m} {k}-step"
        curves.setdefault(name, []).append(res)
        if s == seeds[0]:
            panels[name] = sample_generator(gen, ev)
    for name, rs in curves.items():
        entries.append((name, summarise([r["final"] for r in rs])))
        results["rows"][name] = {"seeds": [r["final"] for r in rs], "history": [r["history"] for r in rs]}
        if args.ema is not None:
            entries.append((f"{name} (EMA {args.ema})", summarise([r["final_ema"] for r in rs])))
            results["rows"][f"{name} EMA"] = {"seeds": [r["final_ema"] for r in rs]}
    table = markdown_table(entries)
    (out / "table.md").write_text(table)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    if curves:
        plot_curves(curves, out / "curves.png")
    plot_scatter(mixture, panels, ev.labels, out / "scatter.png")
    print(table)
    print(f"wrote {out / 'table.md'}, results.json, curves.png, scatter.png")
    return 0
