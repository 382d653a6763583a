"""SiD-DiT: Score identity Distillation for flow-matching DiTs (data-free).

Generator loss (ALGORITHMS.md), with ``f_r`` / ``f_f`` the teacher / fake ``x0`` predictions at
``x_t = (1 - t) x_g + t eps`` -- NOT detached, so gradients reach ``x_g`` through both frozen
networks:

    L = lambda_sid / B * sum_b w_t * sum_elements[(f_r - f_f) * ((f_r - x_g) - alpha (f_r - f_f))]

Long-and-short guidance: teacher with CFG kappa4, fake with kappa2 in G's loss, and the fake
network *trained* on its own CFG-combined prediction (kappa1).

SiD2a (data-aided, ``adversarial: true``): the fake network doubles as a parameter-free
discriminator -- its hidden states after the final norm layer, averaged over tokens, are ``[B, D]``
logits (:mod:`senseflow.discriminators.dit_pool`).  Schedule (the released SiD-DiT code; images
counted globally, before the current iteration: ``images = iteration * images_per_iteration``):

* ``images < adversarial_freeze_images`` (20k): the generator is frozen -- only the fake network
  (score + discriminator) trains;
* ``adversarial_freeze_images <= images < adversarial_warmup_images`` (40k): G trains on ``L_SiD``;
* ``images >= adversarial_warmup_images``: ``L_G = (1 - w) L_SiD + w L_adv`` with ``w =
  adversarial_weight`` (0.5 = the paper's ``0.5 L_SiD + 0.5 L_adv``).

The fake update always adds ``discriminator_weight * sum_b numel * (BCE(D(x_t^real) -> 1) +
BCE(D(x_t^fake) -> 0)) / 2 / B`` (BCE averaged over a sample's logits; real latents noised with the
SAME ``t`` and ``eps`` as the fakes).  ``L_adv = sum_b w_t * numel * BCE(D(x_t) -> 1) / B`` uses the
fake forward of the SiD loss itself (no extra network call).  Both are scaled by the number of
latent elements per sample (``numel``) to match the sum-over-elements convention of ``L_SiD`` and
of the fake loss, as the released code does.  With ``adversarial: false`` nothing changes.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
from pydantic import Field
from torch import Tensor, nn

from ..configbase import StrictModel, TimeSamplerConfig
from ..generator import FewStepGenerator
from ..discriminators.dit_pool import (LOGIT_CLAMP, PooledFeatureDiscriminator, bce_generator, bce_real_fake,
                                       tie_unused_output)
from ..rng import RandomStreams
from ..schedules import NoiseSchedule, anchors
from ..teachers.base import Conditioning, Guidance, SenseflowError
from .base import Batch, DistillationModels, GuidanceSpec, LossOutput, Method, per_sample_mean, per_sample_sum

Weighting = Literal["one_minus_t", "legacy", "inv_t", "one_minus_t_sq", "snr_sqrt", "snr", "1_over_sigma2"]
RolloutNoise = Literal["fresh", "fixed", "ddim"]

#: the released ``1_over_sigma2`` weighting floors ``sigma^2`` at this value (``clip(min=0.00001)``)
SIGMA2_FLOOR = 1e-5


class SiDConfig(StrictModel):
    name: Literal["sid"] = "sid"
    alpha: float = 1.0
    weighting: Weighting = Field(
        "one_minus_t", description="w_t: 1-t (paper default), legacy 1/mean|x_g-f_r|, Fig. 2's SNR-based options, "
                                   "or 1_over_sigma2 = 1/max(sigma^2, 1e-5) (released weighting_scheme option)")
    lambda_sid: float = Field(100.0, gt=0.0)
    teacher_guidance: GuidanceSpec = GuidanceSpec(cfg=4.5)  # kappa4
    fake_guidance: GuidanceSpec = GuidanceSpec(cfg=4.5)  # kappa2
    fake_train_guidance: GuidanceSpec = GuidanceSpec(cfg=4.5)  # kappa1
    time: TimeSamplerConfig = TimeSamplerConfig(kind="logit_normal", mean=math.log(2.0), std=1.6, shift=False)
    score_gradients: Literal["through", "detached"] = Field(
        "through", description="'detached' stops gradients through f_r/f_f (diagnostic; SiD proper is 'through')")
    drop_nonfinite: bool = True
    rollout_noise: RolloutNoise = Field(
        "fresh", description="noise that re-noises G's prediction between rollout steps (released noise_type): "
                             "fresh = new noise each step, fixed = the initial noise again, ddim = the noise implied "
                             "by the previous input and prediction (a deterministic DDIM step)")
    # -- SiD2a (data-aided adversarial variant; needs real latents) ------------------------------
    adversarial: bool = Field(False, description="SiD2a: fake network's pooled final-norm features as a discriminator")
    adversarial_weight: float = Field(
        0.5, ge=0.0, le=1.0, description="w in L_G = (1 - w) L_SiD + w L_adv once the adversarial term is on")
    discriminator_weight: float = Field(
        1.0, ge=0.0, description="weight of the BCE discriminator loss in the fake update")
    adversarial_freeze_images: int = Field(
        20_000, ge=0, description="the generator is frozen (no G step) until this many images (global) were seen")
    adversarial_warmup_images: int = Field(
        40_000, ge=0, description="L_adv joins G's loss once this many images (global) were seen")
    adversarial_logit_clamp: float = Field(LOGIT_CLAMP, gt=0.0, description="logits are clamped to +-this before BCE")
    # -- released SiD-DiT forms (issue #12) --------------------------------------------------------
    use_sd3_shift: bool = Field(
        False, description="map generator.anchors through the teacher's shift (SD3.5: 1, .9, .75, .5); false = "
                           "unshifted sigmas 1, .75, .5, .25 (released SiD-DiT default and paper: t_k = 1 - (k-1)/K)")
    legacy_weight_floor: float = Field(
        1e-5, gt=0.0, description="weighting legacy: w = 1 / max(mean|x_g - f_r|, floor) (released: clip(min=1e-5))")

    def native_anchors(self, schedule: NoiseSchedule, units: Sequence[float]) -> Tensor:
        """The generator's native anchor times for unit anchors (``use_sd3_shift``)."""
        return anchors(schedule, units) if self.use_sd3_shift else schedule.unshifted(list(units))


