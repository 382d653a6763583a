"""The released trainers' formulas (issue #12), checked against values computed here by hand.

References: XingtongGe/SenseFlow @ f7da31b ``senseflow/trainer/trainer_{sd35,flux,sdxl}_senseflow.py``,
tianweiy/DMD2 ``main/sd_guidance.py``, apple-aiml-research/ml-sid-dit ``training/sid_dit_*``.
Expected numbers come from the released expressions re-typed below (diffusers' scheduler tables,
``sqrt(alphas_cumprod)``, ``randint`` bounds), never from senseflow's own helpers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import nn

from senseflow.discriminators import AdversarialTerm, hinge_discriminator_loss, hinge_generator_loss
from senseflow.generator import FewStepGenerator, GeneratorInput
from senseflow.methods import DistillationModels, GuidanceSpec, SenseFlow, SenseFlowConfig, SiD, SiDConfig
from senseflow.methods.base import Batch, LossOutput
from senseflow.methods.dmd2 import IDAPlan
from senseflow.rng import RandomStreams
from senseflow.schedules import DDPM, RectifiedFlow, TimeSampler, anchors
from senseflow.teachers.base import Denoiser, freeze
from senseflow.teachers.custom import CallableAdapter, HashedWordEncoder
from senseflow.teachers.flux import FluxAdapter
from senseflow.teachers.sd3 import SD3Adapter
from senseflow.teachers.sdxl import SDXLAdapter
from tests.helpers.models import LinearVelocity, tiny_models

UNIT = [1.0, 0.75, 0.5, 0.25]


def sdxl_abar() -> torch.Tensor:
    """diffusers' scaled_linear ``alphas_cumprod`` (SDXL: beta 0.00085 .. 0.012)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def shift3(s):
    return 3.0 * s / (1.0 + 2.0 * s)


def linear_family(schedule, released, a_teacher=0.6, a_student=-0.3) -> DistillationModels:
    """Linear backbones (prediction = a * x) on a schedule, with a family's released forms."""
    adapter = CallableAdapter(schedule, (1, 2, 2), prompt_encoder=HashedWordEncoder(dim=4))
    adapter.released = released
    teacher = Denoiser(freeze(LinearVelocity(a_teacher)), adapter)
    gen = FewStepGenerator(Denoiser(LinearVelocity(a_student), adapter), anchors(schedule, UNIT))
    return DistillationModels(teacher=teacher, generator=gen, fake_score=Denoiser(LinearVelocity(a_teacher), adapter))


def batch_of(models, n=2) -> Batch:
    prompts = ["a red circle", "a blue square", "a green cross", "a cat"][:n]
    return Batch(prompts, models.teacher.adapter.encode_prompts(prompts))


def gin_at(t, t_next, n, x=None) -> GeneratorInput:
    x = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(5)) if x is None else x
    return GeneratorInput(x, 0, torch.full((n,), float(t), dtype=torch.float64),
                          torch.full((n,), float(t_next), dtype=torch.float64), True)


# -- 1. SD3.5 fake-score time law -----------------------------------------------------------------
def test_sd35_fake_score_law_is_the_shifted_table_lookup():
    n = 4000
    rf3 = RectifiedFlow(shift=3.0)
    got = TimeSampler("teacher").sample(n, rf3, torch.Generator().manual_seed(1))
    # released compute_loss_fake: u ~ logit-normal, sigma = scheduler.sigmas[(u * 1000).long()]
    u = torch.sigmoid(torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    table = FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas.double()
    assert torch.allclose(got, table[(u * 1000).long()], atol=1e-6)
    # shift3(logit-normal): median sigma = shift3(0.5) = 0.75 (the unshifted law: 0.5)
    big = TimeSampler("teacher").sample(100_000, rf3, torch.Generator().manual_seed(2))
    assert big.median().item() == pytest.approx(0.75, abs=0.005)
    old = TimeSampler("teacher", shift=False).sample(100_000, rf3, torch.Generator().manual_seed(2))
    assert old.median().item() == pytest.approx(0.5, abs=0.005)
    # FLUX's scheduler table is unshifted (dynamic shift): median 0.5 with the table law too
    flux = TimeSampler("teacher").sample(100_000, RectifiedFlow(mu=1.15), torch.Generator().manual_seed(2))
    assert flux.median().item() == pytest.approx(0.5, abs=0.005)


# -- 2. SDXL first anchor with forward diffusion --------------------------------------------------
def test_sdxl_first_anchor_input_is_pure_noise_with_real_latents():
    models = linear_family(DDPM.scaled_linear(), SDXLAdapter.released)
    gen = models.generator
    assert gen.anchors == [999.0, 749.0, 499.0, 249.0]
    cond = batch_of(models).cond
    seed = next(s for s in range(100) if RandomStreams(s).shared_randint(0, 4) == 0)  # k = 0
    zero, real = torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 100.0)

    def x_t(x0, pure):
        return gen.training_input(cond, (2, 1, 2, 2), RandomStreams(seed), real_x0=x0, backward_probability=0.0,
                                  pure_first_anchor=pure).x_t

    noise = x_t(zero, True)
    assert torch.equal(x_t(real, True), noise)  # released: noisy_image[timesteps == 999] = noise
    # diffused: sqrt(abar_999) x0 + sqrt(1 - abar_999) eps = 0.068 x0 + 0.998 eps
    a, s = sdxl_abar()[999].sqrt().item(), (1 - sdxl_abar()[999]).sqrt().item()
    assert a == pytest.approx(0.068, abs=5e-4) and s == pytest.approx(0.998, abs=5e-4)
    assert torch.allclose(x_t(real, False), a * 100.0 + s * noise, atol=1e-4)


