"""Z-Image adapter on a tiny random folder of the real classes, checked against the stock ``ZImagePipeline``.

The reference for every convention is the pipeline loaded from the same folder: the chat-templated,
penultimate-layer, masked prompt encoding; the list-of-``[C, 1, H, W]`` latent input; the
``(1000 - t) / 1000`` timestep; the negated model output; CFG as ``pos + g (pos - neg)`` with its
``cfg_normalization`` / ``cfg_truncation``; the scheduler's static shift (or dynamic ``mu``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from diffusers import ZImagePipeline  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

from senseflow.schedules import RectifiedFlow  # noqa: E402
from senseflow.teachers import registry  # noqa: E402
from senseflow.teachers.base import Conditioning, Guidance, SenseflowError  # noqa: E402
from senseflow.teachers.zimage import ZImageAdapter  # noqa: E402
from tests.helpers.adapter_checks import latents, one_line_error, ones  # noqa: E402
from tests.helpers.tiny_zimage import make_tiny_zimage_folder  # noqa: E402

diffusers_logging.disable_progress_bar()
diffusers_logging.set_verbosity_error()

RES = 32          # tiny VAE 2x -> 16x16 latents -> 8x8 = 64 image tokens
MSL = 40          # not a multiple of 32: the transformer pads the captions itself
#: a tuple: ZImagePipeline._encode_prompt rewrites the list it is given in place (chat template)
PROMPTS = ("a red cat", "a small blue dog on the square")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("zimage")
    return {"base": make_tiny_zimage_folder(root / "base").path,
            "dynamic": make_tiny_zimage_folder(root / "dynamic", dynamic=True, seed=1).path}


_loaded: dict = {}
_pipes: dict = {}


def load(folder: Path, **kw):
    key = (str(folder), tuple(sorted(kw.items())))
    if key not in _loaded:
        kw.setdefault("resolution", RES)
        kw.setdefault("max_sequence_length", MSL)
        _loaded[key] = ZImageAdapter.from_pretrained(folder, **kw)
    return _loaded[key]


def pipeline(folder: Path) -> ZImagePipeline:
    if str(folder) not in _pipes:
        _pipes[str(folder)] = ZImagePipeline.from_pretrained(folder)
    return _pipes[str(folder)]


def run_pipe(folder: Path, x: torch.Tensor, sigmas, g: float = 0.0, **kw) -> torch.Tensor:
    with torch.no_grad():
        return pipeline(folder)(list(PROMPTS), latents=x.clone(), height=RES, width=RES, sigmas=list(sigmas),
                                num_inference_steps=len(sigmas), guidance_scale=g, output_type="latent",
                                max_sequence_length=MSL, **kw).images


# -------------------------------------------------------------------------------------------------
# loading and schedule
# -------------------------------------------------------------------------------------------------
def test_registered_family_and_static_shift_from_the_scheduler(folders):
    desc = registry.get("zimage")
    assert desc.pipeline_class == "ZImagePipeline" and desc.backbone_classes == ("ZImageTransformer2DModel",)
    assert registry.family_of_pipeline("ZImagePipeline") == "zimage"
    assert desc.lora_targets == ("to_k", "to_q", "to_v", "to_out.0")   # train_dreambooth_lora_z_image.py
    assert desc.noise.stream == "global" and not desc.noise.packed
    adapter, transformer = load(folders["base"])
    assert type(transformer).__name__ == "ZImageTransformer2DModel"
    assert adapter.latent_shape() == (4, RES // 2, RES // 2)
    assert isinstance(adapter.schedule, RectifiedFlow) and adapter.schedule.prediction == "velocity"
    assert adapter.schedule.mu is None and adapter.schedule.shift == 6.0
    # shift 6 (the base model's scheduler): sigma = 6u / (1 + 5u) -> u = .5 is sigma 3 / 3.5
    assert float(adapter.schedule.from_unit(0.5)) == pytest.approx(3.0 / 3.5)
    assert load(folders["base"], shift=3.0, load_text_encoders=False)[0].schedule.shift == 3.0


def test_dynamic_shift_uses_the_pipelines_mu(folders):
    adapter = load(folders["dynamic"], load_text_encoders=False)[0]
    # calculate_shift(64 tokens; 16..256 -> 0.5..1.15) = 0.5 + 0.65 * 48 / 240 = 0.63
    assert adapter.image_seq_len == 64 and adapter.schedule.mu == pytest.approx(0.63)


def test_structure_names_exist_in_the_transformer(folders):
    adapter, transformer = load(folders["base"], load_text_encoders=False)
    names = adapter.block_names(transformer)
    assert names == ["noise_refiner.0", "context_refiner.0", "layers.0", "layers.1"]
    assert adapter.main_block_names(transformer) == ["layers.0", "layers.1"]
    modules = dict(transformer.named_modules())
    assert all(n in modules for n in names)
    norm = adapter.output_norm_name(transformer)
    assert norm == "all_final_layer.2-1.norm_final" and isinstance(modules[norm], torch.nn.LayerNorm)
    assert adapter.feature_tap(transformer) is None


# -------------------------------------------------------------------------------------------------
# prompts
# -------------------------------------------------------------------------------------------------
def test_encode_prompts_equals_pipeline_encode_prompt(folders):
    adapter, _ = load(folders["base"])
    tok = adapter.text_encoder.tokenizer
    ids = tok("<|im_start|>user\na red cat<|im_end|>\n<|im_start|>assistant\n").input_ids
    cond = adapter.encode_prompts(PROMPTS)
    embeds, mask = cond.tensors["prompt_embeds"], cond.tensors["prompt_attention_mask"]
    assert embeds.shape == (2, MSL, 16) and mask.shape == (2, MSL) and mask.dtype == torch.bool
    # the chat template (enable_thinking=True: no think block) decides the unmasked length
    assert int(mask[0].sum()) == len(ids)
    with torch.no_grad():
        pos, neg = pipeline(folders["base"]).encode_prompt(list(PROMPTS), max_sequence_length=MSL)
    assert [int(m.sum()) for m in mask] == [p.shape[0] for p in pos] and pos[0].shape[0] != pos[1].shape[0]
    for i in range(2):
        torch.testing.assert_close(embeds[i][mask[i]], pos[i], atol=1e-6, rtol=0)
        assert embeds[i][~mask[i]].abs().max() == 0
    # the unconditional branch is the encoded "" (chat template included), as the pipeline's negative
    uncond = adapter.unconditional(2)
    torch.testing.assert_close(uncond.tensors["prompt_embeds"][0][uncond.tensors["prompt_attention_mask"][0]],
                               neg[0], atol=1e-6, rtol=0)
    assert not embeds.requires_grad


def test_causal_lm_text_encoder_folder_loads_as_the_pipeline_loads_it(tmp_path):
    """Released layout: text_encoder/config.json says Qwen3ForCausalLM, model_index.json says Qwen3Model."""
    built = make_tiny_zimage_folder(tmp_path / "causal", causal_lm=True, seed=2)
    folder = built.path
    assert json.loads((folder / "text_encoder" / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    adapter, _ = ZImageAdapter.from_pretrained(folder, resolution=RES, max_sequence_length=MSL)
    assert type(adapter.text_encoder.model).__name__ == "Qwen3Model"
    saved = built.text_encoders["text_encoder"].state_dict()      # the weights were read, not re-initialised
    loaded = adapter.text_encoder.model.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    cond = adapter.encode_prompts(PROMPTS)
    with torch.no_grad():
        pos, _ = ZImagePipeline.from_pretrained(folder).encode_prompt(list(PROMPTS), max_sequence_length=MSL,
                                                                      do_classifier_free_guidance=False)
    for i in range(2):
        mask = cond.tensors["prompt_attention_mask"][i]
        torch.testing.assert_close(cond.tensors["prompt_embeds"][i][mask], pos[i], atol=1e-6, rtol=0)


# -------------------------------------------------------------------------------------------------
# the model call against the stock pipeline
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("g", [0.0, 4.0])
def test_one_step_stock_pipeline_equals_adapter_x0_at_t1(folders, g):
    """sigmas=[1]: the pipeline's single step from sigma 1 to 0 IS x0; pipeline g is senseflow cfg g + 1."""
    adapter, transformer = load(folders["base"])
    x = latents(adapter, 2, seed=3)
    out = run_pipe(folders["base"], x, [1.0], g=g)
    with torch.no_grad():
        x0 = adapter.predict_x0(transformer, x, ones(2), adapter.encode_prompts(PROMPTS), Guidance(cfg=g + 1.0))
    torch.testing.assert_close(x0, out, atol=2e-5, rtol=0)
    assert (x0 - x).abs().max() > 0.1


