"""``senseflow bench``: throughput, FLOPs/MFU, memory and framework overhead; or a memory estimate.

Examples::

    senseflow bench --preset tiny --method senseflow --iterations 20          # CPU: tiny preset
    senseflow bench --preset sd35-medium --method sid --precision bf16 --batch-size 4   # on a GPU
    senseflow bench --preset sd35-medium --method sid --precision bf16 --batch-size 4 \\
        --estimate-memory --gpus 8                                            # no run: predict GB/GPU
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

METHODS = ("senseflow", "dmd2", "sid")


def _parse_sets(items: list[str] | None) -> dict[str, Any]:
    import yaml

    from ..teachers.base import SenseflowError

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SenseflowError(f"--set {item!r}: expected KEY=VALUE, e.g. --set ttur=1")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _write_json(path: str, payload: dict[str, Any]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def _command(args: argparse.Namespace) -> str:
    """The equivalent command line (recorded in the JSON output)."""
    parts = ["senseflow", "bench", "--preset", args.preset, "--method", args.method, "--precision", args.precision,
             "--batch-size", str(args.batch_size), "--iterations", str(args.iterations), "--warmup", str(args.warmup)]
    if args.resolution:
        parts += ["--resolution", str(args.resolution)]
    if args.activation_checkpointing:
        parts.append("--activation-checkpointing")
    if args.compile:
        parts.append("--compile")
    if args.lora_rank:
        parts += ["--lora-rank", str(args.lora_rank)] + (["--no-shared-base"] if args.no_shared_base else [])
    for item in args.set or []:
        parts += ["--set", item]
    return " ".join(parts)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .presets import PRESETS

    if args.list_presets:
        for p in PRESETS.values():
            kind = "real shapes, random weights" if p.real else "tiny"
            print(f"{p.name:<12} {p.family:<6} {kind:<28} {p.description}")
        return 0
    overrides = _parse_sets(args.set)
    if args.estimate_memory:
        from .memory import estimate_memory

        est = estimate_memory(args.preset, args.method, args.precision, gpus=args.gpus, batch_size=args.batch_size,
                              resolution=args.resolution, activation_checkpointing=args.activation_checkpointing,
                              shard_teacher=not args.no_shard_teacher, strategy=args.strategy,
                              method_overrides=overrides, checkpoint_teacher=args.checkpoint_teacher,
                              lora_rank=args.lora_rank, shared_base=not args.no_shared_base)
        print(est.table())
        if args.json:
            _write_json(args.json, {"mode": "estimate", **est.to_dict()})
        return 0

    from .runner import BenchSettings, format_result, run_benchmark

    settings = BenchSettings(preset=args.preset, method=args.method, resolution=args.resolution,
                             batch_size=args.batch_size, iterations=args.iterations, warmup=args.warmup,
                             precision=args.precision, device=args.device,
                             activation_checkpointing=args.activation_checkpointing, method_overrides=overrides,
                             count_flops=not args.no_flops, count_passes=not args.no_passes, compile=args.compile, peak_tflops=args.peak_tflops,
                             measure_saved=args.compare_estimate, seed=args.seed, allow_cpu=args.allow_cpu,
                             lora_rank=args.lora_rank, shared_base=not args.no_shared_base)
    result = run_benchmark(settings)
    if result["world_size"] > 1:
        import torch.distributed as dist
        if dist.is_initialized() and dist.get_rank() != 0:
            return 0
    print(format_result(result))
    payload: dict[str, Any] = {"mode": "run", "command": _command(args), **result}
    if args.compare_estimate:
        from .memory import compare_with_run, estimate_memory, format_comparison

        est = estimate_memory(args.preset, args.method, args.precision, gpus=result["world_size"],
                              batch_size=args.batch_size, resolution=args.resolution,
                              activation_checkpointing=args.activation_checkpointing, method_overrides=overrides,
                              lora_rank=args.lora_rank, shared_base=not args.no_shared_base)
        rows = compare_with_run(est, result)
        print(format_comparison(rows))
        payload["estimate_comparison"] = [{"quantity": n, "estimated": e, "measured": m} for n, e, m in rows]
    if args.json:
        _write_json(args.json, payload)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``senseflow bench``."""
    from .presets import PRESETS

    p = sub.add_parser(
        "bench", help="benchmark a method on an architecture preset, or estimate its memory",
        description="Run N training iterations of a method through the real trainer on a preset with random "
                    "weights and random prompt conditioning, and report step time, images/s, s per 1k images, "
                    "peak memory, FLOPs/MFU and the framework overhead.  With --estimate-memory, predict the "
                    "per-GPU memory of a model x method x precision x GPU count instead (nothing is run).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=list(PRESETS),
                   help="architecture (tiny*: CPU-sized; others: real shapes, random weights)")
    p.add_argument("--method", default="senseflow", choices=METHODS)
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=2, help="images per iteration per process/GPU")
    p.add_argument("--iterations", type=int, default=10,
                   help="timed iterations (use a multiple of ttur=5 for dmd2/senseflow)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--precision", default="fp32", choices=("fp32", "amp_bf16", "bf16"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="checkpoint the generator's and fake score's blocks (parallel.activation_checkpointing)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="method setting, e.g. --set ttur=1 --set real_guidance.cfg=4.5 (repeatable)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting replay")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block (train.compile: blocks); warm-up includes compiling")
    p.add_argument("--no-passes", action="store_true", help="skip the pass-counting replay")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s per device for MFU (override)")
    p.add_argument("--compare-estimate", action="store_true",
                   help="also print the memory estimate of this setup next to the measured numbers")
    p.add_argument("--lora-rank", type=int, default=None, metavar="R",
                   help="run / estimate with LoRA generator and fake score of rank R (family's auto targets)")
    p.add_argument("--no-shared-base", action="store_true",
                   help="with --lora-rank: each LoRA network keeps its own base copy (lora.shared_base: false)")
    p.add_argument("--allow-cpu", action="store_true", help="run a real-shape preset on a CPU anyway (slow)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    g = p.add_argument_group("memory estimate (no run)")
    g.add_argument("--estimate-memory", action="store_true", help="predict per-GPU memory; nothing is run")
    g.add_argument("--gpus", type=int, default=1, help="number of GPUs (data parallel)")
    g.add_argument("--strategy", default="auto", choices=("auto", "none", "ddp", "fsdp"),
                   help="auto: fsdp for more than one GPU")
    g.add_argument("--no-shard-teacher", action="store_true", help="replicate the frozen teacher under FSDP")
    g.add_argument("--checkpoint-teacher", action="store_true",
                   help="what-if: also checkpoint the teacher's blocks (not implemented in the trainer)")
    p.set_defaults(func=_cmd_bench)
