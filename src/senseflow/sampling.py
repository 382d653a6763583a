"""Many-step sampling of a (teacher) denoiser: the baseline a few-step student is compared against."""

from __future__ import annotations

import torch
from torch import Tensor

from .teachers.base import Conditioning, Denoiser, Guidance


@torch.no_grad()
def sample_ode(denoiser: Denoiser, noise: Tensor, cond: Conditioning, steps: int,
               guidance: Guidance | None = None) -> Tensor:
    """Euler (DDIM for DDPM) sampling with ``steps`` uniform steps in unit time, mapped through the shift."""
    schedule = denoiser.schedule
    units = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    times = schedule.from_unit(units)
    x = noise
    n = noise.shape[0]
    for i in range(steps):
        t = times[i].expand(n).to(noise.device)
        t_next = times[i + 1].expand(n).to(noise.device)
        x0 = denoiser(x, t, cond, guidance)
        x = schedule.step(x, x0, t, t_next)
    return x
