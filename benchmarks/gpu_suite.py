"""One-shot GPU suite (issue #16 item 5): a few ``senseflow bench`` runs on ONE GPU, JSON + Markdown.

Each case is one :func:`senseflow.bench.runner.run_benchmark` call (real shapes, random weights,
random prompt conditioning), with compile off and on (``train.compile: blocks``), next to the
memory estimate of the same setup (:func:`senseflow.bench.memory.estimate_memory`).  On a GPU every
case runs in its own process (fresh CUDA memory statistics and compile caches) under a time limit
taken from the suite's budget, so the whole suite ends within ``--budget-s`` (default 460 s:
the 8-minute target minus start-up); a case that would not fit is recorded as skipped, one that
runs past its limit as timed out.

``--dry-run`` (CPU, seconds; run by tests/unit/test_gpu_suite.py) runs every compile-off case on the
tiny preset (same method, precision, checkpointing) for one iteration, lists the compile-on cases
as planned, and writes the same JSON + Markdown: it checks the plumbing, not the numbers.

    python benchmarks/gpu_suite.py --out runs/gpu_suite            # on a GPU machine
    python benchmarks/gpu_suite.py --out /tmp/suite --dry-run      # anywhere
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

#: what the suite measures (issue #16 item 5); targets are compared, never tuned per run
TARGETS = {"sid-sd35m": {"gpu_s_per_1k_images": 800.0, "mfu": 0.40, "peak_allocated_gb": 60.0}}


@dataclass(frozen=True)
class Case:
    name: str
    preset: str
    method: str
    precision: str
    batch_size: int
    resolution: int
    activation_checkpointing: bool
    iterations: int
    warmup: int
    compile: bool = False
    lora_rank: int | None = None   # LoRA generator + fake score on one shared frozen base (lora.shared_base)
    overrides: dict[str, Any] = field(default_factory=dict)
    skip: str | None = None  # why the case cannot run at all

    @property
    def key(self) -> str:
        return f"{self.name}-compile-{'on' if self.compile else 'off'}"


BASE_CASES: tuple[Case, ...] = (
    # SiD-DiT's own setting (pure BF16, batch 4 per GPU, 1024 px), activation checkpointing
    Case("sid-sd35m", "sd35-medium", "sid", "bf16", 4, 1024, True, iterations=3, warmup=1),
    # SenseFlow SD3.5-Medium, batch 2; ttur 5 -> 5 timed iterations = one TTUR cycle
    Case("senseflow-sd35m", "sd35-medium", "senseflow", "bf16", 2, 1024, True, iterations=5, warmup=1),
    # FLUX.1-dev LoRA rank 64 with one shared frozen base (issue #16 item 1): estimate 28.5 GB vs 76 GB for copies
    Case("flux-dev-lora", "flux-dev", "senseflow", "bf16", 1, 1024, True, iterations=5, warmup=1, lora_rank=64),
)


def cases() -> list[Case]:
    return [replace(c, compile=comp) for c in BASE_CASES for comp in (False, True)]


def dry_case(case: Case) -> Case:
    """The same case on the tiny preset, one iteration (CPU)."""
    return replace(case, preset="tiny", resolution=0, batch_size=min(case.batch_size, 2), iterations=1, warmup=0,
                   lora_rank=None if case.lora_rank is None else min(case.lora_rank, 2))


def run_case(case: Case, device: str = "auto") -> dict[str, Any]:
    """Run one case in this process; returns the bench result plus the estimate and derived numbers."""
    from senseflow.bench.memory import estimate_memory
    from senseflow.bench.runner import BenchSettings, run_benchmark

    settings = BenchSettings(preset=case.preset, method=case.method, resolution=case.resolution or None,
                             batch_size=case.batch_size, iterations=case.iterations, warmup=case.warmup,
                             precision=case.precision, device=device,
                             activation_checkpointing=case.activation_checkpointing,
                             method_overrides=dict(case.overrides), compile=case.compile, count_passes=False,
                             lora_rank=case.lora_rank)
    t0 = time.perf_counter()
    r = run_benchmark(settings)
    wall = time.perf_counter() - t0
    est = estimate_memory(case.preset, case.method, case.precision, gpus=1, batch_size=case.batch_size,
                          resolution=case.resolution or None,
                          activation_checkpointing=case.activation_checkpointing,
                          method_overrides=dict(case.overrides), lora_rank=case.lora_rank)
    return {
        "case": case.key, "status": "ok", "wall_s": wall, "settings": asdict(case),
        "s_per_1k_images": r["s_per_1k_images"],
        "gpu_s_per_1k_images": r["s_per_1k_images"] * r["world_size"],
        "mfu": r["mfu"], "step_time_s": r["step_time_s"], "flops_per_iteration": r["flops_per_iteration"],
        "peak_allocated_bytes": r["peak_allocated_bytes"], "estimated_bytes": est.total_bytes,
        "device_name": r["device_name"], "bench": r,
    }


def _fmt(x: Any, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "n/a" if x is None else str(x)


def markdown(results: list[dict[str, Any]], command: str, dry_run: bool) -> str:
    lines = [f"GPU suite{' (DRY RUN on CPU, tiny preset: plumbing only, numbers meaningless)' if dry_run else ''}",
             f"command: `{command}`", "",
             "| case | status | s / 1k images | GPU-s / 1k images | MFU | peak allocated GB | estimate GB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['case']} | {r['status']}: {r.get('reason', '')} | - | - | - | - | - |")
            continue
        mfu = r["mfu"] if isinstance(r["mfu"], str) else f"{r['mfu']:.1%}"
        pa = r["peak_allocated_bytes"]
        lines.append(f"| {r['case']} | ok | {_fmt(r['s_per_1k_images'], '.1f')} | "
                     f"{_fmt(r['gpu_s_per_1k_images'], '.1f')} | {mfu} | {_fmt(None if pa is None else pa / 1e9, '.2f')} | "
                     f"{r['estimated_bytes'] / 1e9:.2f} |")
    lines += ["", "targets (issue #16): " + "; ".join(f"{k}: GPU-s/1k <= {v['gpu_s_per_1k_images']:g}, MFU >= "
                                                      f"{v['mfu']:.0%}, peak allocated <= {v['peak_allocated_gb']:g} GB"
                                                      for k, v in TARGETS.items())]
    return "\n".join(lines) + "\n"


def _in_subprocess(case: Case, out: Path, limit: float) -> dict[str, Any]:
    path = out / f"{case.key}.json"
    cmd = [sys.executable, __file__, "--case", case.key, "--case-json", str(path)]
    try:
        proc = subprocess.run(cmd, timeout=max(1.0, limit), capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"case": case.key, "status": "timed out", "reason": f"over its {limit:.0f} s share of the budget"}
    if proc.returncode != 0 or not path.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        return {"case": case.key, "status": "failed", "reason": tail[0][:300]}
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/gpu_suite", help="folder for suite.json and suite.md")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny preset, one iteration per case")
    p.add_argument("--budget-s", type=float, default=460.0, help="wall-clock budget for all cases")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--case-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    by_key = {c.key: c for c in cases()}

    if args.case:  # child process: one case
        result = run_case(by_key[args.case])
        Path(args.case_json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        return 0

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device; use --dry-run to check the plumbing on a CPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "benchmarks/gpu_suite.py", *(argv if argv is not None else sys.argv[1:])])
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    todo = cases()
    for i, case in enumerate(todo):
        if case.skip:
            results.append({"case": case.key, "status": "skipped", "reason": case.skip})
        elif args.dry_run and case.compile:
            results.append({"case": case.key, "status": "planned", "reason": "dry run: compile-on cases run on a GPU"})
        elif args.dry_run:
            results.append({**run_case(dry_case(case), device="cpu"), "case": case.key})
        else:
            left = args.budget_s - (time.perf_counter() - start)
            # share of what is left: compile-on cases weigh double (they compile during warm-up)
            weights = [2.0 if c.compile else 1.0 for c in todo[i:] if not c.skip]
            if left < 30:
                results.append({"case": case.key, "status": "skipped", "reason": "suite budget spent"})
                continue
            results.append(_in_subprocess(case, out, left * weights[0] / sum(weights)))
        r = results[-1]
        print(f"{r['case']:<28} {r['status']}" + (f"  {r['s_per_1k_images']:.1f} s/1k images" if r["status"] == "ok"
                                                  else f"  {r.get('reason', '')}"), flush=True)
    payload = {"command": command, "dry_run": args.dry_run, "wall_s": time.perf_counter() - start,
               "targets": TARGETS, "results": results}
    (out / "suite.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (out / "suite.md").write_text(markdown(results, command, args.dry_run))
    print((out / "suite.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
