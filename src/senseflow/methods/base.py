"""The method contract: losses per network and the update policy, nothing else.

A method never sees devices, files, FSDP or logging back-ends.  The trainer asks it which
networks step on an iteration (:meth:`Method.phases`), the loss for each (:meth:`Method.loss`),
and calls :meth:`Method.after_step` right after each optimiser step (IDA lives there).
Phase names are network names, and each network has its own optimiser.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Union

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from ..configbase import StrictModel
from ..generator import FewStepGenerator
from ..rng import RandomStreams
from ..schedules import as_time
from ..teachers.base import Conditioning, Denoiser, Guidance

Range = Union[float, tuple[float, float]]


class GuidanceSpec(StrictModel):
    """Guidance for one network call: a fixed value or a ``[low, high]`` range drawn once per batch.

    Range draws use the shared random stream, so every rank uses the same scale (as a single
    large batch would).  ``interval`` limits CFG to the samples whose noise level lies in it
    (Kynkaenniemi et al. 2024, "Applying guidance in a limited interval"): guidance at the highest
    noise levels is what sharpens a distribution beyond the data's, so dropping it there trades
    little prompt following for a lot of distribution quality.  The released trainers guide at
    every noise level (``interval: null``).
    """

    cfg: Range | None = None
    embedded: Range | None = None
    interval: tuple[float, float] | None = Field(
        None, description="apply cfg only where the noise level sigma(t) in [0, 1] (flows: sigma = t) lies in "
                          "[low, high]; elsewhere no CFG (cfg 1). null = every noise level (released)")

    @field_validator("cfg", "embedded")
    @classmethod
    def _check(cls, v: Range | None) -> Range | None:
        if isinstance(v, tuple):
            if v[0] > v[1]:
                raise ValueError(f"range [{v[0]}, {v[1]}] must have low <= high")
            if v[0] < 0:
                raise ValueError("guidance must be >= 0")
        elif v is not None and v < 0:
            raise ValueError("guidance must be >= 0")
        return v

    @field_validator("interval")
    @classmethod
    def _check_interval(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not (0.0 <= v[0] <= v[1] <= 1.0):
            raise ValueError(f"interval [{v[0]}, {v[1]}] must satisfy 0 <= low <= high <= 1 (noise levels sigma)")
        return v

    def sample(self, rng: RandomStreams, sigma: Tensor | None = None) -> Guidance:
        """This call's guidance; with ``interval``, ``sigma`` (``[B]``, the samples' noise levels) is required
        and the CFG scale becomes per-sample (1 outside the interval)."""
        def draw(v: Range | None) -> float | None:
            if v is None or not isinstance(v, tuple):
                return v
            return rng.shared_uniform(v[0], v[1])
        cfg = draw(self.cfg)
        if self.interval is not None and cfg is not None:
            if sigma is None:
                raise ValueError("a guidance interval needs the samples' noise levels (sigma)")
            low, high = self.interval
            inside = (sigma >= low) & (sigma <= high)
            cfg = torch.where(inside, torch.as_tensor(float(cfg), dtype=torch.float64, device=sigma.device),
                              torch.ones((), dtype=torch.float64, device=sigma.device))
        return Guidance(cfg=cfg, embedded=draw(self.embedded))


@dataclass
class Batch:
    """One (micro-)batch: prompts, their conditioning and, when the data has them, real latents."""

    prompts: list[str]
    cond: Conditioning
    latents: Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def split(self, parts: int) -> list["Batch"]:
        """Split into ``parts`` micro-batches of equal size (gradient accumulation)."""
        n = len(self)
        if parts == 1:
            return [self]
        if parts < 1 or n % parts:
            raise ValueError(f"batch of {n} cannot be split into {parts} equal micro-batches")
        size = n // parts
        out = []
        for i in range(parts):
            sl = slice(i * size, (i + 1) * size)
            out.append(Batch(self.prompts[sl], self.cond[sl], None if self.latents is None else self.latents[sl]))
        return out


@dataclass
class LossOutput:
    """A scalar loss to backpropagate and detached values to log."""

    loss: Tensor
    logs: dict[str, Tensor | float] = field(default_factory=dict)


@dataclass
class DistillationModels:
    """The networks of a distillation run.  The teacher is frozen; the others may train."""

    teacher: Denoiser
    generator: FewStepGenerator
    fake_score: Denoiser | None = None
    discriminator: nn.Module | None = None


class Method(ABC):
    """Losses + update policy (see module docstring)."""

    name: str = "method"

    def __init__(self, models: DistillationModels) -> None:
        self.models = models

    @property
    def schedule(self):
        return self.models.teacher.schedule

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.models.teacher.adapter.latent_shape())

    def guidance(self, spec: GuidanceSpec, rng: RandomStreams, t: Tensor) -> Guidance:
        """``spec``'s guidance for a forward at native times ``t`` (its ``interval`` reads their noise levels)."""
        sigma = self.schedule.sigma(as_time(t)) if spec.interval is not None else None
        return spec.sample(rng, sigma)

    @abstractmethod
    def networks(self) -> dict[str, nn.Module]:
        """Trainable networks by phase name; each gets its own optimiser."""

    def param_groups(self, name: str, params: list[nn.Parameter]) -> list[dict] | None:
        """Optimiser parameter groups for network ``name`` (covering exactly ``params``, the trainable ones the
        trainer found), or None for one group with the optimiser's settings."""
        return None

    @abstractmethod
    def phases(self, iteration: int) -> list[str]:
        """Names of the networks that step on ``iteration``, in order."""

    @abstractmethod
    def loss(self, phase: str, batch: Batch, rng: RandomStreams) -> LossOutput:
        """The loss whose gradient updates network ``phase`` on this (micro-)batch."""

    @torch.no_grad()
    def after_step(self, phase: str) -> dict[str, float]:
        """Hook run right after the optimiser step of ``phase`` (IDA)."""
        return {}


def per_sample_mean(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch."""
    return x.flatten(1).mean(dim=1)


def per_sample_sum(x: Tensor) -> Tensor:
    return x.flatten(1).sum(dim=1)
