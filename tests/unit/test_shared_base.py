"""senseflow.shared_base: one frozen base for LoRA networks; IDA, checkpoints and the memory estimate around it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from senseflow.lora import LoRAConfig, apply_lora, count_lora_parameters, lora_parameters, same_adapters
from senseflow.methods.dmd2 import IDAPlan
from senseflow.shared_base import (deepcopy_shares, is_shared, lora_network, share_frozen_base, shared_state_keys,
                                   wants_shared_base, weight_bytes)
from senseflow.teachers.base import SenseflowError, freeze
from tests.helpers.threads import single_thread  # noqa: F401


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 7))
    net.register_buffer("scale", torch.tensor([2.0]))
    return freeze(net)


def test_deepcopy_inside_the_context_allocates_no_second_base():
    teacher = _mlp()
    with deepcopy_shares(teacher):
        twin = copy.deepcopy(teacher)
    assert twin is not teacher and twin[0] is not teacher[0]        # a new module tree ...
    assert twin[0].weight is teacher[0].weight and twin.scale is teacher.scale   # ... over the same tensors
    assert copy.deepcopy(teacher)[0].weight is not teacher[0].weight              # outside: a real copy again


def test_a_family_method_that_writes_the_teacher_in_place_is_refused():
    teacher = _mlp()
    with pytest.raises(SenseflowError, match="in place"):
        with deepcopy_shares(teacher), torch.no_grad():
            copy.deepcopy(teacher)[0].weight.mul_(2)        # the "copy" IS the teacher's tensor


def test_only_equal_tensors_are_shared():
    teacher = _mlp()
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        other[2].bias.add_(1.0)                         # differs: stays its own
    assert share_frozen_base(other, teacher) == 4       # weight0, bias0, weight2, the buffer
    assert other[0].weight is teacher[0].weight and other[2].weight is teacher[2].weight
    assert other[2].bias is not teacher[2].bias and not is_shared(other[2].bias)


def test_lora_network_on_a_shared_base_trains_only_its_adapter():
    teacher = _mlp()
    cfg = LoRAConfig(rank=2, target_modules="all-linear")
    gen = lora_network(copy.deepcopy, teacher, cfg, share=True)
    fake = lora_network(copy.deepcopy, teacher, cfg, share=True)
    base = {id(p) for p in teacher.parameters()}
    for net in (gen, fake):
        assert {id(p) for n, p in net.named_parameters() if "lora_" not in n} == base
        assert all(not p.requires_grad for p in teacher.parameters())
    # the adapters are separate objects: the generator's loss reaches only the generator's
    assert not ({id(p) for p in lora_parameters(gen)} & {id(p) for p in lora_parameters(fake)})
    with torch.no_grad():
        for p in lora_parameters(gen):
            p.normal_()
    x = torch.randn(4, 3)
    gen(x).square().sum().backward()
    assert all(p.grad is not None for p in lora_parameters(gen))
    assert all(p.grad is None for p in (*lora_parameters(fake), *teacher.parameters()))
    # a checkpoint of the network keeps its adapters and nothing of the shared base
    keys = set(gen.state_dict()) - shared_state_keys(gen)
    assert keys and all("lora_" in k for k in keys)
    # PEFT with B = 0 at init: the fake score still computes exactly the teacher
    torch.testing.assert_close(fake(x), teacher(x), rtol=0, atol=0)


def test_ida_leaves_a_shared_tensor_alone_and_mixes_the_adapters_by_hand():
    """phi <- lam*phi + (1-lam)*theta on the adapters; the shared base w must stay w bit for bit."""
    teacher = _mlp()
    cfg = LoRAConfig(rank=1, target_modules=["2"])
    gen = lora_network(copy.deepcopy, teacher, cfg, share=True)
    fake = lora_network(copy.deepcopy, teacher, cfg, share=True)
    with torch.no_grad():
        for p in lora_parameters(gen):
            p.fill_(3.0)
        for p in lora_parameters(fake):
            p.fill_(1.0)
    w = teacher[2].weight.detach().clone()
    plan = IDAPlan(fake, gen)
    assert len(plan) == 2                               # lora_A and lora_B: the shared base is not in the plan
    plan.apply(0.75)
    assert torch.equal(teacher[2].weight, w)
    for p in lora_parameters(fake):                      # 0.75 * 1 + 0.25 * 3 = 1.5
        assert torch.equal(p, torch.full_like(p, 1.5))


def test_count_lora_parameters_by_hand_and_against_peft():
    net = _mlp()
    assert count_lora_parameters(net, 2, "all-linear") == (2 * (3 + 5) + 2 * (5 + 7), 4)
    from senseflow.bench.presets import get_preset
    for name in ("tiny", "tiny-flux", "tiny-sdxl"):
        backbone = get_preset(name).build_backbone("cpu", torch.float32, 0)
        want = count_lora_parameters(backbone, 3, "auto")
        apply_lora(backbone, rank=3)
        got = lora_parameters(backbone)
        assert want == (sum(p.numel() for p in got), len(got)), name


def test_shared_base_config_switch():
    a, b = LoRAConfig(rank=4), LoRAConfig(rank=4, shared_base=False)
    assert same_adapters(a, b) and not same_adapters(a, LoRAConfig(rank=8)) and same_adapters(None, None)
    assert wants_shared_base(a, "generator", sharded=False) and not wants_shared_base(b, "generator", False)
    assert not wants_shared_base(None, "generator", False)
    with pytest.warns(UserWarning, match="single-process"):
        assert not wants_shared_base(a, "generator", sharded=True)


def _tiny_presets() -> list[str]:
    from senseflow.bench.presets import PRESETS
    return [n for n, p in PRESETS.items() if not p.real]   # every family's tiny preset, present and future


@pytest.mark.parametrize("name", _tiny_presets())
def test_tiny_presets_weight_bytes_shared_base_is_under_half_of_three_copies(name):
    """Allocated bytes (distinct storages) of a CPU build: one base + two adapters vs three bases + two adapters."""
    from senseflow.bench.presets import get_preset
    from senseflow.bench.shared_base_table import measure_weight_bytes

    three = measure_weight_bytes(name, 2, shared=False)
    shared = measure_weight_bytes(name, 2, shared=True)
    backbone = get_preset(name).build_backbone("cpu", torch.float32, 0)
    base = weight_bytes(backbone)
    adapters = 4 * count_lora_parameters(get_preset(name).build_backbone(
        "meta", torch.float32, config=get_preset(name).student_config()), 2)[0]
    assert shared == base + 2 * adapters
    assert shared < 0.5 * three
    preset = get_preset(name)
    if preset.student_config() == dict(preset.config):   # not FLUX-like (a student without the guidance embedder)
        assert three == 3 * base + 2 * adapters


def test_memory_estimate_knows_the_shared_base_and_matches_the_cpu_build():
    from senseflow.bench.memory import estimate_memory
    from senseflow.bench.shared_base_table import measure_weight_bytes

    rows = ("teacher weights", "generator weights", "fake_score weights")
    est = {s: estimate_memory("tiny", "senseflow", "fp32", lora_rank=2, shared_base=s) for s in (False, True)}
    weights = {s: sum(r.bytes for r in e.static if r.component in rows) for s, e in est.items()}
    assert weights[True] == measure_weight_bytes("tiny", 2, shared=True)
    assert weights[False] == measure_weight_bytes("tiny", 2, shared=False)
    opt = {s: {r.component: r.bytes for r in e.static}["generator optimiser state (Adam m, v, step)"]
           for s, e in est.items()}
    lora_p, lora_t = count_lora_parameters(__import__("senseflow.bench.presets", fromlist=["x"]).get_preset(
        "tiny").build_backbone("meta", torch.float32), 2)
    assert opt[True] == opt[False] == 2 * 4 * lora_p + 4 * lora_t   # Adam m, v (fp32) + a step per tensor
    with pytest.raises(SenseflowError, match="lora-rank"):
        estimate_memory("tiny", "senseflow", "fp32", lora_rank=0)


def _shared_models(seed: int, share: bool):
    """Tiny SD3 preset: teacher + LoRA generator + LoRA fake score (adapters' B random, so they matter)."""
    from senseflow.bench.presets import get_preset
    from senseflow.teachers.base import Denoiser

    preset = get_preset("tiny")
    adapter = preset.make_adapter(preset.default_resolution, torch.device("cpu"), torch.float32)
    teacher = freeze(preset.build_backbone("cpu", torch.float32, seed))
    torch.manual_seed(seed)
    cfg = LoRAConfig(rank=2)
    nets = [lora_network(make, teacher, cfg, share) for make in (adapter.make_student, adapter.make_fake_score)]
    with torch.no_grad():
        for net in nets:
            for n, p in net.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    return preset, adapter, [Denoiser(m, adapter) for m in (teacher, *nets)]


@pytest.mark.slow  # ~60 s on a loaded 2-core CPU: TorchDynamo + AOT autograd tracing of the tiny SD3 blocks of three networks
def test_shared_base_with_checkpointing_and_compiled_blocks_equals_three_eager_copies():
    """train.compile (aot_eager, see test_compiled.py) + activation checkpointing on a shared base == eager copies."""
    from types import SimpleNamespace

    from senseflow.train.compiled import compile_models
    from senseflow.train.distributed import checkpoint_blocks

    preset, adapter, eager = _shared_models(0, share=False)
    _, _, shared = _shared_models(0, share=True)
    for d in shared[1:]:
        checkpoint_blocks(d.backbone, adapter.block_names(d.backbone))
    models = SimpleNamespace(teacher=shared[0], generator=SimpleNamespace(denoiser=shared[1]), fake_score=shared[2])
    assert compile_models(models, "blocks", backend="aot_eager") == 6
    cond = preset.conditioning(2, torch.device("cpu"), torch.float32, seed=0)
    x = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.7, 0.3])

    def run(nets):
        teacher, gen, fake = nets
        with torch.no_grad():
            real = teacher(x, t, cond)
        out = gen(x, t, cond)
        (out.square().sum() + fake(out.detach(), t, cond).square().sum()).backward()
        grads = {f"{i}/{n}": p.grad for i, d in enumerate((gen, fake)) for n, p in d.named_parameters()
                 if p.requires_grad}
        return real, out.detach(), grads

    (re, oe, ge), (rs, os_, gs) = run(eager), run(shared)
    torch.testing.assert_close(rs, re, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(os_, oe, rtol=1e-5, atol=1e-6)
    assert ge.keys() == gs.keys() and ge
    for k in ge:
        assert ge[k] is not None and gs[k] is not None, k
        torch.testing.assert_close(gs[k], ge[k], rtol=1e-4, atol=1e-6, msg=k)
    assert all(p.grad is None for p in shared[0].parameters())    # the teacher (= the shared base) gets none


@pytest.mark.parametrize("shared", [True, False])
def test_bench_runner_lora_resident_tensors_equal_the_estimate(shared):
    """``senseflow bench --lora-rank 2`` on the tiny preset: measured weights and Adam state == the estimate."""
    from senseflow.bench.memory import compare_with_run, estimate_memory
    from senseflow.bench.runner import BenchSettings, run_benchmark

    result = run_benchmark(BenchSettings(preset="tiny", method="senseflow", iterations=1, warmup=0, count_flops=False,
                                         count_passes=False, device="cpu", lora_rank=2, shared_base=shared))
    est = estimate_memory("tiny", "senseflow", "fp32", batch_size=2, lora_rank=2, shared_base=shared)
    rows = {name: (e, m) for name, e, m in compare_with_run(est, result) if "weights" in name or "optimiser" in name}
    assert len(rows) == 5 and all(e == m for e, m in rows.values()), rows
    gen_weights = rows["generator weights (+ buffers)"][1]
    adapters = 4 * count_lora_parameters(__import__("senseflow.bench.presets", fromlist=["x"]).get_preset(
        "tiny").build_backbone("meta", torch.float32), 2)[0]
    assert (gen_weights == adapters) is shared          # shared: the generator owns only its adapters
