"""LoRA students: only adapter weights train; export reloads with ``pipe.load_lora_weights`` and reproduces."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from diffusers import DiffusionPipeline  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from senseflow.build import load_teacher  # noqa: E402
from senseflow.config import dump_config, validate  # noqa: E402
from senseflow.export import export_student  # noqa: E402
from senseflow.export_diffusers import export_diffusers  # noqa: E402
from senseflow.generate import image_seed, render  # noqa: E402
from senseflow.generator import FewStepGenerator  # noqa: E402
from senseflow.lora import (LoRAConfig, apply_lora, config_from_state_dict, is_lora_name, lora_meta,  # noqa: E402
                            lora_parameters, maybe_apply_lora, merge_lora)
from senseflow.schedules import anchors as unit_to_native  # noqa: E402
from senseflow.student import load_student  # noqa: E402
from senseflow.teachers.base import Denoiser, SenseflowError  # noqa: E402
from tests.helpers import tiny_flux2, tiny_models, tiny_zimage  # noqa: E402
from tests.helpers.tiny_qwenimage import make_tiny_qwenimage_folder  # noqa: E402

diffusers_logging.disable_progress_bar()
diffusers_logging.set_verbosity_error()

RES = 32
ATOL = 1e-4


def _backbones():
    return {
        "sd3": tiny_models.make_sd3_transformer(),
        "flux": tiny_models.make_flux_transformer(),
        "sdxl": tiny_models.make_sdxl_unet(),
        "sana": tiny_models.make_sana_transformer(),
    }


@pytest.mark.parametrize("family", ["sd3", "flux", "sdxl", "sana"])
def test_only_adapter_parameters_require_grad(family):
    net = _backbones()[family].requires_grad_(True)     # as the builder hands it over: all trainable
    before = {n for n, _ in net.named_parameters()}
    apply_lora(net, rank=4, alpha=8.0)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all(is_lora_name(n) for n in trainable)
    assert all(not p.requires_grad for n, p in net.named_parameters() if not is_lora_name(n))
    assert len(lora_parameters(net)) == len(trainable)
    assert len({n for n, _ in net.named_parameters()}) > len(before)
    assert lora_meta(net)["rank"] == 4 and lora_meta(net)["alpha"] == 8.0


def test_a_training_step_changes_only_adapter_weights():
    net = tiny_models.make_sd3_transformer()
    maybe_apply_lora(net, {"rank": 2, "target_modules": ["to_q", "to_v", "attn.to_out.0"]})
    net.train()
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    # an optimizer over ALL parameters: frozen ones get no gradient and so never move
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):      # B starts at 0: step 1 moves B, step 2 moves A as well
        x = torch.randn(2, 4, 16, 16, generator=g)
        out = net(hidden_states=x, timestep=torch.tensor([500.0, 900.0]),
                  encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
                  pooled_projections=torch.randn(2, 32, generator=g), return_dict=False)[0]
        loss = (out - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(is_lora_name(k) for k in changed)
    assert any(".lora_A." in k for k in changed) and any(".lora_B." in k for k in changed)
    targeted = {k.split(".lora_")[0] for k in changed}
    assert all(k.endswith(("to_q", "to_v", "to_out.0")) for k in targeted)


def test_config_validation_and_errors():
    assert LoRAConfig().rank == 16 and LoRAConfig(rank=8).resolved_alpha == 8.0
    with pytest.raises(ValidationError):
        LoRAConfig(rank=0)
    with pytest.raises(ValidationError):
        LoRAConfig(rank=4, bogus=1)
    with pytest.raises(ValidationError):
        LoRAConfig(target_modules=[])
    with pytest.raises(SenseflowError, match="match no nn.Linear"):
        apply_lora(tiny_models.make_sd3_transformer(), rank=2, target_modules=["no_such_layer"])
    net = apply_lora(tiny_models.make_sd3_transformer(), rank=2)
    with pytest.raises(SenseflowError, match="already has LoRA"):
        apply_lora(net, rank=2)
    assert maybe_apply_lora(tiny_models.make_sd3_transformer(), None) is not None


def test_generic_module_all_linear_and_merge():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    apply_lora(net, rank=2, alpha=4.0, target_modules="auto")
    with torch.no_grad():
        for p in lora_parameters(net):
            p.normal_()
    x = torch.randn(5, 4)
    y = net(x)
    meta = lora_meta(net)
    assert meta["rank"] == 2 and sorted(meta["target_modules"]) == ["0", "2"]
    merged = merge_lora(net)
    assert not any(is_lora_name(n) for n, _ in merged.named_parameters())
    assert torch.allclose(merged(x), y, atol=1e-5)


def test_lora_config_is_inferred_from_weights_when_not_recorded():
    net = apply_lora(tiny_models.make_sd3_transformer(), rank=3, target_modules=["to_q"])
    with pytest.warns(UserWarning, match="alpha = rank"):
        cfg = config_from_state_dict(net.state_dict())
    assert cfg.rank == 3 and all(t.endswith("to_q") for t in cfg.target_modules)
    assert config_from_state_dict(net.state_dict(), {"rank": 3, "alpha": 6.0}).resolved_alpha == 6.0


def _lora_run(root: Path, family: str) -> Path:
    """A run whose student is the teacher + trained-looking LoRA adapters (rank 4, alpha 8)."""
    teacher = root / "teacher"
    {"sd3": tiny_models.make_tiny_sd3_folder, "sdxl": tiny_models.make_tiny_sdxl_folder,
     "flux": tiny_models.make_tiny_flux_folder, "qwenimage": make_tiny_qwenimage_folder,
     "flux2": tiny_flux2.make_tiny_flux2_dev_folder, "zimage": tiny_zimage.make_tiny_zimage_folder}[family](teacher)
    options = {} if family == "sdxl" else {"max_sequence_length": 8}
    config = validate({"paths": {"teacher": str(teacher)}, "teacher": {"family": family, "resolution": RES,
                                                                       "options": options},
                       "method": {"name": "dmd2"}})
    adapter, backbone = load_teacher(config, torch.device("cpu"))
    student = apply_lora(adapter.make_student(backbone), rank=4, alpha=8.0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_parameters(student):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    gen = FewStepGenerator(Denoiser(student, adapter), unit_to_native(adapter.schedule, [1.0, 0.75, 0.5, 0.25]))
    run = root / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(config))
    export_student(gen, run / "student", {"family": family, "teacher": str(teacher), "resolution": RES,
                                          "sampler": "stochastic", "lora": lora_meta(student)})
    return run


def _stock(folder: Path, prompt: str, seed: int, lora: bool) -> torch.Tensor:
    info = json.loads((folder / "senseflow_export.json").read_text())
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    if lora:
        pipe.load_lora_weights(str(folder))
    if info["seeding"] == "global":
        torch.manual_seed(seed)
        return pipe(prompt=prompt, output_type="pt", **info["call"]).images
    return pipe(prompt=prompt, output_type="pt", generator=torch.Generator("cpu").manual_seed(seed),
                **info["call"]).images


@pytest.mark.parametrize("family", ["sd3", "sdxl", "flux", "qwenimage", "flux2", "zimage"])
def test_lora_student_exports_and_reloads_with_load_lora_weights(family, tmp_path):
    run = _lora_run(tmp_path, family)
    student = load_student(run)
    assert student.has_lora
    prompt, seed = "a small red dog", image_seed(0, 0)
    ours = (render(student, [prompt], [seed]) / 2 + 0.5).clamp(0, 1)
    base = (render(load_student(run), [prompt], [seed]) / 2 + 0.5).clamp(0, 1)
    assert torch.equal(ours, base)           # loading is deterministic

    export = export_diffusers(run, tmp_path / "export", loaded=student)
    assert (export / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((export / "senseflow_export.json").read_text())["lora"] is True
    assert student.has_lora                  # the caller's student is left as it was
    backbone = "unet" if family == "sdxl" else "transformer"
    from safetensors.torch import load_file
    saved = load_file(str(next((export / backbone).glob("*.safetensors"))))
    assert not any("lora" in k for k in saved)             # the backbone folder holds the plain base
    stock = _stock(export, prompt, seed, lora=True)
    assert (stock - ours).abs().max().item() < ATOL
    without = _stock(export, prompt, seed, lora=False) if family != "flux" else None
    if without is not None:                  # the adapters matter far beyond the tolerance
        assert (without - ours).abs().max().item() > 100 * ATOL

    merged = export_diffusers(run, tmp_path / "merged", loaded=student, merge_lora=True)
    assert not (merged / "pytorch_lora_weights.safetensors").exists()
    assert json.loads((merged / "senseflow_export.json").read_text())["lora"] is False
    assert (_stock(merged, prompt, seed, lora=False) - ours).abs().max().item() < ATOL


def test_lora_adapters_are_initialised_from_train_seed_alone(tmp_path):
    """peft draws lora_A from the global RNG: built inside the seeded fork, two runs with one train.seed get the same
    adapters whatever the global RNG held, another seed gets others, and the caller's RNG is left alone."""
    from senseflow.build import build_models

    teacher = tmp_path / "teacher"
    tiny_models.make_tiny_sd3_folder(teacher)

    def adapters(seed: int, global_seed: int) -> dict:
        config = validate({"paths": {"teacher": str(teacher)}, "teacher": {"family": "sd3", "resolution": RES,
                                                                           "options": {"max_sequence_length": 8}},
                           "method": {"name": "dmd2"}, "generator": {"lora": {"rank": 2}}, "train": {"seed": seed}})
        torch.manual_seed(global_seed)
        before = torch.random.get_rng_state()
        models = build_models(config, torch.device("cpu"))
        assert torch.equal(torch.random.get_rng_state(), before)
        return {n: p.detach().clone() for n, p in models.generator.denoiser.backbone.named_parameters() if is_lora_name(n)}

    a, b, c = adapters(0, 1), adapters(0, 99), adapters(1, 1)
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
