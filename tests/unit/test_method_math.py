"""The losses' math against ALGORITHMS.md: gradients, identities, IDA, ISG, backward simulation."""

import pytest
import torch

from senseflow.configbase import TimeSamplerConfig
from senseflow.generator import GeneratorInput
from senseflow.methods import DMD2, DMD2Config, GuidanceSpec, SenseFlow, SenseFlowConfig, SiD, SiDConfig, ida_update
from senseflow.methods.base import Batch
from senseflow.rng import RandomStreams
from tests.helpers.models import PROMPTS, linear_models, tiny_models


def _batch(models, prompts=PROMPTS):
    return Batch(list(prompts), models.teacher.adapter.encode_prompts(prompts))


def _clone(rng: RandomStreams) -> RandomStreams:
    other = RandomStreams(0)
    other.load_state_dict(rng.state_dict())
    return other


def test_dmd_gradient_equals_normalised_score_difference():
    models = tiny_models()
    method = DMD2(models, DMD2Config(real_guidance=GuidanceSpec(cfg=3.0)))
    batch = _batch(models)
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    rng = RandomStreams(7)
    replay = _clone(rng)
    loss, _ = method.dmd_loss(x, batch.cond, rng)
    loss.backward()
    # recompute the scores with the same draws
    t = method.dmd_time.sample(4, method.schedule, replay.local, replay.device)
    eps = replay.randn_like(x)
    x_t = method.schedule.add_noise(x.detach(), eps, t)
    with torch.no_grad():
        x0_real = models.teacher(x_t, t, batch.cond, method.config.real_guidance.sample(replay))
        x0_fake = models.fake_score(x_t, t, batch.cond, method.config.fake_guidance.sample(replay))
    norm = (x.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (x0_fake - x0_real) / norm / x.numel()  # 0.5 * mean((x - sg(x - g))^2) -> g / N
    assert torch.allclose(x.grad, expected, atol=1e-7, rtol=1e-5)
    # fake == teacher at init but CFG differs, so the gradient must be non-trivial
    assert x.grad.abs().max() > 0


def test_dmd_gradient_is_zero_when_fake_equals_real():
    models = tiny_models()
    method = DMD2(models, DMD2Config(real_guidance=GuidanceSpec()))
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss, _ = method.dmd_loss(x, _batch(models, PROMPTS[:2]).cond, RandomStreams(0))
    loss.backward()
    assert torch.count_nonzero(x.grad) == 0


def _sid(models, **kw):
    cfg = SiDConfig(teacher_guidance=GuidanceSpec(), fake_guidance=GuidanceSpec(), **kw)
    return SiD(models, cfg)


def test_sid_detached_legacy_gradient_matches_dmd_direction():
    models = tiny_models()
    # make fake differ from the teacher so the direction is non-trivial
    with torch.no_grad():
        for p in models.fake_score.parameters():
            p.add_(0.05 * torch.randn_like(p))
    models.fake_score.requires_grad_(False)
    sampler = TimeSamplerConfig(kind="uniform", low=0.1, high=0.9, shift=False)
    sid = _sid(models, weighting="legacy", alpha=1.0, score_gradients="detached", time=sampler)
    dmd = DMD2(models, DMD2Config(real_guidance=GuidanceSpec(), dmd_time=sampler))
    cond = _batch(models).cond
    x_sid = torch.randn(4, 3, 8, 8, requires_grad=True)
    x_dmd = x_sid.detach().clone().requires_grad_(True)
    sid.sid_loss(x_sid, cond, RandomStreams(3)).loss.backward()
    dmd.dmd_loss(x_dmd, cond, RandomStreams(3))[0].backward()
    # SiD = DMD * lambda_sid / B * N  (same direction, per sample and overall)
    scale = sid.config.lambda_sid / 4 * x_dmd.numel()
    assert torch.allclose(x_sid.grad, x_dmd.grad * scale, rtol=1e-4, atol=1e-6)
    assert x_sid.grad.abs().max() > 0


def test_sid_gradients_flow_through_frozen_networks_only_into_generator():
    models = tiny_models()
    with torch.no_grad():
        for p in models.fake_score.parameters():
            p.add_(0.05 * torch.randn_like(p))
    models.fake_score.requires_grad_(False)  # the trainer freezes it during G's phase
    cond = _batch(models).cond
    x0 = torch.randn(4, 3, 8, 8)
    grads = {}
    for mode in ("through", "detached"):
        x = x0.clone().requires_grad_(True)
        _sid(models, score_gradients=mode).sid_loss(x, cond, RandomStreams(5)).loss.backward()
        grads[mode] = x.grad
    assert not torch.allclose(grads["through"], grads["detached"], atol=1e-6)
    for p in list(models.teacher.parameters()) + list(models.fake_score.parameters()):
        assert p.grad is None
    # and the full generator loss reaches G's parameters
    sid = _sid(models)
    sid.generator_loss(_batch(models), RandomStreams(1)).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in models.generator.parameters())
    assert all(p.grad is None for p in models.teacher.parameters())


