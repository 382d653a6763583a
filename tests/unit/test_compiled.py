"""``train.compile`` (regional torch.compile of each block) equals eager; fused/foreach optimisers.

The CPU test compiles with the ``aot_eager`` backend: TorchDynamo graph capture and AOT autograd
(functionalisation, decompositions, the joint forward/backward graph) run exactly as with
inductor, only the final kernels are eager ATen -- inductor's C++ code generation of the tiny SD3
blocks takes ~2 minutes on this CPU.  Inductor numerics are in the GPU suite (compile off vs on).
Tolerance: 1e-5 of the largest magnitude, for outputs, input gradients and parameter gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch

from senseflow.bench.presets import get_preset
from senseflow.config import OptimizerConfig, TrainConfig
from senseflow.teachers.base import Denoiser
from senseflow.train.compiled import compile_blocks, compile_enabled, optimizer_kernels
from senseflow.train.distributed import checkpoint_blocks
from senseflow.train.trainer import build_optimizer
from tests.helpers.threads import single_thread  # noqa: E402,F401 (module-wide autouse: one thread)

TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()


@pytest.mark.slow  # ~10-20 s each: TorchDynamo + AOT autograd tracing of two SD3 blocks, forward and backward
@pytest.mark.parametrize("checkpointed", [False, True])
def test_compiled_blocks_equal_eager_forward_and_backward(checkpointed):
    preset = get_preset("tiny")
    device = torch.device("cpu")
    adapter = preset.make_adapter(preset.default_resolution, device, torch.float32)
    eager = preset.build_backbone(device, torch.float32, 0)
    compiled = copy.deepcopy(eager)
    names = adapter.block_names(compiled)
    if checkpointed:  # the GPU suite's setting: activation checkpointing, then compile (as the trainer orders them)
        checkpoint_blocks(compiled, names)
    assert compile_blocks(compiled, names, backend="aot_eager") == len(names) == 2
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    cond = preset.conditioning(2, device, torch.float32, seed=0)
    x = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.7, 0.3])

    def run(backbone):
        xx = x.clone().requires_grad_(True)
        out = Denoiser(backbone, adapter)(xx, t, cond)
        out.square().sum().backward()
        return out.detach(), xx.grad, [p.grad for p in backbone.parameters()]

    (oe, xe, ge), (oc, xc, gc) = run(eager), run(compiled)
    assert _rel(oe, oc) <= TOL and _rel(xe, xc) <= TOL
    assert max(_rel(a, b) for a, b in zip(ge, gc)) <= TOL
    assert not torch.equal(oe, torch.zeros_like(oe))


def test_compile_setting_values():
    assert [compile_enabled(TrainConfig(compile=v).compile) for v in (False, True, "blocks")] == [False, True, True]
    with pytest.raises(ValueError):
        TrainConfig(compile="everything")


def test_cpu_optimiser_is_foreach_and_keeps_adamw_update():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    assert optimizer_kernels([p]) == {"foreach": True}
    opt = build_optimizer([p], OptimizerConfig(lr=0.1, weight_decay=0.5))
    assert opt.defaults["foreach"] is True
    p.grad = torch.tensor([0.5, -3.0])
    opt.step()
    # first AdamW step: p * (1 - lr * wd) - lr * g / (|g| + eps)  ->  [1 * 0.95 - 0.1, -2 * 0.95 + 0.1]
    assert torch.allclose(p.detach(), torch.tensor([0.85, -1.8]), atol=1e-6)
