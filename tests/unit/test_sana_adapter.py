"""SANA / SANA-Sprint adapter on tiny random models of the real classes, saved as diffusers folders.

References: ``SanaPipeline`` (rectified flow) and ``SanaSprintPipeline`` (TrigFlow) loaded from the same
folders, with ``use_resolution_binning=False``.  The flow comparisons swap the folder's
``DPMSolverMultistepScheduler`` (SANA's own) for ``FlowMatchEulerDiscreteScheduler(shift=flow_shift)``:
DPM-Solver hands the transformer ``int(1000 sigma)`` (999 for sigma 0.99967) while stepping with the
exact sigma, so it is not an exact reference for a single network call; the Euler scheduler passes
``1000 sigma`` and its one step from sigma to 0 IS the x0 prediction.
"""

from __future__ import annotations

import inspect
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaSprintPipeline  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

from senseflow.schedules import RectifiedFlow, TrigFlow, flow_to_trigflow, trigflow_to_flow  # noqa: E402
from senseflow.teachers.base import Conditioning, Guidance, SenseflowError, capture_outputs  # noqa: E402
from senseflow.teachers.sana import DEFAULT_COMPLEX_HUMAN_INSTRUCTION, SanaAdapter  # noqa: E402
from tests.helpers.adapter_checks import latents, one_line_error  # noqa: E402
from tests.helpers.tiny_models import make_tiny_sana_folder, make_tiny_sdxl_folder  # noqa: E402

diffusers_logging.disable_progress_bar()

RES = 32          # tiny DC-AE downsamples 2x -> 16x16 latents (patch size 1)
MSL = 16          # Gemma tokens kept (the real default is 300)
PROMPTS = ["a Red cat ", "a small blue dog on the square"]
CHI = list(DEFAULT_COMPLEX_HUMAN_INSTRUCTION)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sana")
    return {
        "sana": make_tiny_sana_folder(root / "sana").path,
        "sprint": make_tiny_sana_folder(root / "sprint", sprint=True, seed=1).path,
    }


_loaded: dict = {}


def load(folder: Path, **kw):
    key = (str(folder), tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kw.items())))
    if key not in _loaded:
        kw.setdefault("resolution", RES)
        kw.setdefault("max_sequence_length", MSL)
        kw.setdefault("complex_human_instruction", None)    # fast; the CHI is checked in the encoding test
        _loaded[key] = SanaAdapter.from_pretrained(folder, **kw)
    return _loaded[key]


def euler_pipeline(folder: Path) -> SanaPipeline:
    pipe = SanaPipeline.from_pretrained(folder)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000,
                                                     shift=pipe.scheduler.config.flow_shift)
    return pipe


def full(n: int, value: float) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.float64)