def test_sid_weighting_one_minus_t_and_nan_drop():
    models = tiny_models()
    sid = _sid(models)
    t = torch.tensor([0.2, 0.7], dtype=torch.float64)
    w = sid.weight(t, torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8))
    assert torch.allclose(w, torch.tensor([0.8, 0.3]))
    loss, dropped = sid.reduce(torch.tensor([1.0, float("nan"), 3.0, 4.0]), 2.0)
    assert loss.item() == pytest.approx(2.0 * 8.0 / 4) and dropped.item() == 1


def test_ida_exact_interpolation_after_generator_step():
    models = tiny_models()
    method = SenseFlow(models, SenseFlowConfig(ida_lambda=0.97, isg_weight=0.0))
    with torch.no_grad():  # pretend G took a step
        for p in models.generator.parameters():
            p.add_(torch.randn_like(p))
    old = {n: p.detach().clone() for n, p in models.fake_score.backbone.named_parameters()}
    method.after_step("fake_score")  # no IDA after fake steps
    for n, p in models.fake_score.backbone.named_parameters():
        assert torch.equal(p, old[n])
    method.after_step("generator")
    gen = dict(models.generator.denoiser.backbone.named_parameters())
    for n, p in models.fake_score.backbone.named_parameters():
        # the released update, bit for bit: param_B.data.mul_(ida_w).add_(param_A.data, alpha=1 - ida_w)
        assert torch.equal(p, old[n].mul(0.97).add(gen[n].detach(), alpha=1 - 0.97))


def test_ida_skips_parameters_the_generator_lacks_and_rejects_shape_mismatch():
    a, b = torch.nn.Linear(2, 2), torch.nn.Sequential()
    assert ida_update(a, b, 0.5) == 0
    c = torch.nn.Linear(2, 3)
    with pytest.raises(ValueError, match="shape"):
        ida_update(a, c, 0.5)


def test_isg_target_matches_hand_computation_on_linear_backbone():
    a_t, a_g = 0.6, -0.3
    models = linear_models(a_t, a_g)
    method = SenseFlow(models, SenseFlowConfig(isg_guidance=GuidanceSpec(), isg_margin=50))
    batch = _batch(models, ["a", "b"])
    x = torch.randn(2, 1, 2, 2, dtype=torch.float32)
    t = torch.tensor([0.75, 0.75], dtype=torch.float64)
    t_next = torch.tensor([0.5, 0.5], dtype=torch.float64)
    gin = GeneratorInput(x_t=x, index=1, t=t, t_next=t_next, backward_simulated=True)
    t_mid = torch.tensor([0.6, 0.7], dtype=torch.float64)
    x_tar = method.isg_target(gin, t_mid, batch, RandomStreams(0))
    tm = t_mid.float()[:, None, None, None]
    x_mid = x * (1 + (tm - 0.75) * a_t)  # teacher Euler step with v = a_t x
    expected = x_mid * (1 + (0.5 - tm) * a_g)  # student Euler step with v = a_g x
    assert torch.allclose(x_tar, expected, atol=1e-6)


def test_isg_mid_time_respects_margins_in_index_space():
    models = tiny_models(shift=3.0)
    method = SenseFlow(models, SenseFlowConfig(isg_margin=50))
    sched = method.schedule
    n = 4000
    t = sched.from_unit(torch.full((n,), 0.75, dtype=torch.float64))
    t_next = sched.from_unit(torch.full((n,), 0.5, dtype=torch.float64))
    gin = GeneratorInput(torch.zeros(n, 3, 8, 8), 1, t, t_next, True)
    u_mid = sched.to_unit(method.sample_mid_time(gin, RandomStreams(0)))
    assert u_mid.min() >= 0.55 - 1e-9 and u_mid.max() <= 0.70 + 1e-9
    assert u_mid.max() - u_mid.min() > 0.13  # actually spread over the allowed interval


