"""SDXL adapter on tiny random models of the real classes, saved as diffusers folders.

The reference is the stock ``StableDiffusionXLPipeline`` loaded from the same folder.  The exact
one-step check uses ``DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=True,
clip_sample=False)``: with one inference step its only timestep is 999 and its "previous" timestep
is -1, where ``alpha_prod_prev = 1`` -- so the pipeline's output latents ARE the scheduler's
``pred_original_sample`` at t=999 from the given noise (with CFG), which must equal the adapter's
x0 at native time 999.  Two steps (999 -> 499 -> clean) additionally check the intermediate
timestep convention and the DDIM step against ``schedule.step``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from diffusers import DDIMScheduler, StableDiffusionXLPipeline  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

from senseflow.schedules import DDPM  # noqa: E402
from senseflow.teachers.base import Conditioning, Guidance, SenseflowError, capture_outputs  # noqa: E402
from senseflow.teachers.sdxl import SDXLAdapter  # noqa: E402
from tests.helpers.adapter_checks import latents, one_line_error  # noqa: E402
from tests.helpers.tiny_models import make_tiny_flux_folder, make_tiny_sdxl_folder  # noqa: E402

diffusers_logging.disable_progress_bar()

RES = 32          # tiny VAE 2x -> 16x16 latents; tiny UNet downsamples once more
PROMPTS = ["a red cat", "a small blue dog on the square"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    return {
        "base": make_tiny_sdxl_folder(root / "base").path,
        "vpred": make_tiny_sdxl_folder(root / "vpred", prediction_type="v_prediction",
                                       force_zeros_for_empty_prompt=False, seed=1).path,
    }


_loaded: dict = {}


def load(folder: Path, **kw):
    key = (str(folder), tuple(sorted(kw.items())))
    if key not in _loaded:
        kw.setdefault("resolution", RES)
        _loaded[key] = SDXLAdapter.from_pretrained(folder, **kw)
    return _loaded[key]


def ddim_pipeline(folder: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                               set_alpha_to_one=True, clip_sample=False)
    return pipe


def full(n: int, value: float) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.float64)


# -------------------------------------------------------------------------------------------------
# loading, schedule, prompt encoding vs the stock pipeline
# -------------------------------------------------------------------------------------------------
def test_loads_with_ddpm_schedule_from_scheduler_config(folders):
    adapter, unet = load(folders["base"])
    assert type(unet).__name__ == "UNet2DConditionModel" and unet.config.addition_embed_type == "text_time"
    sched = adapter.schedule
    assert isinstance(sched, DDPM) and sched.prediction == "epsilon" and sched.num_train_timesteps == 1000
    ref = DDIMScheduler.from_pretrained(folders["base"], subfolder="scheduler").alphas_cumprod.double()
    torch.testing.assert_close(sched.alpha(torch.arange(1000.0)) ** 2, ref, atol=1e-6, rtol=0)
    assert [float(a) for a in sched.from_unit([1.0, 0.75, 0.5, 0.25])] == [999.0, 749.0, 499.0, 249.0]
    assert adapter.latent_shape() == (4, RES // 2, RES // 2)
    assert adapter.guidance_kinds == frozenset({"cfg"})
    assert load(folders["vpred"])[0].schedule.prediction == "v"
    assert load(folders["base"], prediction="v", load_text_encoders=False)[0].schedule.prediction == "v"


@pytest.mark.parametrize("variant", ["base", "vpred"])
def test_encode_prompts_and_unconditional_equal_pipeline(folders, variant):
    """base: force_zeros_for_empty_prompt=True (zeros); vpred folder: False (the encoded empty prompt)."""
    adapter, _ = load(folders[variant])
    pipe = StableDiffusionXLPipeline.from_pretrained(folders[variant])
    with torch.no_grad():
        pe, neg_pe, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True)
        time_ids = pipe._get_add_time_ids((RES, RES), (0, 0), (RES, RES), dtype=pe.dtype,
                                          text_encoder_projection_dim=pooled.shape[-1])
    cond = adapter.encode_prompts(PROMPTS)
    uncond = adapter.unconditional(2)
    assert cond.tensors["prompt_embeds"].shape == (2, 77, 20) and cond.tensors["pooled_prompt_embeds"].shape == (2, 16)
    torch.testing.assert_close(cond.tensors["prompt_embeds"], pe, atol=1e-6, rtol=0)
    torch.testing.assert_close(cond.tensors["pooled_prompt_embeds"], pooled, atol=1e-6, rtol=0)
    torch.testing.assert_close(cond.tensors["time_ids"], time_ids.repeat(2, 1), atol=0, rtol=0)
    torch.testing.assert_close(uncond.tensors["prompt_embeds"], neg_pe, atol=1e-6, rtol=0)
    torch.testing.assert_close(uncond.tensors["pooled_prompt_embeds"], neg_pooled, atol=1e-6, rtol=0)
    torch.testing.assert_close(uncond.tensors["time_ids"], time_ids.repeat(2, 1), atol=0, rtol=0)
    assert adapter.zero_unconditional is (variant == "base")
    assert bool(uncond.tensors["prompt_embeds"].abs().max() == 0) is (variant == "base")
    assert not torch.allclose(cond.tensors["pooled_prompt_embeds"][0], cond.tensors["pooled_prompt_embeds"][1])


# -------------------------------------------------------------------------------------------------
# the model call against the stock pipeline (DDIM trailing: exact x0)
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["base", "vpred"])
def test_one_step_ddim_pipeline_equals_adapter_x0_at_999(folders, variant):
    adapter, unet = load(folders[variant])
    pipe = ddim_pipeline(folders[variant])
    w = 5.0
    x = latents(adapter, 2, seed=1)
    with torch.no_grad():
        out = pipe(PROMPTS, latents=x.clone(), height=RES, width=RES, num_inference_steps=1, guidance_scale=w,
                   output_type="latent").images
        assert pipe.scheduler.timesteps.tolist() == [999]
        x0 = adapter.predict_x0(unet, x, full(2, 999.0), adapter.encode_prompts(PROMPTS), Guidance(cfg=w))
    torch.testing.assert_close(x0, out, atol=2e-5, rtol=1e-5)
    assert (out - x).abs().max() > 0.1


def test_two_step_ddim_pipeline_equals_adapter_ddim_steps(folders):
    adapter, unet = load(folders["base"])
    pipe = ddim_pipeline(folders["base"])
    w = 3.0
    x = latents(adapter, 2, seed=2)
    with torch.no_grad():
        out = pipe(PROMPTS, latents=x.clone(), height=RES, width=RES, num_inference_steps=2, guidance_scale=w,
                   output_type="latent").images
        assert pipe.scheduler.timesteps.tolist() == [999, 499]
        cond, g, sched = adapter.encode_prompts(PROMPTS), Guidance(cfg=w), adapter.schedule
        t0, t1 = full(2, 999.0), full(2, 499.0)
        x_a = sched.step(x, adapter.predict_x0(unet, x, t0, cond, g), t0, t1)
        x0 = adapter.predict_x0(unet, x_a, t1, cond, g)
    torch.testing.assert_close(x0, out, atol=5e-5, rtol=1e-4)


def test_predict_passes_the_integer_index_and_refuses_clean(folders):
    adapter, unet = load(folders["base"])
    cond, x = adapter.encode_prompts(PROMPTS), latents(adapter, 2, seed=3)
    seen = {}

    def hook(_m, args, kwargs):
        seen["timestep"] = args[1] if len(args) > 1 else kwargs["timestep"]
        seen.update(kwargs)
    h = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            eps = adapter.predict(unet, x, torch.tensor([999.0, 249.0], dtype=torch.float64), cond)
    finally:
        h.remove()
    torch.testing.assert_close(seen["timestep"], torch.tensor([999.0, 249.0]))
    assert seen["timestep"].dtype == torch.float32
    assert seen["added_cond_kwargs"]["time_ids"].shape == (2, 6)
    with torch.no_grad():        # the pipeline hands the UNet an int64 timestep: same embedding
        ref = unet(x, torch.tensor(999), encoder_hidden_states=cond.tensors["prompt_embeds"][:1].expand(2, -1, -1),
                   added_cond_kwargs={"text_embeds": cond.tensors["pooled_prompt_embeds"][:1].expand(2, -1),
                                      "time_ids": cond.tensors["time_ids"]}, return_dict=False)[0]
        got = adapter.predict(unet, x, full(2, 999.0), cond[[0, 0]])
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    assert eps.shape == x.shape
    # x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
    abar = adapter.schedule.alpha(torch.tensor(249.0)) ** 2
    x0 = adapter.predict_x0(unet, x[1:], full(1, 249.0), cond[1:])
    torch.testing.assert_close(x0, (x[1:] - (1 - abar).sqrt().float() * eps[1:]) / abar.sqrt().float(),
                               atol=1e-5, rtol=1e-5)
    for bad in (-1.0, 1000.0):
        with pytest.raises(SenseflowError) as e:
            adapter.predict(unet, x, full(2, bad), cond)
        one_line_error(e)


def test_prompt_cache_without_time_ids_and_without_encoders(folders):
    adapter, unet = load(folders["base"], load_text_encoders=False)
    full_adapter, _ = load(folders["base"])
    cond = full_adapter.encode_prompts(PROMPTS)
    x, t = latents(adapter, 2, seed=4), full(2, 500.0)
    bare = Conditioning({k: v for k, v in cond.tensors.items() if k != "time_ids"})
    with torch.no_grad():
        a = adapter.predict_x0(unet, x, t, bare, Guidance(cfg=4.0))          # zeros uncond needs no encoders
        b = full_adapter.predict_x0(unet, x, t, cond, Guidance(cfg=4.0))
    torch.testing.assert_close(a, b)
    with pytest.raises(SenseflowError):
        adapter.encode_prompts(PROMPTS)


# -------------------------------------------------------------------------------------------------
# VAE, structure, registration
# -------------------------------------------------------------------------------------------------
def test_vae_scaling_without_shift_and_fp16_upcast(folders):
    adapter, _ = load(folders["base"])
    vae = adapter.vae
    assert vae.config.shift_factor is None and vae.config.scaling_factor == pytest.approx(0.13025)
    z = latents(adapter, 1, seed=5)
    with torch.no_grad():
        img = adapter.decode(z)
        torch.testing.assert_close(img, vae.decode(z / vae.config.scaling_factor, return_dict=False)[0])
        enc = adapter.encode(img, sample=False)
        torch.testing.assert_close(enc, vae.encode(img).latent_dist.mode() * vae.config.scaling_factor)
    half, unet16 = SDXLAdapter.from_pretrained(folders["base"], resolution=RES, dtype=torch.float16,
                                               load_text_encoders=False)
    assert next(unet16.parameters()).dtype == torch.float16 and next(half.vae.parameters()).dtype == torch.float32


def test_block_names_and_output_norm_are_hookable(folders):
    adapter, unet = load(folders["base"])
    names = adapter.block_names(unet)
    assert names == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    norm = adapter.output_norm_name(unet)
    assert norm == "conv_norm_out"
    with capture_outputs(unet, names + [norm]) as feats, torch.no_grad():
        adapter.predict(unet, latents(adapter, 2), full(2, 500.0), adapter.encode_prompts(PROMPTS))
    assert feats[norm].shape == (2, 8, RES // 2, RES // 2)


def test_registered_family(folders):
    from senseflow.build import load_teacher
    from senseflow.config import validate

    config = validate({"paths": {"teacher": str(folders["base"])}, "teacher": {"family": "sdxl", "resolution": RES},
                       "method": {"name": "dmd2"}})
    adapter, unet = load_teacher(config, torch.device("cpu"))
    assert isinstance(adapter, SDXLAdapter) and type(unet).__name__ == "UNet2DConditionModel"
    config = validate({"paths": {"teacher": str(folders["base"])},
                       "teacher": {"family": "sdxl", "resolution": RES, "shift": 3.0}, "method": {"name": "dmd2"}})
    with pytest.raises(SenseflowError) as e:
        load_teacher(config, torch.device("cpu"))
    assert "shift" in one_line_error(e)


# -------------------------------------------------------------------------------------------------
# bad input: one-line SenseflowErrors
# -------------------------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_wrong_model_class_and_pipeline(folders, tmp_path):
    flux = make_tiny_flux_folder(tmp_path / "flux", num_layers=1, num_single_layers=1)
    bad = _copy(folders["base"], tmp_path / "bad")
    shutil.rmtree(bad / "unet")
    shutil.copytree(flux.path / "transformer", bad / "unet")
    with pytest.raises(SenseflowError) as e:
        SDXLAdapter.from_pretrained(bad, resolution=RES)
    msg = one_line_error(e)
    assert "FluxTransformer2DModel" in msg and "UNet2DConditionModel" in msg and "flux" in msg
    with pytest.raises(SenseflowError) as e:
        SDXLAdapter.from_pretrained(flux.path, resolution=RES)
    assert "FluxPipeline" in one_line_error(e)


def test_missing_pieces(folders, tmp_path):
    bad = _copy(folders["base"], tmp_path / "bad")
    (bad / "tokenizer_2" / "tokenizer.json").unlink()
    with pytest.raises(SenseflowError) as e:
        SDXLAdapter.from_pretrained(bad, resolution=RES)
    assert "tokenizer_2" in one_line_error(e)
    shutil.rmtree(bad / "text_encoder")
    with pytest.raises(SenseflowError) as e:
        SDXLAdapter.from_pretrained(bad, resolution=RES)
    assert "text_encoder" in one_line_error(e)
    SDXLAdapter.from_pretrained(bad, resolution=RES, load_text_encoders=False)
    with pytest.raises(SenseflowError) as e:
        SDXLAdapter.from_pretrained(bad, resolution=30, load_text_encoders=False)
    assert "multiple of 4" in one_line_error(e)


def test_dimension_mismatches(tmp_path):
    folder = make_tiny_sdxl_folder(tmp_path / "cross", cross_attention_dim=24).path
    with pytest.raises(SenseflowError) as e:
        SDXLAdapter.from_pretrained(folder, resolution=RES)
    assert "cross_attention_dim mismatch" in one_line_error(e)
    folder = make_tiny_sdxl_folder(tmp_path / "refiner", projection_class_embeddings_input_dim=5 * 4 + 16).path
    with pytest.raises(SenseflowError) as e:
        SDXLAdapter.from_pretrained(folder, resolution=RES)
    assert "refiner" in one_line_error(e)
    folder = make_tiny_sdxl_folder(tmp_path / "zsnr", scheduler={"rescale_betas_zero_snr": True}).path
    with pytest.raises(SenseflowError) as e:
        SDXLAdapter.from_pretrained(folder, resolution=RES, load_text_encoders=False)
    assert "zero_snr" in one_line_error(e)


def test_bad_conditioning_and_guidance(folders):
    adapter, unet = load(folders["base"])
    x, t = latents(adapter, 2), full(2, 500.0)
    with pytest.raises(SenseflowError) as e:
        adapter.predict(unet, x, t, Conditioning({"prompt_embeds": torch.zeros(2, 77, 20)}))
    one_line_error(e)
    with pytest.raises(SenseflowError) as e:
        adapter.predict(unet, x, t, Conditioning({"prompt_embeds": torch.zeros(2, 77, 32),
                                                  "pooled_prompt_embeds": torch.zeros(2, 16)}))
    assert "(2, 77, 32)" in one_line_error(e)
    with pytest.raises(SenseflowError):
        adapter.predict_x0(unet, x, t, adapter.encode_prompts(PROMPTS), Guidance(embedded=3.5))
