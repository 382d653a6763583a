"""SiD-DiT: Score identity Distillation for flow-matching DiTs (data-free).

Generator loss (ALGORITHMS.md), with ``f_r`` / ``f_f`` the teacher / fake ``x0`` predictions at
``x_t = (1 - t) x_g + t eps`` -- NOT detached, so gradients reach ``x_g`` through both frozen
networks:

    L = lambda_sid / B * sum_b w_t * sum_elements[(f_r - f_f) * ((f_r - x_g) - alpha (f_r - f_f))]

Long-and-short guidance: teacher with CFG kappa4, fake with kappa2 in G's loss, and the fake
network *trained* on its own CFG-combined prediction (kappa1).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..configbase import StrictModel, TimeSamplerConfig
from ..rng import RandomStreams
from ..teachers.base import Conditioning
from .base import Batch, DistillationModels, GuidanceSpec, LossOutput, Method, per_sample_mean, per_sample_sum

Weighting = Literal["one_minus_t", "legacy", "inv_t", "one_minus_t_sq", "snr_sqrt", "snr"]


class SiDConfig(StrictModel):
    name: Literal["sid"] = "sid"
    alpha: float = 1.0
    weighting: Weighting = Field(
        "one_minus_t", description="w_t: 1-t (paper default), legacy 1/mean|x_g-f_r|, or Fig. 2's SNR-based options")
    lambda_sid: float = Field(100.0, gt=0.0)
    teacher_guidance: GuidanceSpec = GuidanceSpec(cfg=4.5)  # kappa4
    fake_guidance: GuidanceSpec = GuidanceSpec(cfg=4.5)  # kappa2
    fake_train_guidance: GuidanceSpec = GuidanceSpec(cfg=4.5)  # kappa1
    time: TimeSamplerConfig = TimeSamplerConfig(kind="logit_normal", mean=math.log(2.0), std=1.6, shift=False)
    score_gradients: Literal["through", "detached"] = Field(
        "through", description="'detached' stops gradients through f_r/f_f (diagnostic; SiD proper is 'through')")
    drop_nonfinite: bool = True


class SiD(Method):
    """One fake-score update, then one generator update, every iteration."""

    name = "sid"

    def __init__(self, models: DistillationModels, config: SiDConfig) -> None:
        super().__init__(models)
        if models.fake_score is None:
            raise ValueError("SiD needs a fake score network")
        self.config = config
        self.time = config.time.build()

    def networks(self) -> dict[str, nn.Module]:
        return {"generator": self.models.generator, "fake_score": self.models.fake_score}

    def phases(self, iteration: int) -> list[str]:
        return ["fake_score", "generator"]

    def loss(self, phase: str, batch: Batch, rng: RandomStreams) -> LossOutput:
        if phase == "generator":
            return self.generator_loss(batch, rng)
        if phase == "fake_score":
            return self.fake_score_loss(batch, rng)
        raise ValueError(f"SiD has no phase {phase!r}")

    # -- pieces --------------------------------------------------------------------------------
    def rollout(self, batch: Batch, rng: RandomStreams, grad: bool) -> tuple[Tensor, Tensor]:
        """k ~ U{1..K} (shared): k-1 no-grad stochastic steps, then the k-th with/without grad."""
        gen = self.models.generator
        k = rng.shared_randint(1, gen.num_steps + 1)
        noise = rng.randn((len(batch), *self.latent_shape))
        x = gen.simulate(noise, batch.cond, k - 1, rng)
        t = gen.time(k - 1, len(batch), x.device)
        with torch.set_grad_enabled(grad):
            return gen(x, t, batch.cond), t

    def weight(self, t: Tensor, x_g: Tensor, f_r: Tensor) -> Tensor:
        """Per-sample ``w_t``; SNR-based options use ``t' = sigma / (alpha + sigma)`` (= t for flows)."""
        w = self.config.weighting
        if w == "legacy":
            return 1.0 / per_sample_mean((x_g - f_r).abs()).detach().clamp_min(1e-8)
        a, s = self.schedule.alpha(t), self.schedule.sigma(t)
        tt = (s / (a + s)).clamp(1e-6, 1.0 - 1e-6)
        out = {"one_minus_t": 1.0 - tt, "inv_t": 1.0 / tt, "one_minus_t_sq": (1.0 - tt) ** 2,
               "snr_sqrt": (1.0 - tt) / tt, "snr": ((1.0 - tt) / tt) ** 2}[w]
        return out.to(device=x_g.device, dtype=torch.float32)

    def reduce(self, per_sample: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        """Sum over finite samples, divided by the (local) batch size; returns (loss, #dropped)."""
        finite = torch.isfinite(per_sample)
        if not self.config.drop_nonfinite:
            finite = torch.ones_like(finite)
        total = torch.where(finite, per_sample, torch.zeros_like(per_sample)).sum()
        return scale * total / per_sample.shape[0], (~finite).sum()

    def generator_loss(self, batch: Batch, rng: RandomStreams) -> LossOutput:
        x_g, _ = self.rollout(batch, rng, grad=True)
        return self.sid_loss(x_g, batch.cond, rng)

    def sid_loss(self, x_g: Tensor, cond: Conditioning, rng: RandomStreams) -> LossOutput:
        """The SiD generator loss for generator samples ``x_g`` (computed in fp32)."""
        x_g = x_g.float()
        n = x_g.shape[0]
        t = self.time.sample(n, self.schedule, rng.local, rng.device).to(x_g.device)
        eps = rng.randn_like(x_g)
        x_t = self.schedule.add_noise(x_g, eps, t)
        f_r = self.models.teacher(x_t, t, cond, self.config.teacher_guidance.sample(rng)).float()
        f_f = self.models.fake_score(x_t, t, cond, self.config.fake_guidance.sample(rng)).float()
        if self.config.score_gradients == "detached":
            f_r, f_f = f_r.detach(), f_f.detach()
        diff = f_r - f_f
        per_sample = per_sample_sum(diff * ((f_r - x_g) - self.config.alpha * diff))
        per_sample = per_sample * self.weight(t, x_g, f_r)
        loss, dropped = self.reduce(per_sample, self.config.lambda_sid)
        return LossOutput(loss, {"loss_sid": loss.detach(), "sid_dropped": dropped})

    def fake_score_loss(self, batch: Batch, rng: RandomStreams) -> LossOutput:
        with torch.no_grad():
            x_g, _ = self.rollout(batch, rng, grad=False)
        x_g = x_g.float()
        t = self.time.sample(x_g.shape[0], self.schedule, rng.local, rng.device).to(x_g.device)
        eps = rng.randn_like(x_g)
        x_t = self.schedule.add_noise(x_g, eps, t)
        pred = self.models.fake_score.native(x_t, t, batch.cond, self.config.fake_train_guidance.sample(rng))
        target = self.schedule.target(x_g, eps, t)
        loss, dropped = self.reduce(per_sample_sum((pred.float() - target.float()) ** 2), 1.0)
        return LossOutput(loss, {"loss_fake": loss.detach(), "fake_dropped": dropped})