def test_dmd2_config_first_anchor_switch():
    assert SenseFlowConfig().first_anchor == "noise"
    assert SenseFlowConfig(reference="paper").first_anchor == "diffused"


# -- 3. SiD anchors ----------------------------------------------------------------------------------
def test_sid_anchors_are_unshifted_by_default():
    rf3, flux = RectifiedFlow(shift=3.0), RectifiedFlow(mu=1.15)
    assert SiDConfig().native_anchors(rf3, UNIT).tolist() == [1.0, 0.75, 0.5, 0.25]
    assert SiDConfig().native_anchors(flux, UNIT).tolist() == [1.0, 0.75, 0.5, 0.25]
    # released use_sd3_shift=True: t = 3 t / (1 + 2 t)
    assert torch.allclose(SiDConfig(use_sd3_shift=True).native_anchors(rf3, UNIT),
                          torch.tensor([1.0, 0.9, 0.75, 0.5], dtype=torch.float64))
    # SenseFlow / DMD2 keep the shifted table anchors (released SD3.5 trainer: sigmas[999, 749, 499, 249])
    assert torch.allclose(SenseFlowConfig().native_anchors(rf3, UNIT),
                          torch.tensor([1.0, 0.9, 0.75, 0.5], dtype=torch.float64))


# -- 4. SDXL ISG released form -----------------------------------------------------------------------
def released_sdxl_isg(x_t, t, t_mid, prev, a_t, a_g, c=1e-3):
    """trainer_sdxl_senseflow.get_isg_guidance, re-typed with eps = a * x backbones and no CFG."""
    abar = sdxl_abar()
    sa = lambda i: abar[i].sqrt().item()  # noqa: E731
    sb = lambda i: (1 - abar[i]).sqrt().item()  # noqa: E731
    x_t = x_t.double()
    eps_T = a_t * x_t
    x0_T = (x_t - sb(t) * eps_T) / sa(t)
    x_mid = sa(t_mid) * x0_T + sb(t_mid) * eps_T
    eps_G_mid = a_g * x_mid
    gen_x0 = (x_mid - sb(t_mid) * eps_T) / sa(t_mid)  # rebuilt from the TEACHER's eps
    target = sa(prev) * gen_x0 + sb(prev) * eps_G_mid
    x0_G = (x_t - sb(t) * (a_g * x_t)) / sa(t)
    pred = sa(prev) * x0_G + sb(prev) * eps_G_mid
    return torch.mean(torch.sqrt((pred - target) ** 2 + c * c) - c).item()


