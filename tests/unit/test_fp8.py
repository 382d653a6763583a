"""fp8 weight-only storage of the frozen teacher (``teacher.weight_dtype: fp8_e4m3``).

Hand-checked values: e4m3 keeps 3 mantissa bits, the largest finite value is 448, the smallest
normal 2^-6 and the subnormal step 2^-9 (OCP FP8 spec).  Per-channel scale = amax(|row|) / 448.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from senseflow.bench.presets import get_preset
from senseflow.teachers.base import Denoiser, SenseflowError
from senseflow.train.fp8 import (FP8_DTYPE, Float8Linear, dequantize_fp8, fp8_weight_bytes, quantize_fp8,
                                 quantize_linears, weight_bytes)
from tests.helpers.threads import single_thread  # noqa: F401 (module-wide autouse: one thread)


def test_quantize_hand_values():
    # row 0: amax 448 -> scale 1; 0.3 = 1.2 * 2^-2 rounds to 1.25 * 2^-2 = 0.3125 (3 mantissa bits: 1.125 / 1.25)
    # row 1: amax 896 -> scale 2; 3.3 / 2 = 1.65 rounds to 1.625 -> 3.25; -896 -> -448 * 2 exactly
    # row 2: all zero -> scale 1, q = 0 (no division by zero)
    w = torch.tensor([[448.0, 1.0, 0.3], [-896.0, 3.3, 0.0], [0.0, 0.0, 0.0]])
    q, scale = quantize_fp8(w)
    assert q.dtype == FP8_DTYPE and scale.dtype == torch.float32 and scale.shape == (3, 1)
    assert scale.flatten().tolist() == [1.0, 2.0, 1.0]
    deq = dequantize_fp8(q, scale)
    assert deq.tolist() == [[448.0, 1.0, 0.3125], [-896.0, 3.25, 0.0], [0.0, 0.0, 0.0]]


def test_round_trip_error_bound():
    """|W - q * scale| <= |W| * 2^-4 (half a 3-bit mantissa step) + scale * 2^-10 (half the subnormal step)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * torch.logspace(-3, 1, 64).unsqueeze(1)   # rows of very different size
    w[0, :8] = torch.tensor([1e-6, -1e-5, 3e-4, 0.0, 1e-7, 2e-6, -4e-6, 5e-5])       # subnormal territory
    q, scale = quantize_fp8(w)
    err = (w - dequantize_fp8(q, scale)).abs()
    bound = w.abs() * 2.0 ** -4 + scale * 2.0 ** -10
    assert (err <= bound * (1 + 1e-6)).all()
    # and the bound is not loose: the typical relative error of a uniform 3-bit rounding is ~2^-4 / 2
    rel = (err / w.abs().clamp_min(1e-30))[w.abs() > scale * 2.0 ** -6]
    assert 0.01 < rel.mean().item() < 2.0 ** -4
    assert (scale.flatten() == w.abs().amax(dim=1) / 448.0).all()


def _tiny_teacher():
    preset = get_preset("tiny")
    adapter = preset.make_adapter(preset.default_resolution, "cpu", torch.float32)
    backbone = preset.build_backbone("cpu", torch.float32, 0).requires_grad_(False).eval()
    return preset, adapter, backbone


