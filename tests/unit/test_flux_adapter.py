"""FLUX.1 adapter on tiny random models of the real classes, saved as diffusers folders.

The reference for every convention is the stock ``FluxPipeline`` loaded from the same folder: prompt
encoding, 2x2 packing and position ids, timestep scale (``t``, not ``1000 t``), velocity sign, the
guidance embedding and the dynamic (``mu``) shift read from the scheduler config.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from diffusers import FluxPipeline  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

from senseflow.methods.dmd2 import ida_update  # noqa: E402
from senseflow.schedules import RectifiedFlow, flux_mu  # noqa: E402
from senseflow.teachers.base import Conditioning, Guidance, SenseflowError, capture_outputs  # noqa: E402
from senseflow.teachers.flux import (  # noqa: E402
    GUIDANCE_EMBEDDER_PREFIX, FluxAdapter, latent_image_ids, pack_latents, unpack_latents)
from tests.helpers.adapter_checks import latents, one_line_error, ones  # noqa: E402
from tests.helpers.tiny_models import make_tiny_flux_folder, make_tiny_sd3_folder  # noqa: E402

diffusers_logging.disable_progress_bar()

RES = 32          # tiny VAE downsamples 2x -> 16x16 latents -> 8x8 = 64 packed tokens
MSL = 8           # T5 tokens (the real default is 512; small keeps the test fast)
PROMPTS = ["a red cat", "a small blue dog on the square"]
#: mu the pipeline computes for 64 tokens with the tiny scheduler config (16..256 tokens -> 0.5..1.15)
MU = flux_mu(64, 16, 256, 0.5, 1.15)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    return {
        "dev": make_tiny_flux_folder(root / "dev").path,
        "schnell": make_tiny_flux_folder(root / "schnell", guidance_embeds=False, dynamic_shifting=False,
                                         seed=1).path,
    }


_loaded: dict = {}


def load(folder: Path, **kw):
    key = (str(folder), tuple(sorted(kw.items())))
    if key not in _loaded:
        kw.setdefault("resolution", RES)
        kw.setdefault("max_sequence_length", MSL)
        _loaded[key] = FluxAdapter.from_pretrained(folder, **kw)
    return _loaded[key]


_pipes: dict = {}


def pipeline(folder: Path) -> FluxPipeline:
    if str(folder) not in _pipes:
        _pipes[str(folder)] = FluxPipeline.from_pretrained(folder)
    return _pipes[str(folder)]


# -------------------------------------------------------------------------------------------------
# loading, schedule, packing helpers
# -------------------------------------------------------------------------------------------------
def test_loads_with_dynamic_mu_from_scheduler_config(folders):
    adapter, transformer = load(folders["dev"])
    assert type(transformer).__name__ == "FluxTransformer2DModel" and transformer.config.guidance_embeds
    assert adapter.latent_shape() == (4, RES // 2, RES // 2)          # unpacked VAE latent
    assert adapter.image_seq_len == 64
    assert isinstance(adapter.schedule, RectifiedFlow) and adapter.schedule.prediction == "velocity"
    assert adapter.schedule.mu == pytest.approx(MU) and adapter.schedule.shift == 1.0
    assert adapter.guidance_kinds == frozenset({"embedded"})
    # FLUX.1-dev's real numbers: 1024 px -> 4096 tokens -> mu = 1.15 -> anchors {1000, 904, 759, 512} in the
    # official code (the shifted values truncated to integer indices)
    real = flux_mu(4096, 256, 4096, 0.5, 1.15)
    assert real == pytest.approx(1.15)
    anchors = RectifiedFlow(mu=real).from_unit([1.0, 0.75, 0.5, 0.25])
    assert [int(float(a) * 1000) for a in anchors] == [1000, 904, 759, 512]


def test_mu_and_shift_overrides_and_static_scheduler(folders):
    assert load(folders["dev"], mu=1.15, load_text_encoders=False)[0].schedule.mu == 1.15
    a = load(folders["dev"], shift=3.0, load_text_encoders=False)[0]
    assert a.schedule.mu is None and a.schedule.shift == 3.0
    with pytest.raises(SenseflowError) as e:
        FluxAdapter.from_pretrained(folders["dev"], resolution=RES, mu=1.0, shift=3.0, load_text_encoders=False)
    one_line_error(e)
    # a scheduler without dynamic shifting (FLUX.1-schnell style) gives its static shift
    a = load(folders["schnell"], load_text_encoders=False)[0]
    assert a.schedule.mu is None and a.schedule.shift == 3.0
    # the mu follows the resolution: 64 px -> 16x16 packed tokens
    a = load(folders["dev"], resolution=64, load_text_encoders=False)[0]
    assert a.image_seq_len == 256 and a.schedule.mu == pytest.approx(1.15)


def test_pack_unpack_and_ids_equal_the_pipeline_helpers():
    x = torch.randn(2, 4, 6, 10)
    packed = pack_latents(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 4, 6, 10), rtol=0, atol=0)
    # the pipeline's unpack takes PIXEL sizes and the VAE factor
    torch.testing.assert_close(unpack_latents(packed, 6, 10), FluxPipeline._unpack_latents(packed, 12, 20, 2),
                               rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(packed, 6, 10), x, rtol=0, atol=0)
    torch.testing.assert_close(latent_image_ids(3, 5), FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu",
                                                                                             torch.float32))


def test_encode_prompts_equals_pipeline_encode_prompt(folders):
    adapter, _ = load(folders["dev"])
    pipe = pipeline(folders["dev"])
    with torch.no_grad():
        pe, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, max_sequence_length=MSL)
    cond = adapter.encode_prompts(PROMPTS)
    assert cond.tensors["prompt_embeds"].shape == (2, MSL, 32)
    assert cond.tensors["pooled_prompt_embeds"].shape == (2, 16)
    torch.testing.assert_close(cond.tensors["prompt_embeds"], pe, atol=1e-6, rtol=0)
    torch.testing.assert_close(cond.tensors["pooled_prompt_embeds"], pooled, atol=1e-6, rtol=0)
    assert text_ids.abs().max() == 0 and text_ids.shape == (MSL, 3)
    assert not torch.allclose(cond.tensors["pooled_prompt_embeds"][0], cond.tensors["pooled_prompt_embeds"][1])
    assert not cond.tensors["prompt_embeds"].requires_grad


# -------------------------------------------------------------------------------------------------
# the model call against the stock pipeline
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("g", [1.0, 5.0])
def test_one_step_stock_pipeline_equals_adapter_x0_at_t1(folders, g):
    """sigmas=[1]: the pipeline's single Euler step from sigma=1 to 0 IS the x0 prediction (packed latents)."""
    adapter, transformer = load(folders["dev"])
    pipe = pipeline(folders["dev"])
    x = latents(adapter, 2, seed=3)
    with torch.no_grad():
        out = pipe(PROMPTS, latents=pack_latents(x), height=RES, width=RES, sigmas=[1.0], guidance_scale=g,
                   output_type="latent", max_sequence_length=MSL).images
        x0 = adapter.predict_x0(transformer, x, ones(2), adapter.encode_prompts(PROMPTS), Guidance(embedded=g))
    torch.testing.assert_close(x0, unpack_latents(out, RES // 2, RES // 2), atol=2e-5, rtol=0)
    assert (x0 - x).abs().max() > 0.1


def test_guidance_value_reaches_the_embedding(folders):
    adapter, transformer = load(folders["dev"])
    cond, x = adapter.encode_prompts(PROMPTS), latents(adapter, 2, seed=4)
    with torch.no_grad():
        a = adapter.predict_x0(transformer, x, ones(2, 0.7), cond, Guidance(embedded=1.0))
        b = adapter.predict_x0(transformer, x, ones(2, 0.7), cond, Guidance(embedded=torch.tensor([1.0, 8.0])))
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1], atol=1e-4)


