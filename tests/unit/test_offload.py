"""CPU offload of the frozen teacher and the text encoders (``teacher.cpu_offload``), and fp8 in a run.

On this CPU-only machine the execution device is the CPU too, so what is checked is the
mechanism: between calls the offloaded module holds only ``meta`` tensors (its weights live in
accelerate's host-side weights map), every op of a forward sees real tensors, outputs and input
gradients equal the plain module's EXACTLY, and backward works after the forward already put the
module back on ``meta`` (an offload that swapped ``param.data`` in place would hand backward the
meta tensors and fail here).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.overrides import TorchFunctionMode

from senseflow import api
from senseflow.bench.presets import get_preset
from senseflow.config import load_config
from senseflow.teachers.base import Denoiser, SenseflowError
from senseflow.toy.demo import RECIPES
from senseflow.train.fp8 import FP8_DTYPE, Float8Linear, weight_bytes
from senseflow.train.frozen import check_teacher_storage
from senseflow.train.offload import is_offloaded, offload_module, offload_text_encoders, onloaded_bytes
from tests.helpers.threads import single_thread  # noqa: F401 (module-wide autouse: one thread)


class NoMetaOps(TorchFunctionMode):
    """Records the weight-consuming ops of a forward and any of them that received a meta tensor.

    Metadata reads and accelerate's own moves (``.to``) touch meta tensors by design; the ops that
    COMPUTE with weights must never see one.
    """

    COMPUTE = {"linear", "conv2d", "layer_norm", "group_norm", "scaled_dot_product_attention", "matmul", "bmm",
               "baddbmm", "addmm", "embedding"}

    def __init__(self) -> None:
        super().__init__()
        self.calls, self.meta = 0, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in self.COMPUTE:
            self.calls += 1
            if any(isinstance(a, torch.Tensor) and a.is_meta for a in [*args, *kwargs.values()]):
                self.meta.append(name)
        return func(*args, **kwargs)


def _meta_only(module: torch.nn.Module) -> bool:
    return all(t.is_meta for t in module.parameters()) and all(
        t.is_meta for name, t in module.named_buffers() if name in module.state_dict())


def test_offloaded_teacher_equals_plain_and_keeps_weights_on_the_host():
    preset = get_preset("tiny")
    adapter = preset.make_adapter(preset.default_resolution, "cpu", torch.float32)
    plain = preset.build_backbone("cpu", torch.float32, 0).requires_grad_(False).eval()
    full = weight_bytes(plain)
    off = offload_module(copy.deepcopy(plain), "cpu")
    assert is_offloaded(off) and _meta_only(off)
    assert onloaded_bytes(off) < 0.01 * full          # only non-persistent buffers stay on the device
    host = off._hf_hook.weights_map if hasattr(off._hf_hook, "weights_map") else None
    cond = preset.conditioning(2, "cpu", torch.float32, seed=0)
    x = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.9, 0.2])

    def run(backbone, mode=None):
        xx = x.clone().requires_grad_(True)
        if mode is None:
            out = Denoiser(backbone, adapter)(xx, t, cond)
        else:
            with mode:
                out = Denoiser(backbone, adapter)(xx, t, cond)
        between = _meta_only(backbone)          # after the forward, before the backward
        out.square().sum().backward()
        return out.detach(), xx.grad, between

    ref_out, ref_grad, _ = run(plain)
    mode = NoMetaOps()
    out, grad, between = run(off, mode)
    assert mode.calls > 20 and mode.meta == [], mode.meta[:5]   # every op saw onloaded weights
    assert between, "the weights went back to the host right after the forward"
    assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad)
    assert _meta_only(off) and onloaded_bytes(off) < 0.01 * full
    if host is not None:     # the single host copy the weights are served from
        assert all(v.device.type == "cpu" for v in host.values())


def test_offloaded_text_encoders_encode_the_same():
    from senseflow.toy.teacher import TEACHER_ASSET, load_toy_teacher

    adapter, _ = load_toy_teacher(TEACHER_ASSET, device="cpu")
    prompts = ["a red circle", "two blue squares", ""]
    ref = adapter.encode_prompts(prompts)
    encoders = adapter.text_encoders()
    assert offload_text_encoders(encoders, "cpu") == len(encoders) >= 1
    assert all(_meta_only(e.model) for e in encoders)
    out = adapter.encode_prompts(prompts)
    for k, v in ref.tensors.items():
        assert torch.equal(out.tensors[k], v), k
    assert all(_meta_only(e.model) for e in encoders)
    assert offload_text_encoders(encoders, "cpu") == 0          # already offloaded: nothing done twice


def test_offload_refuses_trainable_modules():
    with pytest.raises(ValueError, match="trainable"):
        offload_module(torch.nn.Linear(2, 2), "cpu")


def _toy(tmp_path, *sets):
    return load_config(RECIPES / "dmd2.yaml", [f"paths.output={tmp_path}", "train.steps=1", "train.batch_size=2",
                                               "train.num_samples=0", "train.progress=false",
                                               "train.tensorboard=false", "train.device=cpu", *sets])


def test_offload_changes_no_maths_in_a_run(tmp_path):
    """One DMD2 iteration on the toy teacher: same losses with the teacher + text encoders offloaded."""
    plain = api.train(_toy(tmp_path / "plain")).last_logs
    trainer = api.train(_toy(tmp_path / "off", "teacher.cpu_offload=all"))
    teacher = trainer.method.models.teacher
    assert is_offloaded(teacher.backbone) and all(is_offloaded(e.model) for e in teacher.adapter.text_encoders())
    assert not is_offloaded(trainer.method.models.generator.denoiser.backbone)
    logs = trainer.last_logs
    keys = [k for k in plain if k.startswith("loss_")]
    assert keys and all(logs[k] == plain[k] for k in keys), {k: (plain[k], logs[k]) for k in keys}


def test_fp8_teacher_run_never_stores_fp8_in_the_student(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "fp8"
    trainer = api.train(_toy(out, "teacher.weight_dtype=fp8_e4m3"))
    models = trainer.method.models
    assert any(isinstance(m, Float8Linear) for m in models.teacher.backbone.modules())
    for net in (models.generator.denoiser.backbone, models.fake_score.backbone):
        assert not any(isinstance(m, Float8Linear) for m in net.modules())
        assert all(v.dtype != FP8_DTYPE for v in net.state_dict().values())
    saved = load_file(str(out / "student" / "student.safetensors"))
    assert saved and all(v.dtype == torch.float32 for v in saved.values())
    ckpts = sorted((out / "checkpoints").rglob("*.safetensors"))
    assert ckpts and all(v.dtype != FP8_DTYPE for c in ckpts for v in load_file(str(c)).values())


def test_refusals_are_one_line_before_anything_is_built(tmp_path):
    with pytest.raises(SenseflowError, match="single-process"):
        check_teacher_storage(_toy(tmp_path, "teacher.weight_dtype=fp8_e4m3"), distributed=True)
    with pytest.raises(SenseflowError, match="train.compile"):
        check_teacher_storage(_toy(tmp_path, "teacher.cpu_offload=backbone", "train.compile=true"), distributed=False)
    check_teacher_storage(_toy(tmp_path, "teacher.cpu_offload=text_encoders", "train.compile=true"), distributed=False)
    with pytest.raises(SenseflowError, match="float16"):
        check_teacher_storage(_toy(tmp_path, "teacher.cpu_offload=all", "teacher.dtype=float16",
                                   "train.precision=amp_bf16"), distributed=False)
    with pytest.raises(SenseflowError, match="weight_dtype"):
        _toy(tmp_path, "teacher.weight_dtype=fp8")
    assert not (tmp_path / "config.yaml").exists()


def test_fp8_refused_when_the_teacher_shares_its_base(tmp_path):
    """A LoRA shared base (teacher = generator's base, adapters off) cannot be fp8: the adapters' base trains on it."""
    from types import SimpleNamespace

    from senseflow.train.frozen import apply_teacher_storage

    base = torch.nn.Sequential(torch.nn.Linear(4, 4)).requires_grad_(False)
    models = SimpleNamespace(teacher=SimpleNamespace(backbone=base, adapter=None),
                             generator=SimpleNamespace(denoiser=SimpleNamespace(backbone=base)), fake_score=None)
    with pytest.raises(SenseflowError, match="shares its base"):
        apply_teacher_storage(models, _toy(tmp_path, "teacher.weight_dtype=fp8_e4m3"), torch.device("cpu"))
    assert isinstance(base[0], torch.nn.Linear)


def test_backbone_offload_refused_when_the_teacher_shares_its_base(tmp_path):
    """Offloading a shared base would leave the generator's and fake score's base weights on ``meta``."""
    from types import SimpleNamespace

    from senseflow.train.frozen import apply_teacher_storage

    base = torch.nn.Sequential(torch.nn.Linear(4, 4)).requires_grad_(False)
    weight = base[0].weight
    models = SimpleNamespace(teacher=SimpleNamespace(backbone=base, adapter=None),
                             generator=SimpleNamespace(denoiser=SimpleNamespace(backbone=base)), fake_score=None)
    with pytest.raises(SenseflowError, match="cpu_offload: backbone needs a teacher of its own.*shared_base: false"):
        apply_teacher_storage(models, _toy(tmp_path, "teacher.cpu_offload=backbone"), torch.device("cpu"))
    assert base[0].weight is weight and weight.device.type == "cpu"   # nothing was moved


def test_offload_under_teacher_checkpointing_gives_the_same_input_gradients():
    """SiD backpropagates through the teacher: with ``parallel.checkpoint_teacher`` the blocks recompute in backward,
    onloading their weights a second time (instead of autograd holding the first copy until backward)."""
    from senseflow.train.distributed import checkpoint_blocks

    preset = get_preset("tiny")
    adapter = preset.make_adapter(preset.default_resolution, "cpu", torch.float32)
    plain = preset.build_backbone("cpu", torch.float32, 0).requires_grad_(False).eval()
    off = copy.deepcopy(plain)
    checkpoint_blocks(off, adapter.block_names(off))
    offload_module(off, "cpu")
    cond = preset.conditioning(2, "cpu", torch.float32, seed=1)
    x = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.6, 0.4])
    grads = []
    for net in (plain, off):
        xx = x.clone().requires_grad_(True)
        Denoiser(net, adapter)(xx, t, cond).square().sum().backward()
        grads.append(xx.grad)
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0
    assert _meta_only(off)


def test_fp8_teacher_offloads_too():
    """The fp8 weights are buffers: offloaded with the rest (``offload_buffers``), same outputs as on the device."""
    from senseflow.train.fp8 import quantize_linears

    preset = get_preset("tiny")
    adapter = preset.make_adapter(preset.default_resolution, "cpu", torch.float32)
    fp8 = preset.build_backbone("cpu", torch.float32, 0).requires_grad_(False).eval()
    quantize_linears(fp8)
    off = offload_module(copy.deepcopy(fp8), "cpu")
    assert _meta_only(off) and onloaded_bytes(off) == 0
    cond = preset.conditioning(2, "cpu", torch.float32, seed=0)
    x = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0.5, 0.1])
    assert torch.equal(Denoiser(off, adapter)(x, t, cond), Denoiser(fp8, adapter)(x, t, cond))