# -------------------------------------------------------------------------------------------------
# loading, schedules, prompt encoding vs the stock pipelines
# -------------------------------------------------------------------------------------------------
def test_loads_flow_and_trigflow_from_the_scheduler(folders, tmp_path):
    adapter, transformer = load(folders["sana"])
    assert type(transformer).__name__ == "SanaTransformer2DModel"
    assert adapter.prediction == "flow" and isinstance(adapter.schedule, RectifiedFlow)
    assert adapter.schedule.shift == 3.0 and adapter.schedule.prediction == "velocity"   # DPM-Solver's flow_shift
    assert adapter.latent_shape() == (4, RES // 2, RES // 2)
    assert adapter.guidance_kinds == frozenset({"cfg"})
    sprint, _ = load(folders["sprint"])
    assert sprint.prediction == "trigflow" and isinstance(sprint.schedule, TrigFlow)   # SCMScheduler
    assert sprint.schedule.prediction == "v" and sprint.sigma_data == 0.5
    assert sprint.guidance_kinds == frozenset({"cfg", "embedded"})
    fm = make_tiny_sana_folder(tmp_path / "fm", scheduler="flow_match", flow_shift=2.0).path
    assert SanaAdapter.from_pretrained(fm, resolution=RES, load_text_encoders=False)[0].schedule.shift == 2.0
    assert load(folders["sana"], shift=1.5, load_text_encoders=False)[0].schedule.shift == 1.5
    explicit = load(folders["sana"], prediction="trigflow", load_text_encoders=False)[0]
    assert isinstance(explicit.schedule, TrigFlow)
    with pytest.raises(SenseflowError) as e:
        SanaAdapter.from_pretrained(folders["sprint"], resolution=RES, shift=3.0, load_text_encoders=False)
    assert "TrigFlow" in one_line_error(e)


def test_default_instruction_is_the_pipelines_default():
    for pipe in (SanaPipeline, SanaSprintPipeline):
        assert list(inspect.signature(pipe.__call__).parameters["complex_human_instruction"].default) == CHI


@pytest.mark.parametrize("chi", [True, False])
def test_encode_prompts_equals_pipeline_encode_prompt(folders, chi):
    """Same instruction setting on both sides: the pipeline's default (CHI on), and CHI off."""
    adapter, _ = load(folders["sana"], complex_human_instruction=CHI if chi else None)
    pipe = SanaPipeline.from_pretrained(folders["sana"])
    with torch.no_grad():
        pe, pm, npe, npm = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True, max_sequence_length=MSL,
                                              complex_human_instruction=CHI if chi else None)
    cond, uncond = adapter.encode_prompts(PROMPTS), adapter.unconditional(2)
    assert cond.tensors["prompt_embeds"].shape == (2, MSL, 16) and cond.tensors["prompt_attention_mask"].shape == (2, MSL)
    torch.testing.assert_close(cond.tensors["prompt_embeds"], pe, atol=1e-6, rtol=0)
    assert torch.equal(cond.tensors["prompt_attention_mask"], pm)
    torch.testing.assert_close(uncond.tensors["prompt_embeds"], npe, atol=1e-6, rtol=0)
    assert torch.equal(uncond.tensors["prompt_attention_mask"], npm)
    assert not torch.allclose(cond.tensors["prompt_embeds"][0], cond.tensors["prompt_embeds"][1])
    # lower-cased and stripped, as the pipeline's _text_preprocessing
    torch.testing.assert_close(adapter.encode_prompts(["A RED CAT"]).tensors["prompt_embeds"],
                               adapter.encode_prompts(["a red cat"]).tensors["prompt_embeds"])


# -------------------------------------------------------------------------------------------------
# rectified flow: the model call against SanaPipeline
# -------------------------------------------------------------------------------------------------
def test_one_step_stock_pipeline_equals_adapter_x0_at_t1(folders):
    adapter, transformer = load(folders["sana"])
    pipe = euler_pipeline(folders["sana"])
    w = 4.5
    x = latents(adapter, 2, seed=1)
    with torch.no_grad():
        out = pipe(PROMPTS, latents=x.clone(), height=RES, width=RES, sigmas=[1.0], guidance_scale=w,
                   output_type="latent", use_resolution_binning=False, max_sequence_length=MSL,
                   complex_human_instruction=None).images
        x0 = adapter.predict_x0(transformer, x, full(2, 1.0), adapter.encode_prompts(PROMPTS), Guidance(cfg=w))
    torch.testing.assert_close(x0, out, atol=2e-5, rtol=0)
    assert (out - x).abs().max() > 0.1


def test_two_step_stock_pipeline_equals_adapter_euler_with_shift(folders):
    adapter, transformer = load(folders["sana"])
    pipe = euler_pipeline(folders["sana"])
    w = 3.0
    x = latents(adapter, 2, seed=2)
    with torch.no_grad():
        out = pipe(PROMPTS, latents=x.clone(), height=RES, width=RES, sigmas=[1.0, 0.5], guidance_scale=w,
                   output_type="latent", use_resolution_binning=False, max_sequence_length=MSL,
                   complex_human_instruction=None).images
        sched, cond, g = adapter.schedule, adapter.encode_prompts(PROMPTS), Guidance(cfg=w)
        t0, t1 = sched.from_unit([1.0, 0.5])
        assert float(t1) == pytest.approx(0.75)                                  # shift 3
        x_a = sched.step(x, adapter.predict_x0(transformer, x, t0.expand(2), cond, g), t0, t1)
        x0 = adapter.predict_x0(transformer, x_a, t1.expand(2), cond, g)
    torch.testing.assert_close(x0, out, atol=5e-5, rtol=0)


