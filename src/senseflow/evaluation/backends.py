"""Metric names -> :class:`~senseflow.evaluation.metrics.base.Metric` instances.

The built-in ``toy`` backend lives here; every other metric comes from
``senseflow.evaluation.metrics.registry`` (``METRICS`` and ``build_metric``), imported lazily so that
the runner works -- and fails with one clear line for a real metric -- wherever that registry is
absent.  Weights are always a local path given by the user; nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..teachers.base import SenseflowError
from .metrics.base import Metric

BUILTIN: dict[str, str] = {"toy": "toy-world evaluator: attr_acc, exact, fd_real, fd_teacher, diversity (shipped weights)"}


@dataclass(frozen=True)
class MetricSpec:
    """One metric of an evaluation: its name, its local weights and its protocol options."""

    name: str
    weights: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


def _registry():
    import importlib

    name = f"{__package__}.metrics.registry"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None
        raise


def available_metrics() -> dict[str, str]:
    """Every metric name this installation can build, with a one-line description."""
    out = dict(BUILTIN)
    reg = _registry()
    if reg is not None:
        out.update(getattr(reg, "METRICS", {}))
    return out


def check_metric_names(specs: list[MetricSpec]) -> None:
    known = available_metrics()
    for spec in specs:
        if spec.name not in known:
            hint = "" if _registry() is not None else " (this installation has no senseflow.evaluation.metrics.registry)"
            raise SenseflowError(f"unknown metric {spec.name!r}{hint}; available: {', '.join(sorted(known))}")


def build(spec: MetricSpec, device: torch.device, batch_size: int = 32) -> Metric:
    """Build one metric (loads and checks its weights: a missing folder is one line naming the layout)."""
    if spec.name == "toy":
        from .toy_metric import ToyMetric
        return ToyMetric(spec.weights)
    reg = _registry()
    if reg is None:
        raise SenseflowError(f"metric {spec.name!r} needs senseflow.evaluation.metrics.registry, which this "
                             f"installation lacks; only {', '.join(BUILTIN)} is built in")
    return reg.build_metric(spec.name, spec.weights, device=device, batch_size=batch_size, **spec.options)
