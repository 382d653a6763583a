"""Non-finite values never reach disk, and a diverged run never ends with exit 0.

The trainer already skips a step whose gradient norm is non-finite.  A finite gradient can still
produce non-finite weights (an overflowing update in a low-precision network, an absurd lr), so
after every optimiser step :func:`check_parameters` takes the parameters' total norm (one fused
``foreach`` norm, like the gradient norm next to it) and stops the run with
:class:`TrainingDiverged` -- a one-line error and a non-zero exit, the latest good checkpoint
kept -- if it is not finite.  :func:`require_finite` is the last line of defence in every writer
of weights (checkpoints, the exported student).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from ..teachers.base import SenseflowError


class TrainingDiverged(SenseflowError):
    """The weights became non-finite: the run stops before anything non-finite is written."""


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # DTensor shards: each rank checks its own


def first_nonfinite(tensors: Mapping[str, Any] | Iterable[tuple[str, Any]], prefix: str = "") -> str | None:
    """The name of the first floating tensor (searched through nested dicts / lists) with a NaN or inf."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            local = _local(value)
            if local.is_floating_point() and local.numel() and not bool(torch.isfinite(local).all()):
                return name
        elif isinstance(value, Mapping):
            found = first_nonfinite(value, f"{name}.")
            if found:
                return found
        elif isinstance(value, (list, tuple)):
            found = first_nonfinite(list(enumerate(value)), f"{name}.")
            if found:
                return found
    return None


def require_finite(tensors: Mapping[str, Any], what: str) -> None:
    """Refuse (one line) to write ``what`` when any of its tensors holds a NaN or an inf."""
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise TrainingDiverged(f"refusing to write {what}: {bad} holds non-finite values (NaN/inf); the run "
                               "diverged -- the previous checkpoint is kept")


def check_parameters(params: list[torch.nn.Parameter], phase: str, step: int, grad_norm: torch.Tensor,
                     lr: float) -> torch.Tensor:
    """The parameters' total norm after an optimiser step; :class:`TrainingDiverged` if it is not finite."""
    from .distributed import full_tensor

    norm = full_tensor(torch.nn.utils.get_total_norm([p.detach() for p in params]))
    if not bool(torch.isfinite(norm)):
        raise TrainingDiverged(
            f"training diverged at step {step + 1}: the {phase} weights became non-finite after a finite-gradient "
            f"optimiser step (grad norm {float(grad_norm):.3g}, lr {lr:g}); nothing of this step is saved and the "
            f"latest checkpoint is kept: lower optim.{phase}.lr, keep train.grad_clip, or train in fp32")
    return norm