def test_tiny_teacher_forward_close_to_fp32_and_quarter_weight_bytes():
    import copy

    preset, adapter, ref = _tiny_teacher()
    fp8 = copy.deepcopy(ref)
    linear_bytes = sum(m.weight.numel() * 4 for m in ref.modules() if isinstance(m, nn.Linear))
    rows = sum(m.out_features for m in ref.modules() if isinstance(m, nn.Linear))
    before, predicted = weight_bytes(fp8), fp8_weight_bytes(fp8)
    n = quantize_linears(fp8)
    assert weight_bytes(fp8) == predicted       # the estimate docs/performance.md quotes for the real presets
    assert n == sum(isinstance(m, nn.Linear) for m in ref.modules()) and n > 10
    assert not any(isinstance(m, nn.Linear) for m in fp8.modules())
    # each linear weight: 1 byte per entry + one fp32 scale per output row, instead of 4 bytes per entry
    assert before - weight_bytes(fp8) == linear_bytes - (linear_bytes // 4 + 4 * rows)
    linear_fp8 = sum(m.weight_fp8.numel() + 4 * m.out_features for m in fp8.modules() if isinstance(m, Float8Linear))
    # (in + 4) / (4 in) per layer: the tiny SD3's narrow layers (in = 32..128) pay more for their scales
    assert 0.25 < linear_fp8 / linear_bytes < 0.3
    wide = Float8Linear.from_linear(nn.Linear(1024, 1024).requires_grad_(False))
    assert (weight_bytes(wide) - 4 * 1024) / (4 * 1024 * 1024) == (1024 + 4) / 4096   # 0.251: ~1/4 (bias aside)

    cond = preset.conditioning(2, "cpu", torch.float32, seed=0)
    x = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.8, 0.3])
    out_ref = Denoiser(ref, adapter)(x, t, cond)
    out_fp8 = Denoiser(fp8, adapter)(x, t, cond)
    # measured ~1e-2 of the output scale on this random tiny SD3; 5% is the stated tolerance
    rel = ((out_fp8 - out_ref).abs().max() / out_ref.abs().max()).item()
    assert 0.0 < rel < 0.05
    # input gradients flow through the dequantised weights (SiD backpropagates through the teacher)
    xx = x.clone().requires_grad_(True)
    Denoiser(fp8, adapter)(xx, t, cond).sum().backward()
    assert xx.grad is not None and torch.isfinite(xx.grad).all() and xx.grad.abs().sum() > 0


def test_float8_linear_matches_dequantised_matmul():
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(16, 8).requires_grad_(False)
    f8 = Float8Linear.from_linear(lin)
    x = torch.randn(4, 16, generator=g)
    w = f8.weight_fp8.float() * f8.weight_scale
    torch.testing.assert_close(f8(x), x @ w.T + lin.bias, rtol=0, atol=1e-6)
    # computes in the input's dtype: bf16 activations give bf16 outputs
    assert f8(x.bfloat16()).dtype == torch.bfloat16
    assert set(f8.state_dict()) == {"weight_fp8", "weight_scale", "bias"} and not list(f8.parameters())


def test_refused_on_trainable_networks():
    student = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))   # requires_grad: a generator / fake
    with pytest.raises(SenseflowError, match="frozen teacher"):
        quantize_linears(student)
    assert isinstance(student[0], nn.Linear) and isinstance(student[2], nn.Linear)   # nothing changed
    with pytest.raises(SenseflowError, match="frozen teacher only"):
        Float8Linear.from_linear(nn.Linear(3, 3))


def test_non_finite_weights_refused():
    w = torch.ones(2, 2)
    w[1, 0] = math.inf
    with pytest.raises(SenseflowError, match="non-finite"):
        quantize_fp8(w)


@pytest.mark.parametrize("name,t", [("tiny-flux", [0.5, 0.3]), ("tiny-sdxl", [500.0, 300.0]), ("tiny-custom", [0.5, 0.3])])
def test_fp8_teacher_of_every_family_stays_close(name, t):
    """No family's backbone reads ``linear.weight`` behind the module's back (FLUX, the SDXL UNet, a custom net)."""
    import copy

    preset = get_preset(name)
    adapter = preset.make_adapter(preset.default_resolution, "cpu", torch.float32)
    ref = preset.build_backbone("cpu", torch.float32, 0).requires_grad_(False).eval()
    fp8 = copy.deepcopy(ref)
    assert quantize_linears(fp8) >= 2
    cond = preset.conditioning(2, "cpu", torch.float32, seed=0)
    x = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(1))
    tt = torch.tensor(t)
    out_ref, out_fp8 = Denoiser(ref, adapter)(x, tt, cond), Denoiser(fp8, adapter)(x, tt, cond)
    rel = ((out_fp8 - out_ref).abs().max() / out_ref.abs().max()).item()
    assert 0.0 < rel < 0.05      # measured 0.2-0.9%
