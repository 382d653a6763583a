"""SenseFlow = DMD2 + Implicit Distribution Alignment (IDA) + Intra-Segment Guidance (ISG) + adversarial term.

Order within an iteration (paper, Sec. "total"): G steps every ``ttur`` iterations, IDA follows
immediately, then the fake score and the discriminator update.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from .. import released as forms
from ..generator import GeneratorInput
from ..rng import RandomStreams
from ..schedules import expand_like
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
    isg_form: Literal["released", "paper"] = Field(
        "released", description="released = the family's trainer (SDXL: pseudo-Huber(sqrt(abar_end) (x0_G - x0_teacher)), "
                                "an x0 regression onto the CFG teacher; SD3.5/FLUX: the two-step path); paper = two-step")
    isg_mid_time: Literal["released", "paper"] = Field(
        "released", description="t_mid: released = an integer on the family's grid in [end + m, t - m] (SD3.5/SDXL "
                                "table index, FLUX 1000 sigma); paper = uniform in unit time, then shifted")
    isg_last_target: Literal["released", "clean"] = Field(
        "released", description="end of the last ISG segment: released = grid index 0 (SD3.5 sigma 0.003, SDXL index "
                                "0, FLUX 0); clean = clean data")
    adversarial_time_weight: Literal["none", "omega"] = "omega"

    PAPER_FORMS: ClassVar[dict[str, Any]] = {**DMD2Config.PAPER_FORMS, "isg_form": "paper", "isg_mid_time": "paper",
                                             "isg_last_target": "clean"}


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

    def segment_end(self, gin: GeneratorInput) -> Tensor:
        """Where ISG's segment from ``gin.t`` ends (``method.isg_last_target``)."""
        if self.config.isg_last_target == "clean":
            return gin.t_next
        return forms.segment_end(self.schedule, gin.t_next, self.released.isg_grid)

    def sample_mid_time(self, gin: GeneratorInput, rng: RandomStreams) -> Tensor:
        """``t_mid`` between the segment end + m and ``tau_i`` - m (margin m in index units).

        paper: uniform in unit (index) space, then mapped.  released: an integer on the family's
        grid (``randint(ceil(end + m), floor(t - m) + 1)``).  A segment shorter than ``2 m`` gives
        its midpoint.
        """
        schedule = self.schedule
        t_end = self.segment_end(gin)
        if self.config.isg_mid_time == "released":
            grid = self.released.isg_grid
            hi = forms.grid_index(schedule, gin.t, grid) - self.config.isg_margin
            lo = forms.grid_index(schedule, t_end, grid).clamp_min(0) + self.config.isg_margin
            idx = forms.integer_mid_index(lo, hi, rng.local)
            return forms.grid_time(schedule, idx.to(gin.t.device), grid)
        u_i = schedule.to_unit(gin.t)
        u_next = schedule.to_unit(t_end)
        m = self.config.isg_margin / schedule.num_train_timesteps
        lo, hi = u_next + m, u_i - m
        mid = 0.5 * (u_i + u_next)
        empty = hi <= lo
        lo = torch.where(empty, mid, lo)
        hi = torch.where(empty, mid, hi)
        r = torch.rand(gin.t.shape, generator=rng.local, device=rng.device, dtype=torch.float64).to(lo.device)
        return schedule.from_unit(lo + (hi - lo) * r)

    @torch.no_grad()
    def isg_teacher_x0(self, gin: GeneratorInput, batch: Batch, rng: RandomStreams) -> Tensor:
        """The teacher's ``x0`` at G's input ``(x_t, tau_i)`` with ISG's guidance: where both ISG forms start."""
        return self.models.teacher(gin.x_t, gin.t, batch.cond, self.guidance(self.config.isg_guidance, rng, gin.t))

    def isg_target(self, gin: GeneratorInput, t_mid: Tensor, batch: Batch, rng: RandomStreams,
                   t_end: Tensor | None = None) -> Tensor:
        """Teacher Euler step ``tau_i -> t_mid``, then a no-grad G step ``t_mid -> t_end`` (default ``tau_next``)."""
        schedule = self.schedule
        gen = self.models.generator
        t_end = gin.t_next if t_end is None else t_end
        with torch.no_grad():
            x0_teacher = self.isg_teacher_x0(gin, batch, rng)
            x_mid = schedule.step(gin.x_t, x0_teacher, gin.t, t_mid)
            x0_mid = gen(x_mid, t_mid, batch.cond)
            return schedule.step(x_mid, x0_mid, t_mid, t_end)

    def isg_diff(self, gin: GeneratorInput, x0_hat: Tensor, batch: Batch, rng: RandomStreams) -> Tensor:
        """``x_hat - sg(x_tar)`` at the segment end, in the configured form."""
        t_end = self.segment_end(gin)
        if self.config.isg_form == "released" and self.released.isg_form == "x0_regression":
            # released SDXL: target and prediction share G(x_mid)'s eps, and the target's x0 is rebuilt
            # from the teacher's own eps, so x_hat - x_tar = alpha_end (x0_G - x0_teacher) at x_t
            x0_teacher = self.isg_teacher_x0(gin, batch, rng)
            a_end = expand_like(self.schedule.alpha(t_end), x0_hat.float())
            return a_end * (x0_hat.float() - x0_teacher.float())
        t_mid = self.sample_mid_time(gin, rng)
        x_tar = self.isg_target(gin, t_mid, batch, rng, t_end)
        x_hat = self.schedule.step(gin.x_t, x0_hat, gin.t, t_end)
        return x_hat.float() - x_tar.float()

    def isg_loss(self, gin: GeneratorInput, x0_hat: Tensor, batch: Batch, rng: RandomStreams) -> Tensor:
        diff = self.isg_diff(gin, x0_hat, batch, rng)
        if self.config.isg_loss == "l2":
            return diff.pow(2).mean()
        c = self.config.isg_huber_c
        return (torch.sqrt(diff.pow(2) + c * c) - c).mean()
