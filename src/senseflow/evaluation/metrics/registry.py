"""Metric names -> implementations, imported lazily (each metric pulls its own transformers classes).

The evaluation runner, presets and ``train.eval`` name metrics by these strings; ``build_metric`` is
the one place that turns a name, a local weights path and options into a :class:`.base.Metric`.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch

from ...teachers.base import SenseflowError
from .base import Metric

METRICS: dict[str, str] = {
    "fid": "senseflow.evaluation.metrics.fid:FID",
    "fid_t": "senseflow.evaluation.metrics.fid:FIDT",
    "clip_score": "senseflow.evaluation.metrics.clip_score:CLIPScore",
    "pickscore": "senseflow.evaluation.metrics.pickscore:PickScore",
    "hps": "senseflow.evaluation.metrics.hps:HPS",
    "image_reward": "senseflow.evaluation.metrics.image_reward:ImageReward",
    "aesthetic": "senseflow.evaluation.metrics.aesthetic:Aesthetic",
    "fd_dinov2": "senseflow.evaluation.metrics.fd_dinov2:FDDinov2",
    "compositional": "senseflow.evaluation.metrics.compositional:Compositional",
}


def metric_class(name: str) -> type[Metric]:
    """The class behind ``name`` (its ``requires`` can be read without loading any weights)."""
    if name not in METRICS:
        raise SenseflowError(f"unknown metric {name!r}; known metrics: {', '.join(METRICS)}")
    module, _, cls = METRICS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def metric_requires(name: str, **options: Any) -> frozenset[str]:
    """What the runner must provide for ``name`` with these options, without loading any weights.

    Usually the class's ``requires``; a metric whose inputs depend on an option (``fd_dinov2`` with
    ``against="reference"``) answers through a ``requires_for(**options)`` classmethod.
    """
    cls = metric_class(name)
    hook = getattr(cls, "requires_for", None)
    return frozenset(hook(**options)) if hook is not None else cls.requires


def build_metric(name: str, weights: str | None, *, device: torch.device, batch_size: int = 32,
                 **options: Any) -> Metric:
    """Build metric ``name`` from local ``weights`` (a file or folder; see docs/evaluation_metrics.md)."""
    cls = metric_class(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "weights", "device",
                                                                                    "batch_size")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise SenseflowError(f"metric {name!r} has no option {', '.join(unknown)}; its options: "
                             f"{', '.join(accepted) or 'none'}")
    return cls(weights, device=torch.device(device), batch_size=batch_size, **options)