def inverse_sigma2_weight(sigma: Tensor) -> Tensor:
    """The released ``1_over_sigma2`` weighting: ``1 / max(sigma^2, 1e-5)`` (emphasises low noise)."""
    return 1.0 / sigma.pow(2).clamp_min(SIGMA2_FLOOR)


@torch.no_grad()
def rollout_state(gen: FewStepGenerator, noise: Tensor, cond: Conditioning, k: int, kind: RolloutNoise) -> Tensor:
    """G's state at anchor ``k`` after ``k`` no-grad steps from ``noise``, re-noised as the released ``noise_type``.

    Step ``i`` predicts ``x0_i = G(x_i, t_i)``, then ``x_{i+1} = alpha(t_{i+1}) x0_i + sigma(t_{i+1}) n_i`` with
    ``n_i`` = the initial noise (``fixed``) or ``(x_i - alpha(t_i) x0_i) / sigma(t_i)``, the noise the current
    input and prediction imply (``ddim``: this is the deterministic DDIM / Euler step).  ``fresh`` (new noise
    each step) is :meth:`FewStepGenerator.simulate`.
    """
    if not 0 <= k < gen.num_steps:
        raise ValueError(f"k must be in 0..{gen.num_steps - 1}, got {k}")
    schedule = gen.schedule
    x = noise
    for i in range(k):
        n = x.shape[0]
        t, t_next = gen.time(i, n, x.device), gen.time(i + 1, n, x.device)
        x0 = gen(x, t, cond)
        if kind == "ddim":
            x = schedule.step(x, x0, t, t_next)
        elif kind == "fixed":
            x = schedule.add_noise(x0, noise, t_next)
        else:
            raise ValueError(f"unknown rollout noise {kind!r}")
    return x


