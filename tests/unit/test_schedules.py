import math

import pytest
import torch

from senseflow.schedules import (DDPM, RectifiedFlow, TimeSampler, TrigFlow, anchors, dynamic_shift, flow_to_trigflow,
                                 flux_mu, inverse_dynamic_shift, inverse_static_shift, sid_anchors, static_shift,
                                 trigflow_to_flow)

UNIT_ANCHORS = [1.0, 0.75, 0.5, 0.25]


def test_sd35_anchors_with_shift_3():
    got = anchors(RectifiedFlow(shift=3.0), UNIT_ANCHORS)
    assert got.dtype == torch.float64
    assert torch.allclose(got, torch.tensor([1.0, 0.9, 0.75, 0.5], dtype=torch.float64), atol=1e-12)


def test_flux_anchors_with_mu_1_15():
    got = anchors(RectifiedFlow(mu=1.15), UNIT_ANCHORS)
    expected = [1.0, 0.904, 0.759, 0.512]  # ALGORITHMS.md's values: the exact ones truncated to 3 decimals
    assert [math.floor(v * 1000) / 1000 for v in got.tolist()] == expected
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-3)


def test_flux_mu_at_1024_is_1_15():
    assert flux_mu((1024 // 16) ** 2) == pytest.approx(1.15)
    assert flux_mu(256) == pytest.approx(0.5)


def test_sdxl_anchors_are_ddpm_indices():
    sched = DDPM.scaled_linear()
    assert anchors(sched, UNIT_ANCHORS).tolist() == [999, 749, 499, 249]
    assert sched.from_unit(0.0).item() == -1  # clean
    assert sched.to_unit(torch.tensor([999.0, 249.0])).tolist() == [1.0, 0.25]


def test_sid_anchors():
    assert sid_anchors(4) == [1.0, 0.75, 0.5, 0.25]
    assert sid_anchors(1) == [1.0]


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_static_shift_round_trip(shift):
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.allclose(inverse_static_shift(static_shift(u, shift), shift), u, atol=1e-12)


def test_dynamic_shift_round_trip_and_endpoints():
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.allclose(inverse_dynamic_shift(dynamic_shift(u, 1.15), 1.15), u, atol=1e-12)
    assert dynamic_shift(torch.tensor([0.0, 1.0]), 0.7).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("sched", [RectifiedFlow(shift=3.0), RectifiedFlow(prediction="epsilon"),
                                   RectifiedFlow(prediction="x0"), DDPM.scaled_linear(),
                                   DDPM.scaled_linear(prediction="v"), TrigFlow()],
                         ids=["rf-velocity", "rf-eps", "rf-x0", "ddpm-eps", "ddpm-v", "trigflow"])
def test_prediction_conversions_round_trip(sched):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    t = sched.from_unit(torch.tensor([0.9, 0.6, 0.3, 0.1], dtype=torch.float64))
    x_t = sched.add_noise(x0, eps, t)
    pred = sched.target(x0, eps, t)
    assert torch.allclose(sched.to_x0(pred, x_t, t), x0, atol=1e-9)
    assert torch.allclose(sched.to_eps(x0, x_t, t), eps, atol=1e-9)
    assert torch.allclose(sched.from_x0(x0, x_t, t), pred, atol=1e-9)


def test_rectified_flow_velocity_conventions():
    sched = RectifiedFlow()
    x0, eps = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    x_t = sched.add_noise(x0, eps, t)
    v = eps - x0
    assert torch.allclose(sched.target(x0, eps, t), v)
    assert torch.allclose(x_t - t[:, None] * v, x0)  # x0 = x_t - t v
    assert torch.allclose(x_t + (1 - t[:, None]) * v, eps)  # eps = x_t + (1 - t) v


def test_deterministic_step_is_euler_for_flows_and_exact_on_the_path():
    sched = RectifiedFlow()
    x0, eps = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    t, t2 = torch.full((3,), 0.8, dtype=torch.float64), torch.full((3,), 0.35, dtype=torch.float64)
    x_t = sched.add_noise(x0, eps, t)
    v = eps - x0
    assert torch.allclose(sched.step(x_t, x0, t, t2), x_t + (t2 - t)[:, None] * v)
    assert torch.allclose(sched.step(x_t, x0, t, t2), sched.add_noise(x0, eps, t2))
    assert torch.allclose(sched.step(x_t, x0, t, torch.zeros(3, dtype=torch.float64)), x0)
    ddpm = DDPM.scaled_linear()
    ti = torch.full((3,), 749.0, dtype=torch.float64)
    x_t = ddpm.add_noise(x0, eps, ti)
    assert torch.allclose(ddpm.step(x_t, x0, ti, torch.full((3,), -1.0, dtype=torch.float64)), x0)


def test_trigflow_mapping_round_trip_and_matches_flow_state():
    x0, eps = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    s = torch.tensor([0.3, 1.2], dtype=torch.float64)
    x = torch.cos(s)[:, None] * x0 + torch.sin(s)[:, None] * eps
    x_t, t = trigflow_to_flow(x, s)
    assert torch.allclose(x_t, (1 - t)[:, None] * x0 + t[:, None] * eps)
    x_back, s_back = flow_to_trigflow(x_t, t)
    assert torch.allclose(x_back, x) and torch.allclose(s_back, s)
    trig = TrigFlow()
    assert torch.allclose(trig.to_unit(trig.from_unit(t)), t)


def test_omega_values():
    rf = RectifiedFlow()
    t = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    assert torch.allclose(rf.omega(t), (1 - t) ** 2)
    ddpm = DDPM.scaled_linear()
    idx = torch.tensor([999.0, 249.0], dtype=torch.float64)
    abar = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0)
    assert torch.allclose(ddpm.omega(idx), abar[[999, 249]])


def test_time_samplers_ranges_and_laws():
    g = torch.Generator().manual_seed(0)
    rf3 = RectifiedFlow(shift=3.0)
    u = TimeSampler("uniform", 0.02, 0.98, shift=False).sample(20000, rf3, g)
    assert u.min() >= 0.02 and u.max() <= 0.98 and abs(u.mean().item() - 0.5) < 0.01
    shifted = TimeSampler("uniform", 0.02, 0.98, shift=True).sample(20000, rf3, g)
    assert shifted.mean() > 0.6  # shift 3 pushes towards noise
    ln = TimeSampler("logit_normal", mean=math.log(2), std=1.6, shift=False).sample(50000, rf3, g)
    assert abs(torch.logit(ln).mean().item() - math.log(2)) < 0.03
    assert abs(torch.logit(ln).std().item() - 1.6) < 0.03
    ddpm_t = TimeSampler("teacher").sample(5000, DDPM.scaled_linear(), g)
    assert ddpm_t.min() >= 0 and ddpm_t.max() <= 999 and torch.equal(ddpm_t, ddpm_t.round())


def test_bad_schedule_arguments():
    with pytest.raises(ValueError):
        RectifiedFlow(prediction="banana")
    with pytest.raises(ValueError):
        RectifiedFlow(shift=3.0, mu=1.0)
    with pytest.raises(ValueError):
        DDPM(torch.tensor([0.5, 1.5]))