def test_two_step_stock_pipeline_equals_adapter_euler_with_mu_shift(folders):
    """Unit sigmas [1, .5] are shifted by the scheduler with the pipeline's mu; Euler through the adapter agrees."""
    adapter, transformer = load(folders["dev"])
    pipe = pipeline(folders["dev"])
    x = latents(adapter, 2, seed=5)
    g = Guidance(embedded=3.5)
    with torch.no_grad():
        out = pipe(PROMPTS, latents=pack_latents(x), height=RES, width=RES, sigmas=[1.0, 0.5], guidance_scale=3.5,
                   output_type="latent", max_sequence_length=MSL).images
    sched = adapter.schedule
    t0, t1 = sched.from_unit([1.0, 0.5])
    assert float(t1) == pytest.approx(math.exp(MU) / (math.exp(MU) + 1.0))        # e^mu / (e^mu + 1/u - 1)
    assert pipe.scheduler.sigmas[1].item() == pytest.approx(float(t1), abs=1e-6)  # the pipeline's own shift
    cond = adapter.encode_prompts(PROMPTS)
    with torch.no_grad():
        x_a = sched.step(x, adapter.predict_x0(transformer, x, t0.expand(2), cond, g), t0, t1)
        x0 = adapter.predict_x0(transformer, x_a, t1.expand(2), cond, g)
    torch.testing.assert_close(x0, unpack_latents(out, RES // 2, RES // 2), atol=5e-5, rtol=0)


def test_predict_passes_t_in_float32_guidance_and_2d_ids(folders):
    adapter, transformer = load(folders["dev"])
    cond = adapter.encode_prompts(PROMPTS)
    x = latents(adapter, 2, seed=6)
    seen = {}

    def hook(_m, args, kwargs):
        seen.update(kwargs)
    h = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            adapter.predict(transformer, x, torch.tensor([0.3, 0.8], dtype=torch.float64), cond,
                            torch.tensor([2.0, 4.0]))
    finally:
        h.remove()
    assert seen["timestep"].dtype == torch.float32 and seen["guidance"].dtype == torch.float32
    torch.testing.assert_close(seen["timestep"], torch.tensor([0.3, 0.8]))        # t, not 1000 t
    torch.testing.assert_close(seen["guidance"], torch.tensor([2.0, 4.0]))        # unscaled, as the pipeline
    assert seen["hidden_states"].shape == (2, 64, 16)
    assert seen["img_ids"].shape == (64, 3) and seen["txt_ids"].shape == (MSL, 3)


# -------------------------------------------------------------------------------------------------
# student / fake score without the guidance embedding, default guidance
# -------------------------------------------------------------------------------------------------
def test_student_drops_only_the_guidance_embedder(folders):
    adapter, transformer = load(folders["dev"], load_text_encoders=False)
    student = adapter.make_student(transformer)
    assert type(student).__name__ == "FluxTransformer2DModel" and student.config.guidance_embeds is False
    t_sd, s_sd = transformer.state_dict(), student.state_dict()
    dropped = {k for k in t_sd if k not in s_sd}
    assert dropped and all(k.startswith(GUIDANCE_EMBEDDER_PREFIX) for k in dropped)
    assert set(s_sd) <= set(t_sd)
    for k, v in s_sd.items():
        assert torch.equal(v, t_sd[k]), k
        assert v.data_ptr() != t_sd[k].data_ptr(), f"{k} shares storage with the frozen teacher"
    assert not any(p.is_meta for p in student.parameters())
    # the fake score is built the same way (official SenseFlow FLUX code); IDA matches every parameter
    fake = adapter.make_fake_score(transformer)
    assert fake.config.guidance_embeds is False
    assert ida_update(fake, student, 0.97) == len(list(fake.parameters()))


def test_student_equals_teacher_with_a_zero_guidance_embedding(folders):
    adapter, transformer = load(folders["dev"])
    student = adapter.make_student(transformer)
    cond, x, t = adapter.encode_prompts(PROMPTS), latents(adapter, 2, seed=7), ones(2, 0.6)
    teacher0 = copy.deepcopy(transformer)
    lin = teacher0.time_text_embed.guidance_embedder.linear_2
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
        ref = adapter.predict_x0(teacher0, x, t, cond, Guidance(embedded=6.0))
        got = adapter.predict_x0(student, x, t, cond)                                # no guidance for the student
        teacher = adapter.predict_x0(transformer, x, t, cond, Guidance(embedded=6.0))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(got, teacher, atol=1e-4)
    # the student refuses embedded guidance (it has no embedding), the teacher defaults to 3.5
    with pytest.raises(SenseflowError) as e:
        adapter.predict_x0(student, x, t, cond, Guidance(embedded=3.5))
    assert "no guidance embedding" in one_line_error(e)
    with torch.no_grad():
        torch.testing.assert_close(adapter.predict_x0(transformer, x, t, cond),
                                   adapter.predict_x0(transformer, x, t, cond, Guidance(embedded=3.5)))


def test_guidance_embed_options(folders):
    adapter, transformer = FluxAdapter.from_pretrained(folders["dev"], resolution=RES, load_text_encoders=False,
                                                       student_guidance_embed=True, fake_guidance_embed=True,
                                                       default_embedded_guidance=None)
    assert adapter.make_student(transformer).config.guidance_embeds
    assert adapter.make_fake_score(transformer).config.guidance_embeds
    x = latents(adapter, 1)
    cond = Conditioning({"prompt_embeds": torch.zeros(1, 3, 32), "pooled_prompt_embeds": torch.zeros(1, 16)})
    with pytest.raises(SenseflowError) as e:       # no default: the guidance value is required
        adapter.predict_x0(transformer, x, ones(1), cond)
    assert "embedded guidance" in one_line_error(e)


def test_guidance_free_teacher_and_cfg_refused(folders):
    adapter, transformer = load(folders["schnell"])
    cond, x = adapter.encode_prompts(PROMPTS), latents(adapter, 2)
    with torch.no_grad():
        out = adapter.predict_x0(transformer, x, ones(2, 0.5), cond)
    assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(SenseflowError):
        adapter.predict_x0(transformer, x, ones(2, 0.5), cond, Guidance(embedded=2.0))
    with pytest.raises(SenseflowError) as e:
        adapter.predict_x0(transformer, x, ones(2, 0.5), cond, Guidance(cfg=4.0))
    one_line_error(e)
    with pytest.raises(SenseflowError) as e:
        adapter.unconditional(2)
    assert "embedded guidance" in one_line_error(e)


# -------------------------------------------------------------------------------------------------
# VAE, structure, registration
# -------------------------------------------------------------------------------------------------
def test_vae_shift_and_scaling_factors(folders):
    adapter, _ = load(folders["dev"])
    vae = adapter.vae
    z = latents(adapter, 1, seed=8)
    with torch.no_grad():
        img = adapter.decode(z)
        ref = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
        torch.testing.assert_close(img, ref)
        assert img.shape == (1, 3, RES, RES)
        enc = adapter.encode(img, sample=False)
        torch.testing.assert_close(enc, (vae.encode(img).latent_dist.mode() - vae.config.shift_factor)
                                   * vae.config.scaling_factor)


def test_block_names_and_output_norm_are_hookable(folders):
    adapter, transformer = load(folders["dev"])
    names = adapter.block_names(transformer)
    assert names == ["transformer_blocks.0", "transformer_blocks.1",
                     "single_transformer_blocks.0", "single_transformer_blocks.1"]
    norm = adapter.output_norm_name(transformer)
    assert norm == "norm_out"
    with capture_outputs(transformer, names + [norm]) as feats, torch.no_grad():
        adapter.predict(transformer, latents(adapter, 2), ones(2, 0.5), adapter.encode_prompts(PROMPTS))
    assert feats[norm].shape == (2, 64, 32)


def test_registered_family_builds_guidance_free_student_and_fake(folders):
    from senseflow.build import build_models
    from senseflow.config import validate

    config = validate({"paths": {"teacher": str(folders["dev"])}, "teacher": {"family": "flux", "resolution": RES},
                       "method": {"name": "senseflow", "real_guidance": {"embedded": [1.0, 8.0]}}})
    models = build_models(config, torch.device("cpu"))
    assert isinstance(models.teacher.adapter, FluxAdapter)
    assert models.teacher.backbone.config.guidance_embeds
    assert not models.generator.denoiser.backbone.config.guidance_embeds
    assert not models.fake_score.backbone.config.guidance_embeds
    assert [round(float(a), 4) for a in models.generator.anchors] == \
        [round(float(a), 4) for a in RectifiedFlow(mu=MU).from_unit([1.0, 0.75, 0.5, 0.25])]


# -------------------------------------------------------------------------------------------------
# bad input: one-line SenseflowErrors
# -------------------------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_wrong_model_class_in_transformer(folders, tmp_path):
    bad = _copy(folders["dev"], tmp_path / "bad")
    shutil.rmtree(bad / "transformer")
    sd3 = make_tiny_sd3_folder(tmp_path / "sd3", "sd3", with_t5=False)
    shutil.copytree(sd3.path / "transformer", bad / "transformer")
    with pytest.raises(SenseflowError) as e:
        FluxAdapter.from_pretrained(bad, resolution=RES)
    msg = one_line_error(e)
    assert "SD3Transformer2DModel" in msg and "FluxTransformer2DModel" in msg and "sd3" in msg
    with pytest.raises(SenseflowError) as e:                # and the SD3 pipeline folder itself
        FluxAdapter.from_pretrained(sd3.path, resolution=RES)
    assert "StableDiffusion3Pipeline" in one_line_error(e)


@pytest.mark.parametrize("how", ["files", "folder"])
def test_missing_tokenizer(folders, tmp_path, how):
    bad = _copy(folders["dev"], tmp_path / "bad")
    if how == "files":
        (bad / "tokenizer_2" / "tokenizer.json").unlink()
        for f in ("spiece.model",):
            (bad / "tokenizer_2" / f).unlink(missing_ok=True)
    else:
        shutil.rmtree(bad / "tokenizer")
    with pytest.raises(SenseflowError) as e:
        FluxAdapter.from_pretrained(bad, resolution=RES, max_sequence_length=MSL)
    msg = one_line_error(e)
    assert ("tokenizer_2" if how == "files" else "tokenizer") in msg
    FluxAdapter.from_pretrained(bad, resolution=RES, load_text_encoders=False)      # a prompt cache needs none


def test_dimension_mismatches(tmp_path):
    folder = make_tiny_flux_folder(tmp_path / "joint", joint_attention_dim=24).path
    with pytest.raises(SenseflowError) as e:
        FluxAdapter.from_pretrained(folder, resolution=RES, max_sequence_length=MSL)
    assert "joint_attention_dim mismatch" in one_line_error(e)
    folder = make_tiny_flux_folder(tmp_path / "pooled", pooled_projection_dim=12).path
    with pytest.raises(SenseflowError) as e:
        FluxAdapter.from_pretrained(folder, resolution=RES, max_sequence_length=MSL)
    assert "pooled_projection_dim mismatch" in one_line_error(e)
    folder = make_tiny_flux_folder(tmp_path / "chans", in_channels=32).path
    with pytest.raises(SenseflowError) as e:
        FluxAdapter.from_pretrained(folder, resolution=RES, load_text_encoders=False)
    assert "latent_channels=4" in one_line_error(e)


def test_other_bad_inputs(folders, tmp_path):
    for kw in ({"resolution": 30}, {"resolution": RES, "max_sequence_length": 600}):
        with pytest.raises(SenseflowError) as e:
            FluxAdapter.from_pretrained(folders["dev"], **kw)
        one_line_error(e)
    with pytest.raises(SenseflowError) as e:
        FluxAdapter.from_pretrained("black-forest-labs/FLUX.1-dev", resolution=RES)
    assert "hub id" in one_line_error(e)
    bad = _copy(folders["dev"], tmp_path / "bad")
    shutil.rmtree(bad / "text_encoder_2")
    with pytest.raises(SenseflowError) as e:
        FluxAdapter.from_pretrained(bad, resolution=RES, max_sequence_length=MSL)
    assert "text_encoder_2" in one_line_error(e)
    index = json.loads((bad / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (bad / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(SenseflowError) as e:
        FluxAdapter.from_pretrained(bad, resolution=RES, load_text_encoders=False)
    assert "sdxl" in one_line_error(e)
    adapter, transformer = load(folders["dev"])
    x = latents(adapter, 2)
    with pytest.raises(SenseflowError) as e:       # a prompt cache from another model
        adapter.predict(transformer, x, ones(2), Conditioning({"prompt_embeds": torch.zeros(2, 5, 48),
                                                               "pooled_prompt_embeds": torch.zeros(2, 16)}))
    assert "(2, 5, 48)" in one_line_error(e)
    with pytest.raises(SenseflowError) as e:       # packed latents by mistake
        adapter.predict(transformer, pack_latents(x), ones(2), adapter.encode_prompts(PROMPTS))
    assert "unpacked" in one_line_error(e)