def test_velocity_is_the_negated_model_output_at_one_minus_sigma(folders):
    """Hand check of the conventions: the network gets t = 1 - sigma and predicts x0 - eps."""
    adapter, transformer = load(folders["base"])
    cond = adapter.encode_prompts(PROMPTS[:1])
    x = latents(adapter, 1, seed=4)
    cap = cond.tensors["prompt_embeds"][0][cond.tensors["prompt_attention_mask"][0]]
    with torch.no_grad():
        raw = transformer([x[0].unsqueeze(1)], torch.tensor([0.25]), [cap], return_dict=False)[0][0].squeeze(1)
        v = adapter.predict(transformer, x, ones(1, 0.75), cond)
    torch.testing.assert_close(v[0], -raw, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["base", "dynamic"])
def test_two_step_stock_pipeline_equals_adapter_euler(folders, kind):
    """Unit sigmas [1, .5] go through the scheduler's shift (static 6 / dynamic mu); Euler via the adapter agrees."""
    adapter, transformer = load(folders[kind])
    x = latents(adapter, 2, seed=5)
    out = run_pipe(folders[kind], x, [1.0, 0.5], g=2.0)
    sched = adapter.schedule
    t0, t1 = sched.from_unit([1.0, 0.5])
    assert pipeline(folders[kind]).scheduler.sigmas[1].item() == pytest.approx(float(t1), abs=1e-6)
    cond, g = adapter.encode_prompts(PROMPTS), Guidance(cfg=3.0)
    with torch.no_grad():
        x_a = sched.step(x, adapter.predict_x0(transformer, x, t0.expand(2), cond, g), t0, t1)
        x0 = adapter.predict_x0(transformer, x_a, t1.expand(2), cond, g)
    torch.testing.assert_close(x0, out, atol=5e-5, rtol=0)


