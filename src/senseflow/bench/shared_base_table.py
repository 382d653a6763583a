"""Weight memory of LoRA runs: three base copies vs one shared base, per preset (docs/performance.md).

Two numbers per preset and mode:

* **estimate** -- :func:`senseflow.bench.memory.estimate_memory` with ``lora_rank`` (weights of the
  three networks, and the per-device peak), for every preset including the real-shape ones;
* **measured** (CPU, tiny presets only) -- the bytes of the distinct storages behind the teacher,
  generator and fake score as the trainer's builder makes them
  (:func:`senseflow.shared_base.lora_network`, the same call ``build.build_models`` makes).

The table is generic over :data:`senseflow.bench.presets.PRESETS`: a family's new preset appears
in it without any change here.  Run::

    python -m senseflow.bench.shared_base_table --rank 64 --tiny-rank 2 --precision bf16 --resolution 1024 \\
        --activation-checkpointing --method senseflow
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Iterable

import torch
from tqdm.auto import tqdm

from .memory import dtypes, estimate_memory
from .presets import PRESETS, get_preset

WEIGHT_ROWS = ("teacher weights", "generator weights", "fake_score weights")
GPU_BYTES = 80e9


@dataclass
class SharedBaseRow:
    preset: str
    resolution: int
    rank: int
    three_weights: int
    shared_weights: int
    three_peak: int
    shared_peak: int
    measured_three: int | None = None
    measured_shared: int | None = None


def measure_weight_bytes(preset_name: str, rank: int, shared: bool, precision: str = "fp32",
                         seed: int = 0) -> int:
    """Allocated bytes of the three networks' weights of a CPU build (distinct storages), LoRA rank ``rank``."""
    from ..lora import LoRAConfig
    from ..shared_base import lora_network, weight_bytes
    from ..teachers.base import freeze
    from ..train.precision import cast_trainable, master_dtype

    preset = get_preset(preset_name)
    teacher_dtype = dtypes(precision)[0]
    adapter = preset.make_adapter(preset.default_resolution, torch.device("cpu"), teacher_dtype)
    teacher = freeze(preset.build_backbone("cpu", teacher_dtype, seed))
    cfg = LoRAConfig(rank=rank, shared_base=shared)
    nets = [cast_trainable(lora_network(make, teacher, cfg, shared), master_dtype(precision))
            for make in (adapter.make_student, adapter.make_fake_score)]
    return weight_bytes(teacher, *nets)


def _weights(est) -> int:
    rows = {r.component: r.bytes for r in est.static}
    return sum(rows[k] for k in WEIGHT_ROWS)


def shared_base_rows(presets: Iterable[str], rank: int, method: str = "senseflow", precision: str = "bf16",
                     resolution: int | None = None, activation_checkpointing: bool = True,
                     batch_size: int = 1, measure_tiny: bool = True, tiny_rank: int = 2) -> list[SharedBaseRow]:
    """One row per preset; tiny presets use ``tiny_rank`` (rank 64 on a 3072-wide FLUX is 1/48 of the width;
    on the 32-wide tiny models rank 64 would make each adapter larger than its base layer)."""
    out = []
    for name in tqdm(list(presets), desc="presets", leave=False):
        preset = get_preset(name)
        res = resolution if (resolution and preset.real) else preset.default_resolution
        r = rank if preset.real else tiny_rank
        kw = dict(batch_size=batch_size, resolution=res, activation_checkpointing=activation_checkpointing,
                  lora_rank=r)
        three = estimate_memory(name, method, precision, shared_base=False, **kw)
        shared = estimate_memory(name, method, precision, shared_base=True, **kw)
        row = SharedBaseRow(name, res, r, _weights(three), _weights(shared), three.total_bytes, shared.total_bytes)
        if measure_tiny and not preset.real:
            row.measured_three = measure_weight_bytes(name, r, False, precision)
            row.measured_shared = measure_weight_bytes(name, r, True, precision)
        out.append(row)
    return out


def markdown(rows: list[SharedBaseRow]) -> str:
    def size(n: int | None) -> str:
        if n is None:
            return "-"
        return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.3f} MB"

    lines = ["| preset | px | LoRA rank | weights, 3 copies (est.) | weights, shared (est.) | ratio | measured CPU, 3 copies | "
             "measured CPU, shared | ratio | peak, 3 copies | peak, shared | shared fits 80 GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        measured = "-" if not r.measured_three else f"{r.measured_shared / r.measured_three:.2f}"
        fits = "yes" if r.shared_peak <= GPU_BYTES else f"no ({r.shared_peak / 1e9:.1f} GB)"
        lines.append(f"| {r.preset} | {r.resolution} | {r.rank} | {size(r.three_weights)} | {size(r.shared_weights)} | "
                     f"{r.shared_weights / r.three_weights:.2f} | {size(r.measured_three)} | "
                     f"{size(r.measured_shared)} | {measured} | {size(r.three_peak)} | {size(r.shared_peak)} | "
                     f"{fits} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=64, help="LoRA rank of the real-shape presets")
    p.add_argument("--tiny-rank", type=int, default=2, help="LoRA rank of the tiny presets (width 32)")
    p.add_argument("--method", default="senseflow", choices=("senseflow", "dmd2", "sid"))
    p.add_argument("--precision", default="bf16", choices=("fp32", "amp_bf16", "bf16"))
    p.add_argument("--resolution", type=int, default=1024, help="for the real-shape presets (tiny: their own)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--presets", nargs="*", default=list(PRESETS))
    args = p.parse_args(argv)
    rows = shared_base_rows(args.presets, args.rank, args.method, args.precision, args.resolution,
                            args.activation_checkpointing, args.batch_size, tiny_rank=args.tiny_rank)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
