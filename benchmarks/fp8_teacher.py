"""Quality cost of the fp8 frozen teacher in the toy world (docs/performance.md, "Offload and fp8 frozen teacher").

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fp8_teacher.py --iterations 150 --seeds 0 1
    .venv/bin/python benchmarks/fp8_teacher.py --memory     # teacher weight bytes, bf16 vs fp8, per preset

For each seed, ``senseflow demo`` (SenseFlow recipe, 4-step student) runs twice with identical
seeds, prompts and noise: once with ``teacher.weight_dtype: none`` and once with ``fp8_e4m3``.
Each run scores the teacher itself (32 and 4 Euler steps, CFG 3) and the distilled student with
the toy evaluator (attr_acc, fd_real, fd_teacher).  Writes ``<out>/fp8_teacher.json`` and
``<out>/fp8_teacher.md`` (the table docs/performance.md quotes) and prints the table.
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
    args = p.parse_args(argv)
    if args.memory:
        print(memory_table(), flush=True)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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
    text = table(rows)
    meta = {"command": "benchmarks/fp8_teacher.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "method": args.method, "iterations": args.iterations, "eval_prompts": args.eval_prompts,
            "seeds": args.seeds, "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    (out / "fp8_teacher.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    (out / "fp8_teacher.md").write_text(text + "\n")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