def test_cfg_normalization_and_truncation_as_the_pipeline(folders):
    """sigmas [1, .1] -> shifted [1, .4]: t_norm 0 (guided, renormalised) then 0.6 > 0.3 (truncated: no CFG)."""
    adapter, transformer = load(folders["base"], cfg_normalization=1.0, cfg_truncation=0.3)
    plain, _ = load(folders["base"])
    x = latents(adapter, 2, seed=6)
    out = run_pipe(folders["base"], x, [1.0, 0.1], g=4.0, cfg_normalization=True, cfg_truncation=0.3)
    sched = adapter.schedule
    t0, t1 = sched.from_unit([1.0, 0.1])
    assert float(t1) == pytest.approx(0.4)
    cond, g = adapter.encode_prompts(PROMPTS), Guidance(cfg=5.0)
    with torch.no_grad():
        x_a = sched.step(x, adapter.predict_x0(transformer, x, t0.expand(2), cond, g), t0, t1)
        x0 = adapter.predict_x0(transformer, x_a, t1.expand(2), cond, g)
        # the renormalised guided velocity has at most the conditional one's norm, per sample
        v = adapter.predict_native(transformer, x, t0.expand(2), cond, g)
        v_c = adapter.predict_native(transformer, x, t0.expand(2), cond)
        v_plain = plain.predict_native(transformer, x, t0.expand(2), cond, g)
        # truncated step: the conditional prediction only
        late = adapter.predict_native(transformer, x_a, t1.expand(2), cond, g)
        late_c = adapter.predict_native(transformer, x_a, t1.expand(2), cond)
    torch.testing.assert_close(x0, out, atol=5e-5, rtol=0)
    assert torch.all(v.flatten(1).norm(dim=1) <= v_c.flatten(1).norm(dim=1) * (1 + 1e-5))
    assert v_plain.flatten(1).norm(dim=1).max() > v_c.flatten(1).norm(dim=1).max() * 1.01
    torch.testing.assert_close(late, late_c, atol=1e-5, rtol=0)   # (a 2B batch vs a B batch)