def test_predict_passes_1000t_and_the_mask(folders):
    adapter, transformer = load(folders["sana"])
    cond, x = adapter.encode_prompts(PROMPTS), latents(adapter, 2, seed=3)
    seen = {}

    def hook(_m, args, kwargs):
        seen.update(kwargs)
    h = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            adapter.predict(transformer, x, torch.tensor([0.3, 0.8], dtype=torch.float64), cond)
    finally:
        h.remove()
    assert seen["timestep"].dtype == torch.float32
    torch.testing.assert_close(seen["timestep"], torch.tensor([300.0, 800.0]))
    assert torch.equal(seen["encoder_attention_mask"], cond.tensors["prompt_attention_mask"])
    assert "guidance" not in seen
    with pytest.raises(SenseflowError):          # no guidance embedding in SANA
        adapter.predict_x0(transformer, x, full(2, 0.5), cond, Guidance(embedded=4.5))


# -------------------------------------------------------------------------------------------------
# TrigFlow (SANA-Sprint): against SanaSprintPipeline and the mapping relations
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s", ["max", 1.0])
def test_sprint_one_step_pipeline_equals_adapter_x0(folders, s):
    """SCMScheduler, one step from angle s: its pred_original_sample / sigma_data == cos(s) x - sin(s) F."""
    adapter, transformer = load(folders["sprint"])
    pipe = SanaSprintPipeline.from_pretrained(folders["sprint"])
    x = latents(adapter, 2, seed=4)
    kw = {"intermediate_timesteps": None, "complex_human_instruction": None}
    if s != "max":          # (custom timesteps=[s, 0] are broken in diffusers 0.42's SanaSprintPipeline)
        kw["max_timesteps"] = s
    with torch.no_grad():
        out = pipe(PROMPTS, latents=x.clone(), height=RES, width=RES, num_inference_steps=1, guidance_scale=6.0,
                   output_type="latent", use_resolution_binning=False, max_sequence_length=MSL, **kw).images
        angle = pipe.scheduler.timesteps[0].item()
        x0 = adapter.predict_x0(transformer, x, full(2, angle), adapter.encode_prompts(PROMPTS),
                                Guidance(embedded=6.0))
    torch.testing.assert_close(x0, out, atol=2e-5, rtol=0)
    assert (out - x).abs().max() > 0.1


def test_trigflow_mapping_relations(folders):
    """x0 = cos(s) x - sin(s) F, and the same x0 as the flow model's x_t - t v at the mapped (x_t, t)."""
    adapter, transformer = load(folders["sprint"])
    cond, x = adapter.encode_prompts(PROMPTS), latents(adapter, 2, seed=5)
    s = torch.tensor([0.4, 1.2], dtype=torch.float64)
    seen = {}

    def hook(_m, args, kwargs):
        seen.update(kwargs)
        seen["x"] = args[0]
    h = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            F = adapter.predict(transformer, x, s, cond, torch.tensor([3.0, 3.0]))
            x0 = adapter.predict_x0(transformer, x, s, cond, Guidance(embedded=3.0))
    finally:
        h.remove()
    c, sn = torch.cos(s).float().view(2, 1, 1, 1), torch.sin(s).float().view(2, 1, 1, 1)
    torch.testing.assert_close(x0, c * x - sn * F, atol=1e-5, rtol=0)
    x_t, t = trigflow_to_flow(x, s)
    torch.testing.assert_close(seen["timestep"], t.float())                       # dense time: t, not 1000 t
    torch.testing.assert_close(seen["x"], x_t)
    torch.testing.assert_close(seen["guidance"], torch.tensor([0.3, 0.3]))        # g * guidance_embeds_scale
    with torch.no_grad():
        v = transformer(x_t, encoder_hidden_states=cond.tensors["prompt_embeds"],
                        encoder_attention_mask=cond.tensors["prompt_attention_mask"], timestep=t.float(),
                        guidance=torch.tensor([0.3, 0.3]), return_dict=False)[0]
    torch.testing.assert_close(x0, x_t - t.float().view(2, 1, 1, 1) * v, atol=1e-5, rtol=1e-5)
    back, s_back = flow_to_trigflow(x_t, t)
    torch.testing.assert_close(back, x) and torch.testing.assert_close(s_back, s)
    # the default embedded guidance is SanaSprintPipeline's 4.5
    with torch.no_grad():
        torch.testing.assert_close(adapter.predict_x0(transformer, x, s, cond),
                                   adapter.predict_x0(transformer, x, s, cond, Guidance(embedded=4.5)))
    assert abs(float(adapter.schedule.from_unit(1.0)) - math.pi / 2) < 1e-12