def test_isg_loss_pseudo_huber_and_l2():
    models = linear_models(0.5, 0.5)
    x = torch.randn(2, 1, 2, 2)
    gin = GeneratorInput(x, 0, torch.ones(2, dtype=torch.float64), torch.full((2,), 0.75, dtype=torch.float64), True)
    for kind in ("pseudo_huber", "l2"):
        method = SenseFlow(models, SenseFlowConfig(isg_loss=kind, isg_guidance=GuidanceSpec()))
        x0_hat = models.generator(x, gin.t, _batch(models, ["a", "b"]).cond).detach().requires_grad_(True)
        loss = method.isg_loss(gin, x0_hat, _batch(models, ["a", "b"]), RandomStreams(0))
        # teacher == student (same linear velocity) and Euler is exact for linear v? not in general,
        # but the loss must be finite and non-negative, and zero only for identical paths
        assert torch.isfinite(loss) and loss >= 0


def test_backward_simulation_shares_k_across_ranks_and_noise_differs():
    models = tiny_models()
    cond = _batch(models, PROMPTS[:2]).cond
    r0, r1 = RandomStreams(11, rank=0), RandomStreams(11, rank=1)
    for _ in range(5):
        g0 = models.generator.training_input(cond, (2, 3, 8, 8), r0)
        g1 = models.generator.training_input(cond, (2, 3, 8, 8), r1)
        assert g0.index == g1.index
        assert not torch.allclose(g0.x_t, g1.x_t)


def test_stochastic_and_euler_samplers():
    models = linear_models(0.0, 0.0)
    gen = models.generator
    cond = _batch(models, ["a"]).cond
    noise = torch.randn(1, 1, 2, 2)
    # v = 0 -> x0_hat = x_t at every anchor; Euler keeps x constant, stochastic re-noises
    out_euler = gen.sample(noise, cond, sampler="euler")
    assert torch.allclose(out_euler, noise)
    g = torch.Generator().manual_seed(0)
    out_sto = gen.sample(noise, cond, sampler="stochastic", generator=g)
    assert not torch.allclose(out_sto, noise)
    with pytest.raises(ValueError):
        gen.sample(noise, cond, sampler="heun")


def test_guidance_interval_guides_only_the_noise_levels_inside_it():
    spec = GuidanceSpec(cfg=3.0, interval=(0.3, 0.7))
    g = spec.sample(RandomStreams(0), torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64))
    assert g.cfg.tolist() == [1.0, 3.0, 3.0, 3.0, 1.0]
    assert GuidanceSpec(cfg=3.0).sample(RandomStreams(0)).cfg == 3.0  # no interval: a scalar, everywhere
    with pytest.raises(ValueError, match="noise levels"):
        spec.sample(RandomStreams(0))
    for bad in [(0.7, 0.3), (-0.1, 0.5), (0.5, 1.2)]:
        with pytest.raises(ValueError, match="interval"):
            GuidanceSpec(cfg=3.0, interval=bad)


def test_dmd_with_a_guidance_interval_moves_only_the_samples_guided_there():
    """At initialisation fake == teacher, so a sample's DMD gradient is non-zero only where CFG is on."""
    models = tiny_models()
    n = 8
    probe = DMD2(models, DMD2Config(real_guidance=GuidanceSpec(cfg=3.0)))
    sigma = probe.schedule.sigma(probe.dmd_time.sample(n, probe.schedule, RandomStreams(3).local, "cpu"))
    cut = float(sigma.median())
    method = DMD2(models, DMD2Config(real_guidance=GuidanceSpec(cfg=3.0, interval=(0.0, cut))))
    x = torch.randn(n, 3, 8, 8, requires_grad=True)
    loss, _ = method.dmd_loss(x, _batch(models, (PROMPTS * 4)[:n]).cond, RandomStreams(3))
    loss.backward()
    size = x.grad.flatten(1).abs().amax(dim=1)
    moved = size > 1e-4 * size.max()  # cfg 1 = uncond + 1 * (cond - uncond): zero up to rounding
    assert moved.tolist() == (sigma <= cut).tolist()
    assert 0 < int(moved.sum()) < n