def test_batch_rows_do_not_depend_on_the_other_prompts(folders):
    """Captions of different lengths are padded per batch: each row still equals its single-prompt forward."""
    adapter, transformer = load(folders["base"])
    cond = adapter.encode_prompts(PROMPTS)
    x = latents(adapter, 2, seed=7)
    t = torch.tensor([0.9, 0.3], dtype=torch.float64)
    with torch.no_grad():
        both = adapter.predict(transformer, x, t, cond)
        alone = torch.cat([adapter.predict(transformer, x[i:i + 1], t[i:i + 1], cond[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(both, alone, atol=2e-5, rtol=0)
    assert (both[0] - both[1]).abs().max() > 0.01


# -------------------------------------------------------------------------------------------------
# bad folders: one line, before any weights are read
# -------------------------------------------------------------------------------------------------
def _copy(folders, tmp_path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(folders["base"], dst)
    return dst


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_bad_folders_fail_with_one_line(folders, tmp_path):
    wrong = _copy(folders, tmp_path, "wrong_class")
    _edit_json(wrong / "transformer" / "config.json", _class_name="FluxTransformer2DModel")
    with pytest.raises(SenseflowError) as e:
        ZImageAdapter.from_pretrained(wrong, resolution=RES)
    assert "ZImageTransformer2DModel" in one_line_error(e) or "flux" in one_line_error(e).lower()

    flux = _copy(folders, tmp_path, "flux_index")
    _edit_json(flux / "model_index.json", _class_name="FluxPipeline")
    with pytest.raises(SenseflowError) as e:
        ZImageAdapter.from_pretrained(flux, resolution=RES)
    assert "flux" in one_line_error(e)

    no_tok = _copy(folders, tmp_path, "no_tokenizer")
    shutil.rmtree(no_tok / "tokenizer")
    with pytest.raises(SenseflowError) as e:
        ZImageAdapter.from_pretrained(no_tok, resolution=RES)
    assert "tokenizer" in one_line_error(e)
    ZImageAdapter.from_pretrained(no_tok, resolution=RES, load_text_encoders=False)   # a prompt cache needs none

    no_template = _copy(folders, tmp_path, "no_template")
    for f in (no_template / "tokenizer").iterdir():
        if f.name == "chat_template.jinja":
            f.unlink()
        elif f.name == "tokenizer_config.json":
            cfg = json.loads(f.read_text())
            cfg.pop("chat_template", None)
            f.write_text(json.dumps(cfg))
    with pytest.raises(SenseflowError) as e:
        ZImageAdapter.from_pretrained(no_template, resolution=RES)
    assert "chat_template" in one_line_error(e)

    cap = make_tiny_zimage_folder(tmp_path / "cap_mismatch", cap_feat_dim=24).path
    with pytest.raises(SenseflowError) as e:
        ZImageAdapter.from_pretrained(cap, resolution=RES)
    assert "cap_feat_dim" in one_line_error(e) and "24" in one_line_error(e)

    ch = make_tiny_zimage_folder(tmp_path / "vae_mismatch", in_channels=8).path
    with pytest.raises(SenseflowError) as e:
        ZImageAdapter.from_pretrained(ch, resolution=RES)
    assert "latent_channels=4" in one_line_error(e) and "in_channels=8" in one_line_error(e)

    with pytest.raises(SenseflowError) as e:
        ZImageAdapter.from_pretrained(folders["base"], resolution=30)
    assert "multiple of 4" in one_line_error(e)
    with pytest.raises(SenseflowError) as e:
        ZImageAdapter.from_pretrained(folders["base"], resolution=RES, max_sequence_length=1100)
    assert "axes_lens" in one_line_error(e)
    adapter, transformer = load(folders["base"], load_text_encoders=False)
    with pytest.raises(SenseflowError) as e:
        adapter.predict(transformer, torch.zeros(1, 4, 16, 16), ones(1),
                        Conditioning({"prompt_embeds": torch.zeros(1, 5, 16)}))
    assert "prompt_attention_mask" in one_line_error(e)


def test_folder_family_check_names_the_zimage_pipeline(folders):
    """``train --dry-run``'s check: a Z-Image folder under another family is refused in one line naming both."""
    from senseflow.teachers import loading

    loading.check_folder_family(folders["base"], "zimage")
    with pytest.raises(SenseflowError) as e:
        loading.check_folder_family(folders["base"], "sd3")
    msg = one_line_error(e)
    assert "ZImagePipeline" in msg and "zimage" in msg and "sd3" in msg


# -------------------------------------------------------------------------------------------------
# senseflow bench: the real shape
# -------------------------------------------------------------------------------------------------
def _zimage_parameters(dim: int, n_layers: int, n_refiner: int, heads: int, cap: int, channels: int) -> int:
    """Parameters of a Z-Image transformer counted by hand from its architecture (patch 2, frame patch 1)."""
    head, hidden, adaln, patch = dim // heads, int(dim / 3 * 8), min(dim, 256), 2 * 2 * channels
    block = 4 * dim * dim + 2 * head + 3 * dim * hidden + 4 * dim     # q k v o, qk RMSNorm, SwiGLU FFN, 4 RMSNorms
    modulated = block + adaln * 4 * dim + 4 * dim                     # + adaLN (scale/gate for attention and FFN)
    embed = patch * dim + dim + 256 * 1024 + 1024 + 1024 * adaln + adaln + cap + cap * dim + dim + 2 * dim
    final = dim * patch + patch + adaln * dim + dim
    return (n_layers + n_refiner) * modulated + n_refiner * block + embed + final


def test_real_preset_has_the_released_shape_and_size():
    from senseflow.bench.presets import PRESETS, count_parameters

    preset = PRESETS["zimage"]
    model = preset.build_backbone("meta")
    n = count_parameters(model)
    assert n == _zimage_parameters(3840, 30, 2, 30, 2560, 16)
    assert n / 1e9 == pytest.approx(6.155, abs=0.001)             # "6B" (the Z-Image model card)
    adapter = preset.make_adapter(1024)
    assert adapter.latent_shape() == (16, 128, 128) and adapter.schedule.shift == 6.0
    assert len(adapter.block_names(model)) == 34
    # the tiny preset's count follows the same formula
    tiny = PRESETS["tiny-zimage"].build_backbone("cpu")
    assert count_parameters(tiny) == _zimage_parameters(32, 2, 1, 2, 32, 4)
