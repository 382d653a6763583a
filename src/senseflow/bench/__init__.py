"""Benchmarks and memory estimates: ``senseflow bench`` (see docs/performance.md).

* :mod:`.presets` -- architecture presets (tiny CPU models; real SD3.5-Medium/Large, FLUX.1-dev and
  SDXL shapes with random weights);
* :mod:`.runner` -- runs a method through the real trainer and measures step time, images/s,
  FLOPs/MFU, peak memory and the framework overhead;
* :mod:`.memory` -- the per-device memory estimate (weights, gradients, optimiser state, FSDP
  sharding, activations measured on the meta device).

Heavy imports (diffusers, the trainer) happen inside the functions.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BenchSettings", "PRESETS", "estimate_memory", "get_preset", "run_benchmark"]


def __getattr__(name: str) -> Any:
    if name in ("BenchSettings", "run_benchmark"):
        from . import runner
        return getattr(runner, name)
    if name == "estimate_memory":
        from .memory import estimate_memory
        return estimate_memory
    if name in ("PRESETS", "get_preset"):
        from . import presets
        return getattr(presets, name)
    raise AttributeError(name)
