"""SD3 / SD3.5 adapter on tiny random models of the real classes, saved as diffusers folders.

The reference for every convention is the stock ``StableDiffusion3Pipeline`` loaded from the same
folder: prompt encoding, timestep scaling, velocity sign, CFG and the scheduler shift.
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

from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

from senseflow.schedules import RectifiedFlow  # noqa: E402
from senseflow.teachers import loading  # noqa: E402
from senseflow.teachers.base import Conditioning, Guidance, SenseflowError, capture_outputs  # noqa: E402
from senseflow.teachers.sd3 import SD3Adapter  # noqa: E402
from tests.helpers.adapter_checks import latents, one_line_error  # noqa: E402
from tests.helpers.tiny_models import make_tiny_sd3_folder  # noqa: E402

diffusers_logging.disable_progress_bar()

RES = 32          # tiny VAE downsamples 2x -> 16x16 latents, 8x8 patches
MSL = 8           # T5 tokens (the real default is 256; small keeps the test fast)
PROMPTS = ["a red cat", "a small blue dog on the square"]


# -------------------------------------------------------------------------------------------------
# fixtures: folders are built once per module
# -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    return {
        "sd3": make_tiny_sd3_folder(root / "sd3", "sd3").path,
        "sd35": make_tiny_sd3_folder(root / "sd35", "sd35", seed=1).path,
        "no_t5": make_tiny_sd3_folder(root / "no_t5", "sd3", with_t5=False, shift=2.5, seed=2).path,
    }


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory):
    # the toy layout: one CLIP encoder with a word-level tokenizer, no T5, no VAE (pixel space).
    # joint/pooled dims larger than the encoder's widths exercise the zero padding.
    root = tmp_path_factory.mktemp("toy")
    return make_tiny_sd3_folder(root / "toy", "sd3", num_clip=1, with_t5=False, with_vae=False,
                                word_level_tokenizer=True, joint_attention_dim=12, pooled_projection_dim=20,
                                write_index=False, seed=3).path


_loaded: dict = {}


def load(folder: Path, **kw):
    key = (str(folder), tuple(sorted(kw.items())))
    if key not in _loaded:
        kw.setdefault("resolution", RES)
        kw.setdefault("max_sequence_length", MSL)
        _loaded[key] = SD3Adapter.from_pretrained(folder, **kw)
    return _loaded[key]


def pipeline(folder: Path) -> StableDiffusion3Pipeline:
    extra = {}
    if not (folder / "text_encoder_3").is_dir():
        extra = {"text_encoder_3": None, "tokenizer_3": None}
    return StableDiffusion3Pipeline.from_pretrained(folder, **extra)


# -------------------------------------------------------------------------------------------------
# loading, shapes, prompt encoding vs the stock pipeline
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["sd3", "sd35"])
def test_loads_and_encodes_to_transformer_shapes(folders, variant):
    adapter, transformer = load(folders[variant])
    cfg = transformer.config
    assert type(transformer).__name__ == "SD3Transformer2DModel"
    if variant == "sd35":
        assert cfg.qk_norm == "rms_norm" and list(cfg.dual_attention_layers) == [0]
    assert isinstance(adapter.schedule, RectifiedFlow) and adapter.schedule.prediction == "velocity"
    assert adapter.schedule.shift == 3.0                     # read from scheduler/scheduler_config.json
    assert adapter.latent_shape() == (cfg.in_channels, RES // 2, RES // 2)
    cond = adapter.encode_prompts(PROMPTS)
    pe, pooled = cond.tensors["prompt_embeds"], cond.tensors["pooled_prompt_embeds"]
    assert pe.shape == (2, 77 + MSL, cfg.joint_attention_dim)
    assert pooled.shape == (2, cfg.pooled_projection_dim)
    assert not pe.requires_grad and not pooled.requires_grad
    x = latents(adapter, 2)
    v = adapter.predict(transformer, x, torch.full((2,), 0.5, dtype=torch.float64), cond)
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_shift_from_scheduler_config_default_and_override(folders, tmp_path):
    assert load(folders["no_t5"], load_text_encoders=False)[0].schedule.shift == 2.5   # scheduler_config.json
    assert load(folders["no_t5"], shift=2.0, load_text_encoders=False)[0].schedule.shift == 2.0
    bare = _copy(folders["no_t5"], tmp_path / "bare")
    shutil.rmtree(bare / "scheduler")
    adapter, _ = SD3Adapter.from_pretrained(bare, resolution=RES, load_text_encoders=False)
    assert adapter.schedule.shift == 3.0                                                 # SD3's default
    assert float(adapter.schedule.from_unit(0.5)) == pytest.approx(0.75)


@pytest.mark.parametrize("variant", ["sd3", "sd35", "no_t5"])
def test_encode_prompts_equals_pipeline_encode_prompt(folders, variant):
    adapter, _ = load(folders[variant])
    pipe = pipeline(folders[variant])
    with torch.no_grad():
        pe, neg_pe, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True,
                                                            max_sequence_length=MSL)
    cond = adapter.encode_prompts(PROMPTS)
    uncond = adapter.unconditional(len(PROMPTS))
    torch.testing.assert_close(cond.tensors["prompt_embeds"], pe, atol=1e-6, rtol=0)
    torch.testing.assert_close(cond.tensors["pooled_prompt_embeds"], pooled, atol=1e-6, rtol=0)
    torch.testing.assert_close(uncond.tensors["prompt_embeds"], neg_pe, atol=1e-6, rtol=0)
    torch.testing.assert_close(uncond.tensors["pooled_prompt_embeds"], neg_pooled, atol=1e-6, rtol=0)
    if variant == "no_t5":    # diffusers feeds MSL zero tokens in place of T5
        assert cond.tensors["prompt_embeds"][:, 77:].abs().max() == 0
    else:                     # and the T5 part is really there
        assert cond.tensors["prompt_embeds"][:, 77:].abs().max() > 0
    # the prompts really change the conditioning (guards against an empty / constant tokenizer)
    assert not torch.allclose(cond.tensors["pooled_prompt_embeds"][0], cond.tensors["pooled_prompt_embeds"][1])


# -------------------------------------------------------------------------------------------------
# the model call: timestep scaling, velocity sign, CFG -- against hand computation and the pipeline
# -------------------------------------------------------------------------------------------------
def test_predict_passes_1000t_float32_and_matches_direct_call(folders):
    adapter, transformer = load(folders["sd3"])
    cond = adapter.encode_prompts(PROMPTS)
    x = latents(adapter, 2, seed=1)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    seen = {}

    def hook(_m, args, kwargs):
        seen.update(kwargs)
    h = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        v = adapter.predict(transformer, x, t, cond)
    finally:
        h.remove()
    assert seen["timestep"].dtype == torch.float32
    torch.testing.assert_close(seen["timestep"], torch.tensor([300.0, 800.0]))
    with torch.no_grad():
        ref = transformer(hidden_states=x, timestep=torch.tensor([300.0, 800.0]),
                          encoder_hidden_states=cond.tensors["prompt_embeds"],
                          pooled_projections=cond.tensors["pooled_prompt_embeds"], return_dict=False)[0]
    torch.testing.assert_close(v, ref, atol=1e-6, rtol=0)
    # x0 = x_t - t v (velocity = eps - x0)
    x0 = adapter.predict_x0(transformer, x, t, cond)
    torch.testing.assert_close(x0, x - t.float().view(2, 1, 1, 1) * ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("w", [4.5, "per_sample"])
def test_cfg_equals_hand_computed_x0_guidance(folders, w):
    adapter, transformer = load(folders["sd35"])
    cond = adapter.encode_prompts(PROMPTS)
    uncond = adapter.unconditional(2)
    x = latents(adapter, 2, seed=2)
    t = torch.tensor([0.9, 0.4], dtype=torch.float64)
    scale = torch.tensor([2.0, 7.0]) if w == "per_sample" else torch.tensor([w, w])
    guidance = Guidance(cfg=scale if w == "per_sample" else w)

    def x0_of(c: Conditioning):
        with torch.no_grad():
            v = transformer(hidden_states=x, timestep=1000 * t.float(), encoder_hidden_states=c.tensors["prompt_embeds"],
                            pooled_projections=c.tensors["pooled_prompt_embeds"], return_dict=False)[0]
        return x - t.float().view(2, 1, 1, 1) * v

    x0_c, x0_u = x0_of(cond), x0_of(uncond)
    expected = x0_u + scale.view(2, 1, 1, 1) * (x0_c - x0_u)
    got = adapter.predict_x0(transformer, x, t, cond, guidance)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(got, x0_c, atol=1e-3)      # guidance really does something


@pytest.mark.parametrize("variant", ["sd3", "sd35"])
def test_one_step_stock_pipeline_equals_adapter_x0_at_t1(folders, variant):
    """num_inference_steps=1: the pipeline starts at sigma=1 and its Euler step to 0 IS the x0 prediction."""
    adapter, transformer = load(folders[variant])
    pipe = pipeline(folders[variant])
    w = 4.5
    x = latents(adapter, 2, seed=3)
    with torch.no_grad():
        out = pipe(PROMPTS, latents=x.clone(), height=RES, width=RES, num_inference_steps=1, guidance_scale=w,
                   output_type="latent", max_sequence_length=MSL).images
    cond = adapter.encode_prompts(PROMPTS)
    with torch.no_grad():
        x0 = adapter.predict_x0(transformer, x, torch.ones(2, dtype=torch.float64), cond, Guidance(cfg=w))
    torch.testing.assert_close(x0, out, atol=2e-5, rtol=0)
    assert (out - x).abs().max() > 0.1


def test_two_step_stock_pipeline_equals_adapter_euler_with_shift(folders):
    """Unit sigmas [1, .5] are shifted by the scheduler (shift 3 -> [1, .75]); Euler through the adapter agrees."""
    adapter, transformer = load(folders["sd3"])
    pipe = pipeline(folders["sd3"])
    w = 3.0
    x = latents(adapter, 2, seed=4)
    with torch.no_grad():
        out = pipe(PROMPTS, latents=x.clone(), height=RES, width=RES, sigmas=[1.0, 0.5], guidance_scale=w,
                   output_type="latent", max_sequence_length=MSL).images
    sched = adapter.schedule
    t0, t1 = sched.from_unit([1.0, 0.5])
    assert abs(float(t1) - 0.75) < 1e-12
    cond, g = adapter.encode_prompts(PROMPTS), Guidance(cfg=w)
    with torch.no_grad():
        x_a = sched.step(x, adapter.predict_x0(transformer, x, t0.expand(2), cond, g), t0, t1)
        x0 = adapter.predict_x0(transformer, x_a, t1.expand(2), cond, g)
    torch.testing.assert_close(x0, out, atol=5e-5, rtol=0)


def test_schedule_to_x0_agrees_with_flow_match_euler_step(folders):
    """One FlowMatchEuler step from t to 0 with the adapter's native prediction == schedule.to_x0 of it;
    a step to an intermediate t' == schedule.step (x_{t'} = x_t + (t' - t) v)."""
    adapter, transformer = load(folders["sd3"])
    cond = adapter.encode_prompts(PROMPTS)
    x = latents(adapter, 2, seed=5)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folders["sd3"], subfolder="scheduler")
    scheduler.set_timesteps(sigmas=[0.6, 0.3])            # shifted by the scheduler itself
    s0, s1 = scheduler.sigmas[0].item(), scheduler.sigmas[1].item()
    t0 = torch.full((2,), s0, dtype=torch.float64)
    with torch.no_grad():
        v = adapter.predict(transformer, x, t0, cond)
    x_next = scheduler.step(v, scheduler.timesteps[0], x, return_dict=False)[0]
    x0 = adapter.schedule.to_x0(v, x, t0)
    torch.testing.assert_close(x_next, adapter.schedule.step(x, x0, t0, torch.full((2,), s1, dtype=torch.float64)),
                               atol=1e-5, rtol=0)
    x_last = scheduler.step(v, scheduler.timesteps[1], x_next, return_dict=False)[0]   # s1 -> 0 with the same v
    torch.testing.assert_close(x_last, x_next - s1 * v, atol=1e-6, rtol=0)
    torch.testing.assert_close(adapter.schedule.to_x0(v, x, t0), x - s0 * v, atol=1e-6, rtol=0)