class SiD(Method):
    """One fake-score update, then one generator update, every iteration."""

    name = "sid"

    def __init__(self, models: DistillationModels, config: SiDConfig, images_per_iteration: int | None = None) -> None:
        super().__init__(models)
        if models.fake_score is None:
            raise ValueError("SiD needs a fake score network")
        self.config = config
        self.time = config.time.build()
        #: images per iteration over all ranks (global batch): SiD2a's schedule is counted in images
        self.images_per_iteration = images_per_iteration
        self.iteration = 0
        self.pooled: PooledFeatureDiscriminator | None = None
        if config.adversarial:
            self.pooled = PooledFeatureDiscriminator(models.fake_score)
            scheduled = config.adversarial_freeze_images > 0 or config.adversarial_warmup_images > 0
            if scheduled and (images_per_iteration is None or images_per_iteration < 1):
                raise SenseflowError("SiD adversarial warm-up is counted in images: build the method with "
                                     "images_per_iteration = the global batch size")

    def networks(self) -> dict[str, nn.Module]:
        return {"generator": self.models.generator, "fake_score": self.models.fake_score}

    # -- SiD2a schedule --------------------------------------------------------------------------
    def images_seen(self, iteration: int | None = None) -> int:
        """Images (all ranks) trained on before ``iteration`` (default: the current one)."""
        it = self.iteration if iteration is None else iteration
        return it * (self.images_per_iteration or 0)

    def generator_frozen(self, iteration: int | None = None) -> bool:
        return self.config.adversarial and self.images_seen(iteration) < self.config.adversarial_freeze_images

    def adversarial_active(self, iteration: int | None = None) -> bool:
        return self.config.adversarial and self.images_seen(iteration) >= self.config.adversarial_warmup_images

    def phases(self, iteration: int) -> list[str]:
        self.iteration = iteration
        if self.generator_frozen(iteration):
            return ["fake_score"]
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
        if self.config.rollout_noise == "fresh":
            x = gen.simulate(noise, batch.cond, k - 1, rng)
        else:
            x = rollout_state(gen, noise, batch.cond, k - 1, self.config.rollout_noise)
        t = gen.time(k - 1, len(batch), x.device)
        with torch.set_grad_enabled(grad):
            return gen(x, t, batch.cond), t

    def weight(self, t: Tensor, x_g: Tensor, f_r: Tensor) -> Tensor:
        """Per-sample ``w_t``; SNR-based options use ``t' = sigma / (alpha + sigma)`` (= t for flows)."""
        w = self.config.weighting
        if w == "legacy":
            return 1.0 / per_sample_mean((x_g - f_r).abs()).detach().clamp_min(self.config.legacy_weight_floor)
        if w == "1_over_sigma2":
            return inverse_sigma2_weight(self.schedule.sigma(t)).to(device=x_g.device, dtype=torch.float32)
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
        return self.sid_loss(x_g, batch.cond, rng, adversarial=self.adversarial_active())

    def sid_loss(self, x_g: Tensor, cond: Conditioning, rng: RandomStreams, adversarial: bool = False) -> LossOutput:
        """The SiD generator loss for generator samples ``x_g`` (computed in fp32).

        ``adversarial=True`` (SiD2a, once warmed up) reads D's logits from the fake forward and
        returns ``(1 - w) L_SiD + w L_adv``.
        """
        x_g = x_g.float()
        n = x_g.shape[0]
        t = self.time.sample(n, self.schedule, rng.local, rng.device).to(x_g.device)
        eps = rng.randn_like(x_g)
        x_t = self.schedule.add_noise(x_g, eps, t)
        f_r = self.models.teacher(x_t, t, cond, self.guidance(self.config.teacher_guidance, rng, t)).float()
        d_logits = None
        if adversarial:
            with self.pooled.capture() as calls:
                f_f = self.models.fake_score(x_t, t, cond, self.guidance(self.config.fake_guidance, rng, t)).float()
            d_logits = self.pooled.logits(calls, n)
        else:
            f_f = self.models.fake_score(x_t, t, cond, self.guidance(self.config.fake_guidance, rng, t)).float()
        if self.config.score_gradients == "detached":
            f_r, f_f = f_r.detach(), f_f.detach()
        diff = f_r - f_f
        per_sample = per_sample_sum(diff * ((f_r - x_g) - self.config.alpha * diff))
        w_t = self.weight(t, x_g, f_r)
        per_sample = per_sample * w_t
        loss, dropped = self.reduce(per_sample, self.config.lambda_sid)
        if d_logits is None:
            return LossOutput(loss, {"loss_sid": loss.detach(), "sid_dropped": dropped})
        numel = x_g[0].numel()
        per_adv = bce_generator(d_logits, self.config.adversarial_logit_clamp) * w_t * numel
        adv, _ = self.reduce(per_adv, 1.0)
        w = self.config.adversarial_weight
        total = (1.0 - w) * loss + w * adv
        return LossOutput(total, {"loss_sid": loss.detach(), "sid_dropped": dropped, "loss_adv_g": adv.detach(),
                                  "d_fake_g": d_logits.detach().mean(), "loss_g": total.detach()})

    def fake_score_loss(self, batch: Batch, rng: RandomStreams) -> LossOutput:
        with torch.no_grad():
            x_g, _ = self.rollout(batch, rng, grad=False)
        x_g = x_g.float()
        t = self.time.sample(x_g.shape[0], self.schedule, rng.local, rng.device).to(x_g.device)
        eps = rng.randn_like(x_g)
        x_t = self.schedule.add_noise(x_g, eps, t)
        if self.config.adversarial:
            return self.fake_and_discriminator_loss(batch, x_g, x_t, eps, t, rng)
        pred = self.models.fake_score.native(x_t, t, batch.cond, self.guidance(self.config.fake_train_guidance, rng, t))
        target = self.schedule.target(x_g, eps, t)
        loss, dropped = self.reduce(per_sample_sum((pred.float() - target.float()) ** 2), 1.0)
        return LossOutput(loss, {"loss_fake": loss.detach(), "fake_dropped": dropped})

    def fake_and_discriminator_loss(self, batch: Batch, x_g: Tensor, x_t: Tensor, eps: Tensor, t: Tensor,
                                    rng: RandomStreams) -> LossOutput:
        """SiD2a's fake update: the flow-matching loss plus ``BCE(real -> 1, fake -> 0)`` on pooled features.

        Real = ``batch.latents`` noised with the same ``t`` and ``eps``; its forward is conditional only
        (with the same embedded guidance), which equals the conditional half of the CFG forward.
        """
        if batch.latents is None:
            raise SenseflowError("SiD adversarial (SiD2a) needs real latents: train on image-text data "
                                 "(the batch has none) or set method.adversarial: false")
        real = batch.latents.to(device=x_g.device, dtype=x_g.dtype)
        if real.shape != x_g.shape:
            raise SenseflowError(f"SiD adversarial: real latents have shape {tuple(real.shape)} but generator "
                                 f"samples {tuple(x_g.shape)}: encode the data at the training resolution")
        n = x_g.shape[0]
        fake_net = self.models.fake_score
        guidance = self.guidance(self.config.fake_train_guidance, rng, t)
        with self.pooled.capture() as calls:
            pred = fake_net.native(x_t, t, batch.cond, guidance)
        fake_logits = self.pooled.logits(calls, n)
        x_t_real = self.schedule.add_noise(real, eps, t)
        with self.pooled.capture() as calls_real:
            out_real = fake_net.native(x_t_real, t, batch.cond, Guidance(embedded=guidance.embedded))
        real_logits = tie_unused_output(self.pooled.logits(calls_real, n), out_real, fake_net.backbone)  # FSDP2
        target = self.schedule.target(x_g, eps, t)
        loss, dropped = self.reduce(per_sample_sum((pred.float() - target.float()) ** 2), 1.0)
        per_d = bce_real_fake(real_logits, fake_logits, self.config.adversarial_logit_clamp) * x_g[0].numel()
        loss_d, d_dropped = self.reduce(per_d, self.config.discriminator_weight)
        total = loss + loss_d
        return LossOutput(total, {"loss_fake": loss.detach(), "fake_dropped": dropped, "loss_d": loss_d.detach(),
                                  "d_real": real_logits.detach().mean(), "d_fake": fake_logits.detach().mean(),
                                  "d_dropped": d_dropped})
