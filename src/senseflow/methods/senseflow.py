"""SenseFlow = DMD2 + Implicit Distribution Alignment (IDA) + Intra-Segment Guidance (ISG) + adversarial term.

Order within an iteration (paper, Sec. "total"): G steps every ``ttur`` iterations, IDA follows
immediately, then the fake score and the discriminator update.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ..generator import GeneratorInput
from ..rng import RandomStreams
from .base import Batch, DistillationModels, GuidanceSpec
from .dmd2 import DMD2, DMD2Config, IDAPlan


class SenseFlowConfig(DMD2Config):
    """DMD2 settings plus IDA and ISG (defaults: SD3.5-Medium-like values from ALGORITHMS.md)."""

    name: Literal["senseflow"] = "senseflow"  # type: ignore[assignment]
    ida: bool = True
    ida_lambda: float = Field(0.98, gt=0.0, le=1.0, description="phi <- lam*phi + (1-lam)*theta after each G step")
    isg_weight: float = Field(0.5, ge=0.0, description="lambda_ISG (0 disables ISG)")
    isg_margin: float = Field(50.0, ge=0.0, description="margin m around t_mid, in index units (of 1000)")
    isg_loss: Literal["pseudo_huber", "l2"] = Field(
        "pseudo_huber", description="released code: pseudo-Huber; paper text: L2")
    isg_huber_c: float = Field(1e-3, gt=0.0)
    isg_guidance: GuidanceSpec = GuidanceSpec(cfg=(2.0, 4.0))
    adversarial_time_weight: Literal["none", "omega"] = "omega"


class SenseFlow(DMD2):
    name = "senseflow"

    def __init__(self, models: DistillationModels, config: SenseFlowConfig) -> None:
        super().__init__(models, config)
        self.config: SenseFlowConfig = config
        self._ida: IDAPlan | None = None  # built on first use: after FSDP2 has sharded the networks

    @torch.no_grad()
    def after_step(self, phase: str) -> dict[str, float]:
        if phase == "generator" and self.config.ida:
            if self._ida is None:
                self._ida = IDAPlan(self.models.fake_score.backbone, self.models.generator.denoiser.backbone)
            self._ida.apply(self.config.ida_lambda)
        return {}

    def extra_generator_losses(self, gin: GeneratorInput, x: Tensor, batch: Batch,
                               rng: RandomStreams) -> dict[str, tuple[float, Tensor]]:
        if self.config.isg_weight <= 0:
            return {}
        return {"isg": (self.config.isg_weight, self.isg_loss(gin, x, batch, rng))}

    def sample_mid_time(self, gin: GeneratorInput, rng: RandomStreams) -> Tensor:
        """``t_mid`` uniform in ``(tau_next + m, tau_i - m)`` in unit (index) space, then mapped.

        If a segment is shorter than ``2 m`` the midpoint of the segment is used.
        """
        schedule = self.schedule
        u_i = schedule.to_unit(gin.t)
        u_next = schedule.to_unit(gin.t_next)
        m = self.config.isg_margin / schedule.num_train_timesteps
        lo, hi = u_next + m, u_i - m
        mid = 0.5 * (u_i + u_next)
        empty = hi <= lo
        lo = torch.where(empty, mid, lo)
        hi = torch.where(empty, mid, hi)
        r = torch.rand(gin.t.shape, generator=rng.local, device=rng.device, dtype=torch.float64).to(lo.device)
        return schedule.from_unit(lo + (hi - lo) * r)

    def isg_target(self, gin: GeneratorInput, t_mid: Tensor, batch: Batch, rng: RandomStreams) -> Tensor:
        """Teacher Euler step ``tau_i -> t_mid``, then a no-grad G step ``t_mid -> tau_next``."""
        schedule = self.schedule
        gen = self.models.generator
        with torch.no_grad():
            x0_teacher = self.models.teacher(gin.x_t, gin.t, batch.cond, self.config.isg_guidance.sample(rng))
            x_mid = schedule.step(gin.x_t, x0_teacher, gin.t, t_mid)
            x0_mid = gen(x_mid, t_mid, batch.cond)
            return schedule.step(x_mid, x0_mid, t_mid, gin.t_next)

    def isg_loss(self, gin: GeneratorInput, x0_hat: Tensor, batch: Batch, rng: RandomStreams) -> Tensor:
        t_mid = self.sample_mid_time(gin, rng)
        x_tar = self.isg_target(gin, t_mid, batch, rng)
        x_hat = self.schedule.step(gin.x_t, x0_hat, gin.t, gin.t_next)
        diff = x_hat.float() - x_tar.float()
        if self.config.isg_loss == "l2":
            return diff.pow(2).mean()
        c = self.config.isg_huber_c
        return (torch.sqrt(diff.pow(2) + c * c) - c).mean()