@pytest.mark.parametrize("t,t_next,prev", [(749, 499, 499), (249, -1, 0)])
def test_sdxl_isg_released_is_an_x0_regression_onto_the_teacher(t, t_next, prev):
    a_t, a_g = 0.6, -0.3
    models = linear_family(DDPM.scaled_linear(), SDXLAdapter.released, a_t, a_g)
    batch = batch_of(models)
    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * 3
    gin = gin_at(t, t_next, 2, x)
    method = SenseFlow(models, SenseFlowConfig(isg_guidance=GuidanceSpec(), isg_margin=20))
    x0_hat = models.generator(x, gin.t, batch.cond)
    got = method.isg_loss(gin, x0_hat, batch, RandomStreams(0)).item()
    want = released_sdxl_isg(x, t, (t + max(prev, 0)) // 2, prev, a_t, a_g)  # any t_mid: it cancels
    assert got == pytest.approx(want, rel=1e-5)
    paper = SenseFlow(models, SenseFlowConfig(isg_guidance=GuidanceSpec(), isg_margin=20, isg_form="paper"))
    assert paper.isg_loss(gin, x0_hat, batch, RandomStreams(0)).item() != pytest.approx(want, rel=1e-3)


# -- 5. FLUX ISG t_mid -----------------------------------------------------------------------------------
def test_flux_isg_mid_time_is_an_integer_in_the_shifted_1000_sigma_space():
    flux = RectifiedFlow(mu=1.15)
    models = linear_family(flux, FluxAdapter.released)
    last = models.generator.anchors[-1]
    assert last == pytest.approx(0.5128, abs=1e-4)
    gin = gin_at(last, 0.0, 20_000)
    released = SenseFlow(models, SenseFlowConfig(isg_margin=20)).sample_mid_time(gin, RandomStreams(0))
    # randint(ceil(0 + 20), floor(512.8 - 20) + 1) / 1000: [0.020, 0.492] on a 0.001 grid
    assert released.min().item() == pytest.approx(0.020) and released.max().item() == pytest.approx(0.492)
    assert torch.allclose(released * 1000, (released * 1000).round(), atol=1e-9)
    # paper: unit time [0.02, 0.25 - 0.02] through the dynamic shift e^mu / (e^mu + 1/u - 1)
    em = math.exp(1.15)
    lo, hi = em / (em + 1 / 0.02 - 1), em / (em + 1 / 0.23 - 1)
    assert (lo, hi) == (pytest.approx(0.0606, abs=1e-4), pytest.approx(0.4854, abs=1e-4))
    paper = SenseFlow(models, SenseFlowConfig(isg_margin=20, isg_mid_time="paper", isg_last_target="clean"))
    drawn = paper.sample_mid_time(gin, RandomStreams(0))
    assert drawn.min() >= lo - 1e-9 and drawn.max() <= hi + 1e-9 and drawn.min() < lo + 1e-3 and drawn.max() > hi - 1e-3


def test_sd35_isg_mid_time_is_a_table_index_and_last_segment_ends_at_sigma_0003():
    models = linear_family(RectifiedFlow(shift=3.0), SD3Adapter.released)
    method = SenseFlow(models, SenseFlowConfig(isg_margin=50))
    sched = method.schedule
    # segment 999 -> 749: randint(799, 950) -> sigmas[i] = shift3((i + 1) / 1000): u in {0.800 .. 0.950}
    u = sched.to_unit(method.sample_mid_time(gin_at(1.0, 0.9, 20_000), RandomStreams(0)))
    assert u.min().item() == pytest.approx(0.800) and u.max().item() == pytest.approx(0.950)
    assert torch.allclose(u * 1000, (u * 1000).round(), atol=1e-6)
    # last segment 249 -> "0": timestep_prev = 0 -> sigmas[0] = shift3(0.001) = 0.003 / 1.002
    last = gin_at(0.5, 0.0, 20_000)
    end = 0.003 / 1.002
    assert method.segment_end(last)[0].item() == pytest.approx(end, rel=1e-9)
    u = sched.to_unit(method.sample_mid_time(last, RandomStreams(0)))
    assert u.min().item() == pytest.approx(0.051) and u.max().item() == pytest.approx(0.200)
    assert SenseFlow(models, SenseFlowConfig(isg_last_target="clean")).segment_end(last)[0].item() == 0.0


def test_sd35_isg_two_step_path_ends_at_the_released_sigma():
    a_t, a_g = 0.6, -0.3
    models = linear_family(RectifiedFlow(shift=3.0), SD3Adapter.released, a_t, a_g)
    method = SenseFlow(models, SenseFlowConfig(isg_guidance=GuidanceSpec(), isg_margin=50))
    batch = batch_of(models)
    gin = gin_at(0.5, 0.0, 2)
    x = gin.x_t.double()
    x0_hat = models.generator(gin.x_t, gin.t, batch.cond)
    t_mid = method.sample_mid_time(gin, RandomStreams(0))[:, None, None, None]
    end = 0.003 / 1.002
    # released get_isg_guidance (SD3.5): Euler steps with v = a x
    x_mid = x + (t_mid - 0.5) * a_t * x
    target = x_mid + (end - t_mid) * a_g * x_mid
    pred = x + (end - 0.5) * a_g * x
    diff = method.isg_diff(gin, x0_hat, batch, RandomStreams(0))
    assert torch.allclose(diff.double(), pred - target, atol=1e-6)


# -- 6./7. omega -------------------------------------------------------------------------------------------
def omega_of(schedule, released, **cfg):
    return SenseFlow(linear_family(schedule, released), SenseFlowConfig(**cfg)).omega


def test_sd35_omega_is_the_squared_unflipped_sigma_table():
    rf3 = RectifiedFlow(shift=3.0)
    t = anchors(rf3, UNIT)  # 1, .9, .75, .5 = released timesteps 999, 749, 499, 249
    got = omega_of(rf3, SD3Adapter.released)(t)
    table = FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas.double()  # released self.sigmas_timew
    assert torch.allclose(got, table[[999, 749, 499, 249]] ** 2, atol=1e-7)
    hand = [shift3(0.001) ** 2, shift3(0.251) ** 2, shift3(0.501) ** 2, shift3(0.751) ** 2]
    assert torch.allclose(got, torch.tensor(hand, dtype=torch.float64), atol=1e-9)
    assert got.tolist() == pytest.approx([9e-6, 0.251, 0.564, 0.811], abs=1e-3)
    assert omega_of(rf3, SD3Adapter.released, omega="paper")(t).tolist() == pytest.approx([0, .01, .0625, .25])


def test_sdxl_omega_is_sqrt_abar_and_flux_omega_is_one_minus_sigma_squared():
    ddpm = DDPM.scaled_linear()
    t = anchors(ddpm, UNIT)
    abar = sdxl_abar()[[999, 749, 499, 249]]
    got = omega_of(ddpm, SDXLAdapter.released)(t)
    assert torch.allclose(got, abar.sqrt(), atol=1e-9)
    assert got.tolist() == pytest.approx([0.068, 0.238, 0.527, 0.822], abs=1e-3)
    assert omega_of(ddpm, SDXLAdapter.released, omega="paper")(t).tolist() == \
        pytest.approx([0.0047, 0.057, 0.278, 0.675], abs=1e-3)
    flux = RectifiedFlow(mu=1.15)
    sig = anchors(flux, UNIT)
    assert torch.allclose(omega_of(flux, FluxAdapter.released)(sig), (1 - sig) ** 2)


# -- 8. discriminator loss time weight ------------------------------------------------------------------------
class HeadTerm(AdversarialTerm):
    """A 1x1-conv discriminator judging against a constant 'real' image."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 1, 1)

    def generator_loss(self, x0, batch):
        return hinge_generator_loss(self.head(x0))

    def discriminator_loss(self, x0_fake, batch):
        real = torch.full_like(x0_fake, 0.5)
        loss = hinge_discriminator_loss(self.head(real), self.head(x0_fake.detach()))
        return LossOutput(loss, {"loss_d": loss.detach()})


def test_discriminator_loss_weights_both_hinge_terms_by_omega():
    models = tiny_models()
    models.discriminator = HeadTerm()
    method = SenseFlow(models, SenseFlowConfig(adversarial_weight=1.0, isg_weight=0.0))
    batch = batch_of(models, 4)
    seed = next(s for s in range(100) if RandomStreams(s).shared_randint(0, 4) == 2)  # anchor 0.5: omega 0.25
    out = method.loss("discriminator", batch, RandomStreams(seed))
    gin, x = method.sample_generator_at(batch, RandomStreams(seed))
    timew = ((1 - gin.t) ** 2).float()
    assert timew.tolist() == [0.25] * 4
    d = models.discriminator.head
    with torch.no_grad():  # released: mean(l_d_real * timew) + mean(l_d_fake * timew), per-sample hinge (keepdim)
        l_real = F.relu(1 - d(torch.full_like(x, 0.5))).flatten(1).mean(1)
        l_fake = F.relu(1 + d(x)).flatten(1).mean(1)
        want = torch.mean(l_real * timew) + torch.mean(l_fake * timew)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-6)
    off = SenseFlow(models, SenseFlowConfig(adversarial_weight=1.0, isg_weight=0.0, discriminator_time_weight=False))
    unweighted = off.loss("discriminator", batch, RandomStreams(seed)).loss.item()
    assert unweighted == pytest.approx(want.item() / 0.25, rel=1e-6)


# -- minor ------------------------------------------------------------------------------------------------------
def test_dmd_time_range_is_the_released_integer_index_20_to_980():
    method_time = SenseFlowConfig().dmd_time.build()
    g = torch.Generator().manual_seed(0)
    idx = method_time.sample(50_000, DDPM.scaled_linear(), g)  # released randint(20, 981)
    assert idx.min().item() == 20 and idx.max().item() == 980 and torch.equal(idx, idx.round())
    sig = method_time.sample(20_000, RectifiedFlow(shift=3.0), g)
    flipped = torch.flip(FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas.double(), [0])  # released self.sigmas
    released = flipped[20:981]
    pos = torch.searchsorted(released, sig).clamp(1, len(released) - 1)
    gap = torch.minimum((released[pos] - sig).abs(), (released[pos - 1] - sig).abs())
    assert gap.max().item() < 1e-6  # every draw is an entry of the released table
    assert sig.min().item() == pytest.approx(shift3(0.021), abs=1e-6)
    assert sig.max().item() == pytest.approx(shift3(0.981), abs=1e-6)
    paper = SenseFlowConfig(reference="paper").dmd_time.build().sample(50_000, DDPM.scaled_linear(), g)
    assert paper.min().item() == 19 and paper.max().item() == 979  # round(1000 u) - 1 over u in [0.02, 0.98]


def test_ida_is_bit_exact_with_the_released_update():
    torch.manual_seed(0)
    fake, gen = nn.Linear(97, 136), nn.Linear(97, 136)  # 13,192 + 136 elements
    lam = 0.98
    before = [p.detach().clone() for p in fake.parameters()]
    IDAPlan(fake, gen).apply(lam)
    two_roundings_differ = 0
    for p, q, b in zip(fake.parameters(), gen.parameters(), before):
        released = b.clone().mul_(lam).add_(q.detach(), alpha=1 - lam)  # param_B.data.mul_(w).add_(A, alpha=1-w)
        assert torch.equal(p.detach(), released)
        two_roundings_differ += int((b * lam + (1 - lam) * q.detach() != released).sum())
    assert two_roundings_differ > 0  # the earlier formula rounds (1 - lam) * q separately


def test_sid_legacy_weight_floor_is_1e_5():
    models = tiny_models()
    sid = SiD(models, SiDConfig(weighting="legacy"))
    x = torch.randn(2, 3, 8, 8)
    w = sid.weight(torch.tensor([0.5, 0.5], dtype=torch.float64), x, x.clone())  # x_g == f_r: the floor
    assert w.tolist() == pytest.approx([1e5, 1e5])
    assert SiDConfig().legacy_weight_floor == 1e-5


def test_reference_preset_fills_only_the_keys_not_given():
    paper = SenseFlowConfig(reference="paper", isg_form="released")
    assert (paper.omega, paper.isg_mid_time, paper.isg_last_target, paper.isg_form) == \
        ("paper", "paper", "clean", "released")
    assert paper.fake_time.shift is False and paper.dmd_time.discrete is False and not paper.discriminator_time_weight
    rel = SenseFlowConfig()
    assert (rel.omega, rel.isg_form, rel.isg_mid_time, rel.isg_last_target) == ("released",) * 4
    assert rel.dmd_time.discrete and rel.fake_time.shift and rel.discriminator_time_weight


def test_built_generators_use_the_method_s_anchor_law():
    from pathlib import Path

    import yaml

    from senseflow.build import build_models
    from senseflow.config import apply_overrides, validate

    root = Path(__file__).resolve().parents[2]
    base = yaml.safe_load((root / "configs/examples/tiny_custom.yaml").read_text())

    def built(*sets):
        cfg = validate(apply_overrides(base, ["teacher.resolution=8", "teacher.shift=3.0", *sets]))
        return build_models(cfg, torch.device("cpu")).generator.anchors

    assert built("method={name: sid}") == [1.0, 0.75, 0.5, 0.25]
    assert built("method={name: sid, use_sd3_shift: true}") == pytest.approx([1.0, 0.9, 0.75, 0.5])
    assert built() == pytest.approx([1.0, 0.9, 0.75, 0.5])  # the recipe's SenseFlow


def test_discrete_time_grid_is_refused_outside_uniform():
    from pydantic import ValidationError

    from senseflow.configbase import TimeSamplerConfig

    with pytest.raises(ValidationError, match="discrete applies to kind uniform"):
        TimeSamplerConfig(kind="logit_normal", discrete=True)
