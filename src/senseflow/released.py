"""What the released trainers do where senseflow offers a choice (issue #12, docs/deviations.md).

Each teacher family's adapter names its released forms in a :class:`ReleasedForms` (``adapter.released``);
the methods ask for it when ``method.reference`` (or a per-item key) is ``released`` and compute the
laws below, so no method branches on a family name.  The functions are the released formulas
written once over the schedule contract:

* ``omega`` -- the adversarial time weight at G's input anchor: ``alpha_sq`` = ``(1 - sigma)^2``
  (FLUX trainer; the paper's form), ``alpha`` = ``sqrt(abar_t)`` (SDXL trainer), ``sigma_table_sq``
  = the SD3.5 trainer's ``noise_scheduler.sigmas[t] ** 2``: the *unflipped* (descending) sigma
  table read at the anchor's index, ``table[i] = shift((1000 - i) / 1000)``.
* ISG grids -- where the released trainers draw the intermediate time as an integer:
  ``unit_index`` (SD3.5, SDXL: index ``i`` of the 1000-step table, native time
  ``from_unit((i + 1) / 1000)``), ``native_1000`` (FLUX: ``1000 sigma`` of the shifted anchors).
  The last segment ends at grid index 0 (SD3.5 sigma 0.003, SDXL index 0, FLUX sigma 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .schedules import NoiseSchedule, as_time

OmegaLaw = Literal["alpha_sq", "alpha", "sigma_table_sq"]
IsgForm = Literal["two_step", "x0_regression"]
IsgGrid = Literal["unit_index", "native_1000"]


@dataclass(frozen=True)
class ReleasedForms:
    """A family's released SenseFlow trainer, where it differs from the paper's formulas.

    The defaults are the paper's forms (families without a released SenseFlow trainer: SANA, custom).
    """

    omega: OmegaLaw = "alpha_sq"
    isg_form: IsgForm = "two_step"
    isg_grid: IsgGrid = "unit_index"


PAPER = ReleasedForms()


def _snap(x: Tensor) -> Tensor:
    """Round values that are integers up to float noise (anchor indices like 749.0000000001)."""
    r = torch.round(x)
    return torch.where((x - r).abs() < 1e-6, r, x)


def omega(schedule: NoiseSchedule, t: Tensor, law: OmegaLaw) -> Tensor:
    """The adversarial time weight at native time ``t`` under a released law (float64)."""
    t = as_time(t)
    if law == "alpha_sq":
        return schedule.alpha(t) ** 2
    if law == "alpha":
        return schedule.alpha(t)
    if law == "sigma_table_sq":
        T = schedule.num_train_timesteps
        idx = grid_index(schedule, t, "unit_index").clamp(0, T - 1)
        return schedule.sigma(schedule.from_unit((T - idx) / T)) ** 2
    raise ValueError(f"unknown omega law {law!r}")


def grid_index(schedule: NoiseSchedule, t: Tensor, grid: IsgGrid) -> Tensor:
    """Native time -> (float) index on a released grid; clean data maps to -1 on ``unit_index``."""
    t = as_time(t)
    if grid == "unit_index":
        return _snap(schedule.to_unit(t) * schedule.num_train_timesteps - 1.0)
    if grid == "native_1000":
        return _snap(schedule.sigma(t) * 1000.0)
    raise ValueError(f"unknown ISG grid {grid!r}")


def grid_time(schedule: NoiseSchedule, idx: Tensor, grid: IsgGrid) -> Tensor:
    """Index on a released grid -> native time."""
    idx = as_time(idx)
    if grid == "unit_index":
        return schedule.from_unit((idx + 1.0) / schedule.num_train_timesteps)
    if grid == "native_1000":
        return idx / 1000.0  # sigma = t for rectified flow, the only family on this grid
    raise ValueError(f"unknown ISG grid {grid!r}")


def segment_end(schedule: NoiseSchedule, t_next: Tensor, grid: IsgGrid) -> Tensor:
    """Where the released ISG ends a segment: ``t_next``, or grid index 0 after the last anchor."""
    t_next = as_time(t_next)
    end = grid_time(schedule, torch.zeros_like(t_next), grid)
    return torch.where(t_next == schedule.t_clean, end, t_next)


def integer_mid_index(lo: Tensor, hi: Tensor, generator: torch.Generator | None) -> Tensor:
    """``randint(ceil(lo), floor(hi) + 1)`` per sample (the released ``torch.randint`` bounds).

    An empty range (segment shorter than two margins) falls back to the rounded midpoint.
    """
    a, b = torch.ceil(_snap(lo)), torch.floor(_snap(hi))
    empty = b < a
    mid = torch.round(0.5 * (lo + hi))
    a, b = torch.where(empty, mid, a), torch.where(empty, mid, b)
    r = torch.rand(a.shape, generator=generator, device=generator.device if generator is not None else "cpu",
                   dtype=torch.float64).to(a.device)
    return torch.minimum(a + torch.floor(r * (b - a + 1.0)), b)


__all__ = ["IsgForm", "IsgGrid", "OmegaLaw", "PAPER", "ReleasedForms", "grid_index", "grid_time",
           "integer_mid_index", "omega", "segment_end"]