# -------------------------------------------------------------------------------------------------
# VAE, structure, registration
# -------------------------------------------------------------------------------------------------
def test_dc_vae_scaling(folders):
    adapter, _ = load(folders["sana"])
    vae = adapter.vae
    z = latents(adapter, 1, seed=6)
    with torch.no_grad():
        img = adapter.decode(z)
        torch.testing.assert_close(img, vae.decode(z / vae.config.scaling_factor, return_dict=False)[0])
        assert img.shape == (1, 3, RES, RES)
        torch.testing.assert_close(adapter.encode(img), vae.encode(img).latent * vae.config.scaling_factor)


def test_block_names_output_norm_and_registration(folders):
    adapter, transformer = load(folders["sana"])
    names = adapter.block_names(transformer)
    assert names == ["transformer_blocks.0", "transformer_blocks.1"]
    norm = adapter.output_norm_name(transformer)
    assert norm == "norm_out"
    with capture_outputs(transformer, names + [norm]) as feats, torch.no_grad():
        adapter.predict(transformer, latents(adapter, 2), full(2, 0.5), adapter.encode_prompts(PROMPTS))
    assert set(feats) == set(names + [norm])

    from senseflow.build import load_teacher
    from senseflow.config import validate

    config = validate({"paths": {"teacher": str(folders["sprint"])}, "teacher": {"family": "sana", "resolution": RES},
                       "method": {"name": "dmd2"}})
    loaded, _ = load_teacher(config, torch.device("cpu"))
    assert isinstance(loaded, SanaAdapter) and loaded.prediction == "trigflow"


def test_prompt_cache_without_text_encoder(folders):
    adapter, transformer = load(folders["sana"], load_text_encoders=False)
    full_adapter, _ = load(folders["sana"])
    with pytest.raises(SenseflowError):
        adapter.unconditional(1)
    adapter.set_unconditional(full_adapter.unconditional(1))
    cond, x, t = full_adapter.encode_prompts(PROMPTS), latents(adapter, 2), full(2, 0.6)
    with torch.no_grad():
        torch.testing.assert_close(adapter.predict_x0(transformer, x, t, cond, Guidance(cfg=3.0)),
                                   full_adapter.predict_x0(transformer, x, t, cond, Guidance(cfg=3.0)))


# -------------------------------------------------------------------------------------------------
# bad input: one-line SenseflowErrors
# -------------------------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bad_inputs(folders, tmp_path):
    sdxl = make_tiny_sdxl_folder(tmp_path / "sdxl")
    bad = _copy(folders["sana"], tmp_path / "bad")
    shutil.rmtree(bad / "transformer")
    shutil.copytree(sdxl.path / "unet", bad / "transformer")
    with pytest.raises(SenseflowError) as e:
        SanaAdapter.from_pretrained(bad, resolution=RES)
    msg = one_line_error(e)
    assert "UNet2DConditionModel" in msg and "SanaTransformer2DModel" in msg and "sdxl" in msg
    with pytest.raises(SenseflowError) as e:
        SanaAdapter.from_pretrained(sdxl.path, resolution=RES)
    assert "StableDiffusionXLPipeline" in one_line_error(e)

    bad = _copy(folders["sana"], tmp_path / "bad2")
    (bad / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(SenseflowError) as e:
        SanaAdapter.from_pretrained(bad, resolution=RES)
    assert "tokenizer" in one_line_error(e)

    folder = make_tiny_sana_folder(tmp_path / "caption", caption_channels=24).path
    with pytest.raises(SenseflowError) as e:
        SanaAdapter.from_pretrained(folder, resolution=RES)
    assert "caption_channels mismatch" in one_line_error(e)
    for kw in ({"resolution": 31}, {"resolution": RES, "prediction": "x0"}, {"resolution": RES, "max_sequence_length": 5000}):
        with pytest.raises(SenseflowError) as e:
            SanaAdapter.from_pretrained(folders["sana"], **kw)
        one_line_error(e)

    adapter, transformer = load(folders["sana"])
    with pytest.raises(SenseflowError) as e:
        adapter.predict(transformer, latents(adapter, 2), full(2, 0.5),
                        Conditioning({"prompt_embeds": torch.zeros(2, 5, 32)}))
    assert "(2, 5, 32)" in one_line_error(e)