# -------------------------------------------------------------------------------------------------
# VAE factors, structure, partial layouts
# -------------------------------------------------------------------------------------------------
def test_vae_shift_and_scaling_factors(folders):
    adapter, _ = load(folders["sd3"])
    vae = adapter.vae
    assert vae.config.shift_factor != 0 and vae.config.scaling_factor != 1
    z = latents(adapter, 1, seed=6)
    with torch.no_grad():
        img = adapter.decode(z)
        ref = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
        torch.testing.assert_close(img, ref)
        assert img.shape == (1, 3, RES, RES)
        enc = adapter.encode(img, sample=False)
        mode = vae.encode(img).latent_dist.mode()
        torch.testing.assert_close(enc, (mode - vae.config.shift_factor) * vae.config.scaling_factor)
    # decode keeps the graph (VFM discriminators backpropagate through it)
    zg = z.clone().requires_grad_(True)
    adapter.decode(zg).sum().backward()
    assert zg.grad is not None and zg.grad.abs().sum() > 0


def test_block_names_and_output_norm_are_hookable(folders):
    adapter, transformer = load(folders["sd35"])
    names = adapter.block_names(transformer)
    assert names == [f"transformer_blocks.{i}" for i in range(transformer.config.num_layers)]
    norm = adapter.output_norm_name(transformer)
    assert norm == "norm_out" and type(transformer.get_submodule(norm)).__name__ == "AdaLayerNormContinuous"
    cond = adapter.encode_prompts(PROMPTS)
    x = latents(adapter, 2)
    with capture_outputs(transformer, names + [norm]) as feats, torch.no_grad():
        adapter.predict(transformer, x, torch.full((2,), 0.5, dtype=torch.float64), cond)
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    assert feats[norm].shape == (2, (RES // 2 // 2) ** 2, inner)
    assert set(feats) == set(names + [norm])


def test_toy_layout_single_clip_pixel_space_no_t5(toy_folder):
    adapter, transformer = SD3Adapter.from_pretrained(toy_folder, resolution=16, max_sequence_length=0)
    assert adapter.vae is None and adapter.vae_scale_factor == 1
    assert adapter.latent_shape() == (3, 16, 16)
    assert [e.name for e in adapter.clip_encoders] == ["text_encoder"] and adapter.t5_encoder is None
    cond = adapter.encode_prompts(["red circle", "a big green square"])
    pe, pooled = cond.tensors["prompt_embeds"], cond.tensors["pooled_prompt_embeds"]
    n_tok = adapter.clip_encoders[0].tokenizer.model_max_length
    assert pe.shape == (2, n_tok, 12) and pooled.shape == (2, 20)     # no T5 tokens at all
    assert pe[..., 8:].abs().max() == 0 and pooled[:, 16:].abs().max() == 0   # zero padding on the right
    assert pe[..., :8].abs().max() > 0 and pooled[:, :16].abs().max() > 0
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x0 = adapter.predict_x0(transformer, x, torch.tensor([1.0, 0.5], dtype=torch.float64), cond, Guidance(cfg=2.0))
    assert x0.shape == x.shape and torch.isfinite(x0).all()
    assert adapter.decode(x) is x and adapter.encode(x) is x
    assert adapter.unconditional(3).tensors["prompt_embeds"].shape == (3, n_tok, 12)


def test_without_text_encoders_uses_a_prompt_cache(folders):
    adapter, transformer = load(folders["sd3"], load_text_encoders=False)
    full, _ = load(folders["sd3"])
    with pytest.raises(SenseflowError):
        adapter.encode_prompts(PROMPTS)
    with pytest.raises(SenseflowError):
        adapter.unconditional(2)
    adapter.set_unconditional(full.unconditional(1))
    cond = full.encode_prompts(PROMPTS)
    x = latents(adapter, 2)
    t = torch.full((2,), 0.7, dtype=torch.float64)
    torch.testing.assert_close(adapter.predict_x0(transformer, x, t, cond, Guidance(cfg=3.0)),
                               full.predict_x0(transformer, x, t, cond, Guidance(cfg=3.0)))


def test_bf16_load_keeps_caller_dtype(folders):
    adapter, transformer = SD3Adapter.from_pretrained(folders["sd3"], resolution=RES, max_sequence_length=MSL,
                                                      dtype=torch.bfloat16)
    assert next(transformer.parameters()).dtype == torch.bfloat16
    cond = adapter.encode_prompts(PROMPTS[:1])
    assert cond.tensors["prompt_embeds"].dtype == torch.bfloat16
    x = latents(adapter, 1)
    out = adapter.predict_x0(transformer, x, torch.tensor([0.5], dtype=torch.float64), cond)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# -------------------------------------------------------------------------------------------------
# bad input: one-line SenseflowErrors
# -------------------------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_transformer_subfolder(folders, tmp_path):
    bad = _copy(folders["sd3"], tmp_path / "bad")
    shutil.rmtree(bad / "transformer")
    with pytest.raises(SenseflowError) as e:
        SD3Adapter.from_pretrained(bad, resolution=RES)
    assert "no transformer/ subfolder" in one_line_error(e)


def test_missing_folder_or_hub_id(tmp_path):
    with pytest.raises(SenseflowError) as e:
        SD3Adapter.from_pretrained("stabilityai/stable-diffusion-3.5-medium", resolution=RES)
    assert "does not exist" in one_line_error(e) and "hub id" in str(e.value)


@pytest.mark.parametrize("other", ["flux", "unet"])
def test_wrong_model_class_in_transformer(folders, tmp_path, other):
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    bad = _copy(folders["sd3"], tmp_path / "bad")
    shutil.rmtree(bad / "transformer")
    if other == "flux":
        model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                       pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    else:
        model = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                     block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=32,
                                     attention_head_dim=2,
                                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    model.save_pretrained(bad / "transformer")
    with pytest.raises(SenseflowError) as e:
        SD3Adapter.from_pretrained(bad, resolution=RES)
    msg = one_line_error(e)
    assert type(model).__name__ in msg and "SD3Transformer2DModel" in msg
    assert ("flux" if other == "flux" else "sdxl") in msg


def test_wrong_pipeline_in_model_index(folders, tmp_path):
    bad = _copy(folders["sd3"], tmp_path / "bad")
    index = json.loads((bad / "model_index.json").read_text())
    index["_class_name"] = "FluxPipeline"
    (bad / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(SenseflowError) as e:
        SD3Adapter.from_pretrained(bad, resolution=RES)
    assert "FluxPipeline" in one_line_error(e)


@pytest.mark.parametrize("how", ["files", "folder"])
def test_tokenizer_files_missing(folders, tmp_path, how):
    bad = _copy(folders["sd3"], tmp_path / "bad")
    if how == "files":
        (bad / "tokenizer" / "tokenizer.json").unlink()      # tokenizer_config.json is left behind
    else:
        shutil.rmtree(bad / "tokenizer_2")
    with pytest.raises(SenseflowError) as e:
        SD3Adapter.from_pretrained(bad, resolution=RES, max_sequence_length=MSL)
    msg = one_line_error(e)
    if how == "files":
        assert "tokenizer files missing in" in msg and msg.split(" in ")[1].split(":")[0].endswith("tokenizer")
        assert "tokenizer.json or vocab.json+merges.txt" in msg
    else:
        assert "tokenizer_2" in msg and "missing" in msg


def test_load_tokenizer_never_returns_an_empty_tokenizer(tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer"}))
    for path in (tmp_path / "tok", tmp_path / "nope"):
        with pytest.raises(SenseflowError) as e:
            loading.load_tokenizer(path)
        one_line_error(e)


def test_joint_attention_dim_mismatch_t5(tmp_path):
    folder = make_tiny_sd3_folder(tmp_path / "bad", "sd3", t5_dim=24, joint_attention_dim=32).path
    with pytest.raises(SenseflowError) as e:
        SD3Adapter.from_pretrained(folder, resolution=RES, max_sequence_length=MSL)
    msg = one_line_error(e)
    assert "joint_attention_dim mismatch" in msg and "d_model=24" in msg and "32" in msg
    # without T5 tokens the mismatch does not matter (T5 is not used) -- but CLIP still has to fit
    SD3Adapter.from_pretrained(folder, resolution=RES, max_sequence_length=0, load_text_encoders=True)


def test_joint_attention_dim_mismatch_clip_and_pooled(tmp_path):
    folder = make_tiny_sd3_folder(tmp_path / "bad", "sd3", with_t5=False, joint_attention_dim=16).path  # 8+12 > 16
    with pytest.raises(SenseflowError) as e:
        SD3Adapter.from_pretrained(folder, resolution=RES, max_sequence_length=MSL)
    assert "joint_attention_dim mismatch" in one_line_error(e)
    folder = make_tiny_sd3_folder(tmp_path / "bad2", "sd3", with_t5=False, pooled_projection_dim=24).path
    with pytest.raises(SenseflowError) as e:
        SD3Adapter.from_pretrained(folder, resolution=RES, max_sequence_length=MSL)
    assert "pooled_projection_dim mismatch" in one_line_error(e)


def test_other_bad_inputs(folders, tmp_path):
    bad = _copy(folders["sd3"], tmp_path / "bad")
    shutil.rmtree(bad / "text_encoder_3")                  # model_index.json still lists it
    with pytest.raises(SenseflowError) as e:
        SD3Adapter.from_pretrained(bad, resolution=RES, max_sequence_length=MSL)
    assert "text_encoder_3" in one_line_error(e) and "[null, null]" in str(e.value)
    SD3Adapter.from_pretrained(bad, resolution=RES, max_sequence_length=0)   # T5 not needed then
    (bad / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(SenseflowError) as e:
        SD3Adapter.from_pretrained(bad, resolution=RES, max_sequence_length=0)
    assert "no weights" in one_line_error(e)
    for res in (33, 128):                                  # not a multiple of 4; too big for pos_embed_max_size
        with pytest.raises(SenseflowError) as e:
            SD3Adapter.from_pretrained(folders["sd3"], resolution=res, load_text_encoders=False)
        one_line_error(e)
    adapter, transformer = load(folders["sd3"])
    x = latents(adapter, 2)
    t = torch.full((2,), 0.5, dtype=torch.float64)
    with pytest.raises(SenseflowError) as e:
        adapter.predict(transformer, x, t, Conditioning({"prompt_embeds": torch.zeros(2, 5, 32)}))
    one_line_error(e)
    with pytest.raises(SenseflowError) as e:   # a prompt cache from another model
        adapter.predict(transformer, x, t, Conditioning({"prompt_embeds": torch.zeros(2, 5, 48),
                                                         "pooled_prompt_embeds": torch.zeros(2, 32)}))
    msg = one_line_error(e)
    assert "(2, 5, 48)" in msg and "32" in msg
    with pytest.raises(SenseflowError):
        adapter.predict_x0(transformer, x, t, adapter.encode_prompts(PROMPTS), Guidance(embedded=3.5))
