"""DMD2 (Yin et al. 2024) as used by SenseFlow: distribution matching + fake-score regression + TTUR.

Generator loss (ALGORITHMS.md): for G's sample ``x`` noised to ``x_t``,
``g = (p_r - p_f) / mean|p_r|`` with ``p_r = x - x0_real``, ``p_f = x - x0_fake``, and
``L = 0.5 * mean((x - sg(x - g))^2)`` -- whose gradient w.r.t. ``x`` is
``(x0_fake - x0_real) / mean|x - x0_real|`` divided by the number of elements.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..configbase import StrictModel, TimeSamplerConfig
from ..discriminators.base import AdversarialTerm
from ..discriminators.dmd2_head import (GANHeadConfig, attach_gan_head, gan_classifier_loss, gan_generator_loss,
                                        require_real_latents)
from ..generator import GeneratorInput
from ..released import PAPER, ReleasedForms
from ..released import omega as released_omega
from ..rng import RandomStreams
from ..schedules import NoiseSchedule, anchors
from ..teachers.base import Conditioning, SenseflowError
from .base import Batch, DistillationModels, GuidanceSpec, LossOutput, Method, per_sample_mean


class DMD2Config(StrictModel):
    """Settings of plain DMD2 (also the base of SenseFlow's)."""

    name: Literal["dmd2"] = "dmd2"
    reference: Literal["released", "paper"] = Field(
        "released", description="preset for the keys where the released code and the papers differ (docs/deviations.md): "
        "released = the released trainers; paper = the papers' formulas with continuous time laws; keys you set win")
    ttur: int = Field(5, ge=1, description="G steps once every `ttur` iterations; the fake score every iteration")
    real_guidance: GuidanceSpec = GuidanceSpec(cfg=8.0)
    fake_guidance: GuidanceSpec = GuidanceSpec()
    dmd_time: TimeSamplerConfig = TimeSamplerConfig(kind="uniform", low=0.02, high=0.98, shift=True, discrete=True)
    fake_time: TimeSamplerConfig = TimeSamplerConfig(kind="teacher")
    backward_probability: float = Field(
        1.0, ge=0.0, le=1.0,
        description="probability of backward simulation when the data has real latents (data-free: always)")
    first_anchor: Literal["noise", "diffused"] = Field(
        "noise", description="forward diffusion at the first anchor: pure noise (released SDXL trainer, as sampling) "
                             "or the real latents diffused to it (SDXL 999: 0.068 x0 + 0.998 eps); flows: identical")
    adversarial_weight: float = Field(0.0, ge=0.0, description="lambda_G of the adversarial term (0 = off)")
    adversarial_start: int = Field(
        0, ge=0, description="iterations before G's loss includes the adversarial term; D trains from the first "
                             "(a discriminator warm-up; released trainers: 0)")
    adversarial_time_weight: Literal["none", "omega"] = "none"
    omega: Literal["released", "paper"] = Field(
        "released", description="omega(t) law: released = the family's trainer (SD3.5 sigma_table[t]^2, SDXL "
                                "sqrt(abar_t), FLUX (1-sigma)^2); paper = alpha_t^2 = (1-sigma)^2 (SDXL abar_t)")
    discriminator_time_weight: bool = Field(
        True, description="with adversarial_time_weight omega: weight both hinge terms of D's loss by the same omega(t) "
                          "(released trainers); false = unweighted D loss (paper eq. 12)")
    fake_sample: Literal["generator", "fresh"] = Field(
        "generator", description="sample the fake score (and D) train on: 'generator' = the detached sample of this "
        "iteration's G step when there is one (released DMD2, guidance_data_dict; no extra G pass), else one fresh "
        "sample shared by fake score and D; 'fresh' = a new G sample for each of them")
    gan_head: GANHeadConfig = Field(default_factory=GANHeadConfig,
                                    description="DMD2's own GAN term (classifier head on the fake score)")

    #: the values ``reference: paper`` gives the keys it governs (subclasses add theirs)
    PAPER_FORMS: ClassVar[dict[str, Any]] = {
        "dmd_time": {"kind": "uniform", "low": 0.02, "high": 0.98, "shift": True, "discrete": False},
        "fake_time": {"kind": "teacher", "shift": False},
        "first_anchor": "diffused",
        "omega": "paper",
        "discriminator_time_weight": False,
    }

    def native_anchors(self, schedule: NoiseSchedule, units: Sequence[float]) -> Tensor:
        """The generator's native anchor times: unit anchors through the teacher's shift (SenseFlow, DMD2)."""
        return anchors(schedule, units)

    @model_validator(mode="before")
    @classmethod
    def _reference_preset(cls, data: Any) -> Any:
        """``reference: paper`` fills the keys it governs unless they are given explicitly."""
        if isinstance(data, dict) and data.get("reference") == "paper":
            data = {**cls.PAPER_FORMS, **data}
        return data


class DMD2(Method):
    """DMD2: G every ``ttur`` iterations, then the fake score (and discriminator) every iteration."""

    name = "dmd2"

    def __init__(self, models: DistillationModels, config: DMD2Config) -> None:
        super().__init__(models)
        if models.fake_score is None:
            raise ValueError(f"{self.name} needs a fake score network")
        if config.adversarial_weight > 0 and models.discriminator is None:
            raise ValueError("adversarial_weight > 0 needs a discriminator")
        self.config = config
        self.dmd_time = config.dmd_time.build()
        self.fake_time = config.fake_time.build()
        #: DMD2's classifier head, a submodule of the fake score (its optimiser, its checkpoint file)
        self.gan = attach_gan_head(models.fake_score, config.gan_head) if config.gan_head.enabled else None
        self.gan_time = config.gan_head.time.build()
        # detached G samples of the current iteration, one per micro-batch (fake_sample: generator)
        self._samples: list[tuple[GeneratorInput, Tensor]] = []
        self._cursor: dict[str, int] = {}
        self._iteration = 0

    # -- policy --------------------------------------------------------------------------------
    @property
    def adversarial(self) -> AdversarialTerm | None:
        d = self.models.discriminator
        return d if (d is not None and self.config.adversarial_weight > 0) else None

    def networks(self) -> dict[str, nn.Module]:
        nets: dict[str, nn.Module] = {"generator": self.models.generator, "fake_score": self.models.fake_score}
        if self.adversarial is not None:
            nets["discriminator"] = self.adversarial
        return nets

    def param_groups(self, name: str, params: list[nn.Parameter]) -> list[dict] | None:
        """``method.gan_head.lr``: the head in its own group of the fake score's optimiser (released: one group)."""
        if name != "fake_score" or self.gan is None or self.config.gan_head.lr is None:
            return None
        head = {id(p) for p in self.gan.parameters()}
        groups = [{"params": [p for p in params if id(p) not in head]},
                  {"params": [p for p in params if id(p) in head], "lr": self.config.gan_head.lr}]
        if not groups[1]["params"]:
            raise SenseflowError("method.gan_head.lr: the fake score's optimiser holds no head parameters")
        return groups

    def phases(self, iteration: int) -> list[str]:
        self._samples, self._cursor = [], {}  # a new iteration: nothing to reuse yet
        self._iteration = iteration
        phases = ["generator"] if iteration % self.config.ttur == 0 else []
        phases.append("fake_score")
        if self.adversarial is not None:
            phases.append("discriminator")
        return phases

    def loss(self, phase: str, batch: Batch, rng: RandomStreams) -> LossOutput:
        if phase == "generator":
            return self.generator_loss(batch, rng)
        if phase == "fake_score":
            return self.fake_score_loss(batch, rng)
        if phase == "discriminator" and self.adversarial is not None:
            return self.discriminator_loss(batch, rng)
        raise ValueError(f"{self.name} has no phase {phase!r}")

    # -- released forms (issue #12) ----------------------------------------------------------------
    @property
    def released(self) -> ReleasedForms:
        """The teacher family's released-trainer forms (its adapter says; see senseflow.released)."""
        return getattr(self.models.teacher.adapter, "released", PAPER)

    def omega(self, t: Tensor) -> Tensor:
        """The adversarial time weight at G's input anchor ``t`` (``method.omega``)."""
        if self.config.omega == "paper":
            return self.schedule.omega(t)
        return released_omega(self.schedule, t, self.released.omega)

    # -- pieces --------------------------------------------------------------------------------
    def generator_input(self, batch: Batch, rng: RandomStreams) -> GeneratorInput:
        return self.models.generator.training_input(
            batch.cond, (len(batch), *self.latent_shape), rng, real_x0=batch.latents,
            backward_probability=self.config.backward_probability,
            pure_first_anchor=self.config.first_anchor == "noise")

    def sample_generator(self, batch: Batch, rng: RandomStreams) -> Tensor:
        """A detached G sample (``x0``) from a fresh training input (for fake-score / D updates)."""
        return self.sample_generator_at(batch, rng)[1]

    def sample_generator_at(self, batch: Batch, rng: RandomStreams) -> tuple[GeneratorInput, Tensor]:
        """The training input and the detached G sample drawn from it."""
        gin = self.generator_input(batch, rng)
        with torch.no_grad():
            return gin, self.models.generator(gin.x_t, gin.t, batch.cond)

    def discriminator_loss(self, batch: Batch, rng: RandomStreams) -> LossOutput:
        """D's loss on real data vs the iteration's G sample (``fake_sample``), time-weighted like G's term
        when configured.

        The released trainers multiply BOTH hinge terms by omega(t) of the G sample's anchor.  The
        anchor index is drawn once per batch (shared stream), so omega is one number per batch and
        scaling the term's loss by it equals weighting each sample's hinge terms.
        """
        gin, x = self.iteration_sample_at("discriminator", batch, rng)
        out = self.adversarial.discriminator_loss(x, batch)
        if self.config.adversarial_time_weight != "omega" or not self.config.discriminator_time_weight:
            return out
        w = self.omega(gin.t)
        if not bool((w == w[0]).all()):
            raise ValueError("discriminator time weight: the batch mixes anchors; draw one anchor per batch")
        weight = float(w[0])
        return LossOutput(out.loss * weight, {**out.logs, "d_time_weight": weight})

    def iteration_sample(self, phase: str, batch: Batch, rng: RandomStreams) -> Tensor:
        """The detached G sample ``phase`` trains on (see ``fake_sample``)."""
        return self.iteration_sample_at(phase, batch, rng)[1]

    def iteration_sample_at(self, phase: str, batch: Batch, rng: RandomStreams) -> tuple[GeneratorInput, Tensor]:
        """The training input and detached G sample ``phase`` trains on (see ``fake_sample``).

        With ``generator`` the i-th micro-batch of every phase of an iteration gets the same
        sample: the one G's own step produced (stored by :meth:`generator_loss`), or, on an
        iteration without a G step, one drawn by the first phase that needs it.
        """
        if self.config.fake_sample == "fresh":
            return self.sample_generator_at(batch, rng)
        i = self._cursor.get(phase, 0)
        self._cursor[phase] = i + 1
        if i == len(self._samples):
            self._samples.append(self.sample_generator_at(batch, rng))
        return self._samples[i]

    def dmd_loss(self, x: Tensor, cond: Conditioning, rng: RandomStreams) -> tuple[Tensor, dict[str, Tensor]]:
        """The distribution-matching loss for G samples ``x`` (gradient flows into ``x`` only)."""
        schedule = self.schedule
        t = self.dmd_time.sample(x.shape[0], schedule, rng.local, rng.device).to(x.device)
        with torch.no_grad():
            eps = rng.randn_like(x)
            x_t = schedule.add_noise(x.detach(), eps, t)
            x0_real = self.models.teacher(x_t, t, cond, self.guidance(self.config.real_guidance, rng, t)).float()
            x0_fake = self.models.fake_score(x_t, t, cond, self.guidance(self.config.fake_guidance, rng, t)).float()
            xf = x.detach().float()
            p_real = xf - x0_real
            p_fake = xf - x0_fake
            norm = p_real.abs().flatten(1).mean(dim=1).reshape(-1, *([1] * (x.ndim - 1)))
            grad = torch.nan_to_num((p_real - p_fake) / norm)
            target = xf - grad
        loss = 0.5 * F.mse_loss(x.float(), target, reduction="mean")
        return loss, {"dmd_grad_norm": grad.norm() / grad.shape[0] ** 0.5}

    def adversarial_loss(self, gin: GeneratorInput, x: Tensor, batch: Batch) -> Tensor:
        per_sample = self.adversarial.generator_loss(x, batch)
        if self.config.adversarial_time_weight == "omega":
            per_sample = per_sample * self.omega(gin.t).to(per_sample)
        return per_sample.mean()

    def extra_generator_losses(self, gin: GeneratorInput, x: Tensor, batch: Batch,
                               rng: RandomStreams) -> dict[str, tuple[float, Tensor]]:
        """Hook for subclasses: ``name -> (weight, loss)`` added to G's loss."""
        return {}

    def generator_loss(self, batch: Batch, rng: RandomStreams) -> LossOutput:
        gin = self.generator_input(batch, rng)
        x = self.models.generator(gin.x_t, gin.t, batch.cond)
        if self.config.fake_sample == "generator":
            self._samples.append((gin, x.detach()))
        loss, logs = self.dmd_loss(x, batch.cond, rng)
        logs = {"loss_dmd": loss.detach(), **logs}
        total = loss
        if self.adversarial is not None and self._iteration >= self.config.adversarial_start:
            adv = self.adversarial_loss(gin, x, batch)
            total = total + self.config.adversarial_weight * adv
            logs["loss_adv_g"] = adv.detach()
        if self.gan is not None:
            gan = self.gan_generator_term(x, batch, rng)
            total = total + self.config.gan_head.generator_weight * gan
            logs["loss_gan_g"] = gan.detach()
        for name, (weight, value) in self.extra_generator_losses(gin, x, batch, rng).items():
            total = total + weight * value
            logs[f"loss_{name}"] = value.detach()
        logs["loss_g"] = total.detach()
        return LossOutput(total, logs)

    def fake_score_loss(self, batch: Batch, rng: RandomStreams) -> LossOutput:
        """The teacher's own training loss on detached G samples (velocity / eps MSE)."""
        x = self.iteration_sample("fake_score", batch, rng).float()
        schedule = self.schedule
        t = self.fake_time.sample(x.shape[0], schedule, rng.local, rng.device).to(x.device)
        eps = rng.randn_like(x)
        x_t = schedule.add_noise(x, eps, t)
        pred = self.models.fake_score.native(x_t, t, batch.cond, self.fake_training_guidance(rng))
        target = schedule.target(x, eps, t)
        loss = self.fake_reduction(pred.float() - target.float())
        logs = {"loss_fake": loss.detach()}
        if self.gan is not None:
            cls, gan_logs = self.gan_classifier_term(x, batch, rng)
            loss = loss + self.config.gan_head.classifier_weight * cls
            logs.update(gan_logs)
        return LossOutput(loss, logs)

    def gan_generator_term(self, x: Tensor, batch: Batch, rng: RandomStreams) -> Tensor:
        """DMD2's ``softplus(-D(G(z)))`` on G's noised samples (through the frozen fake score and head)."""
        logits = self.gan.noisy_logits(self.models.fake_score, x, batch.cond, self.gan_time, rng,
                                       self.fake_training_guidance(rng))
        return gan_generator_loss(logits)

    def gan_classifier_term(self, x: Tensor, batch: Batch, rng: RandomStreams) -> tuple[Tensor, dict[str, Tensor]]:
        """DMD2's classifier loss on real latents vs the detached G samples ``x``, each freshly noised."""
        real = require_real_latents(batch.latents, x)
        fake_net, guidance = self.models.fake_score, self.fake_training_guidance(rng)
        real_logits = self.gan.noisy_logits(fake_net, real, batch.cond, self.gan_time, rng, guidance)
        fake_logits = self.gan.noisy_logits(fake_net, x.detach(), batch.cond, self.gan_time, rng, guidance)
        loss = gan_classifier_loss(real_logits, fake_logits)
        return loss, {"loss_gan_d": loss.detach(), "gan_real": torch.sigmoid(real_logits).mean().detach(),
                      "gan_fake": torch.sigmoid(fake_logits).mean().detach()}

    def fake_training_guidance(self, rng: RandomStreams):
        return None

    def fake_reduction(self, diff: Tensor) -> Tensor:
        return diff.pow(2).mean()


class IDAPlan:
    """Implicit Distribution Alignment: ``phi <- lam * phi + (1 - lam) * theta``, matched by name.

    The name matching is done once (parameter objects are stable for a run, FSDP2 shards
    included), so each application is a couple of fused kernels.  Runs on whatever tensors the
    parameters hold (the fp32 master weights under AMP; the local shards under FSDP2, where both
    networks share one sharding plan).  Parameters the generator lacks (FLUX's guidance embedder,
    removed from the student) are left as they are, and so are tensors the two networks SHARE (a
    LoRA run's frozen base, ``lora.shared_base``: ``lam*w + (1-lam)*w`` on one tensor would rescale
    the teacher's weights).  fp32 parameters are updated with fused
    ``_foreach`` kernels doing the released arithmetic, ``phi.mul_(lam).add_(theta, alpha=1 - lam)``
    (bit-identical to it; multiplying ``theta`` first would round twice); low-precision storage is
    interpolated in fp32 and rounded once.
    """

    def __init__(self, fake: nn.Module, generator: nn.Module) -> None:
        gen_params = dict(generator.named_parameters())
        self.fused: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self.mixed: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name, p in fake.named_parameters():
            q = gen_params.get(name)
            if q is None or q is p:   # a base tensor both share (senseflow.shared_base): already equal
                continue
            if q.shape != p.shape:
                raise ValueError(f"IDA: parameter {name!r} has shape {tuple(p.shape)} in the fake score "
                                 f"but {tuple(q.shape)} in the generator")
            if p.dtype == torch.float32 and q.dtype == torch.float32:
                self.fused[0].append(p)
                self.fused[1].append(q)
            else:
                self.mixed.append((p, q))

    def __len__(self) -> int:
        return len(self.fused[0]) + len(self.mixed)

    @torch.no_grad()
    def apply(self, lam: float) -> int:
        ps, qs = self.fused
        if ps:  # the released p.mul_(lam).add_(q, alpha=1 - lam), bit for bit
            torch._foreach_mul_(ps, lam)
            torch._foreach_add_(ps, qs, alpha=1.0 - lam)
        for p, q in self.mixed:
            p.copy_(p.float() * lam + (1.0 - lam) * q.float())
        return len(self)


def ida_update(fake: nn.Module, generator: nn.Module, lam: float) -> int:
    """One IDA update (see :class:`IDAPlan`); returns the number of parameters updated."""
    return IDAPlan(fake, generator).apply(lam)
