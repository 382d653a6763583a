"""Quality cost of the fp8 frozen teacher in the toy world (docs/performance.md, "Offload and fp8 frozen teacher").

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fp8_teacher.py --iterations 150 --seeds 0 1
    .venv/bin/python benchmarks/fp8_teacher.py --memory     # teacher weight bytes, bf16 vs fp8, per preset

For each seed, ``senseflow demo`` (SenseFlow recipe, 4-step student) runs twice with identical
seeds, prompts and noise: once with ``teacher.weight_dtype: none`` and once with ``fp8_e4m3``.
Each run scores the teacher itself (32 and 4 Euler steps, CFG 3) and the distilled student with
the toy evaluator (attr_acc, fd_real, fd_teacher).  Writes ``<out>/fp8_teacher.json`` and
``<out>/fp8_teacher.md`` (the table docs/performance.md quotes) and prints the table, then the
paired fp8-minus-none attr_acc gains with bootstrap intervals (``<out>/fp8_paired.json``;
``--pair-only`` recomputes them from finished runs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from senseflow.toy.demo import run_demo

KEYS = ("attr_acc", "fd_real", "fd_teacher")
MODELS = (("teacher", "teacher 32 steps"), ("teacher_4step", "teacher 4 steps"), ("student", "student 4 steps"))


MEMORY_PRESETS = ("tiny", "tiny-flux", "tiny-sdxl", "sd35-medium", "sd35-large", "flux-dev", "sdxl")


def memory_table() -> str:
    """Frozen-teacher weight bytes per preset: bf16 storage vs fp8 (built on ``meta``: nothing allocated)."""
    import torch

    from senseflow.bench.presets import get_preset
    from senseflow.train.fp8 import fp8_weight_bytes, weight_bytes

    lines = ["| preset | parameters | teacher bf16 | teacher fp8 (linears) | fp8 / bf16 |", "| --- | ---: | ---: | ---: | ---: |"]
    for name in MEMORY_PRESETS:
        net = get_preset(name).build_backbone("meta", torch.bfloat16, 0)
        n = sum(p.numel() for p in net.parameters())
        bf16, fp8 = weight_bytes(net), fp8_weight_bytes(net)
        lines.append(f"| {name} | {n / 1e6:,.1f}M | {bf16 / 1e6:,.2f} MB | {fp8 / 1e6:,.2f} MB | {fp8 / bf16:.3f} |")
    return "\n".join(lines)


def paired(out: Path, seed: int, eval_prompts: int, models: tuple[str, ...] = ("student", "teacher")) -> dict[str, dict]:
    """fp8 minus none, judged on the same prompts and noise: attr_acc gain with a 95% interval over prompts.

    Re-samples the two finished runs' students (``<run>/student``) and the teacher with and without
    fp8 storage on the demo's evaluation set, so each pair differs only in the teacher's storage.
    """
    import torch

    from senseflow.build import load_teacher
    from senseflow.student import load_student, teacher_config
    from senseflow.teachers.base import Denoiser, freeze
    from senseflow.toy.demo import EvalSet, sample_student, sample_teacher
    from senseflow.toy.evaluator import ToyEvaluator, paired_gain
    from senseflow.train.fp8 import quantize_linears

    evaluator = ToyEvaluator.load()
    cpu = torch.device("cpu")
    checks: dict[str, dict] = {k: {} for k in ("student", "teacher_32", "teacher_4") if k.split("_")[0] in models}
    evalset = None
    for dtype in ("none", "fp8_e4m3"):
        student = load_student(out / f"seed{seed}-{dtype}" / "run" / "student")
        evalset = EvalSet(student.adapter, eval_prompts, 4, seed, cpu, open_positions=True)
        if "student" in models:
            images, _ = sample_student(student.generator, evalset, student.spec.sampler)
            checks["student"][dtype] = evaluator.checks_per_image(images, evalset.prompts)
        if "teacher" not in models:
            continue
        adapter, backbone = load_teacher(teacher_config(student.spec), cpu)
        freeze(backbone)
        if dtype == "fp8_e4m3":
            quantize_linears(backbone)
        for steps in (32, 4):
            images, _ = sample_teacher(Denoiser(backbone, adapter), evalset, steps, 3.0)
            checks[f"teacher_{steps}"][dtype] = evaluator.checks_per_image(images, evalset.prompts)
    return {k: paired_gain(v["fp8_e4m3"], v["none"], evalset.prompts, seed=seed) for k, v in checks.items()}


def table(rows: list[dict]) -> str:
    lines = ["| seed | model | weight_dtype | attr_acc | fd_real | fd_teacher |", "| --- | --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        fdt = f"{r['fd_teacher']:.2f}" if r.get("fd_teacher") is not None else "-"
        lines.append(f"| {r['seed']} | {r['model']} | {r['weight_dtype']} | {r['attr_acc']:.3f} | {r['fd_real']:.2f} "
                     f"| {fdt} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/fp8_teacher")
    p.add_argument("--method", default="senseflow")
    p.add_argument("--iterations", type=int, default=150)
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--memory", action="store_true", help="only print the teacher weight-memory table")
    p.add_argument("--pair-only", action="store_true", help="only the paired fp8-minus-none gains of finished runs")
    p.add_argument("--pair-models", nargs="+", choices=["student", "teacher"], default=["student", "teacher"])
    args = p.parse_args(argv)
    if args.memory:
        print(memory_table(), flush=True)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.pair_only:
        gains = {seed: paired(out, seed, args.eval_prompts, tuple(args.pair_models)) for seed in args.seeds}
        (out / f"fp8_paired_{'_'.join(args.pair_models)}.json").write_text(json.dumps(gains, indent=2))
        print(json.dumps(gains, indent=2), flush=True)
        return 0
    rows: list[dict] = []
    for seed in args.seeds:
        for dtype in ("none", "fp8_e4m3"):
            res = run_demo(out / f"seed{seed}-{dtype}", args.method, steps=4, iterations=args.iterations,
                           eval_prompts=args.eval_prompts, eval_every=args.iterations, seed=seed,
                           overrides=[f"teacher.weight_dtype={dtype}"], progress=False)
            for key, name in MODELS:
                rows.append({"seed": seed, "model": name, "weight_dtype": dtype,
                             **{k: res[key].get(k) for k in KEYS}})
            rows[-1]["train_seconds"] = res["train_seconds"]
    gains = {seed: paired(out, seed, args.eval_prompts) for seed in args.seeds}
    (out / "fp8_paired.json").write_text(json.dumps(gains, indent=2))
    text = table(rows) + "\n\nfp8 minus none (attr_acc, paired on the same prompts and noise, 95% interval over prompts):\n" + \
        json.dumps(gains)
    meta = {"command": "benchmarks/fp8_teacher.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "method": args.method, "iterations": args.iterations, "eval_prompts": args.eval_prompts,
            "seeds": args.seeds, "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    (out / "fp8_teacher.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    (out / "fp8_teacher.md").write_text(text + "\n")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
