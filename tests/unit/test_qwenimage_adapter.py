"""Qwen-Image adapter on a tiny random folder of the real classes (tests/helpers/tiny_qwenimage.py).

The reference for every convention is the stock ``QwenImagePipeline`` loaded from the same folder:
prompt template + drop index + masked variable-length embeddings, 2x2 packing, ``t`` (not ``1000 t``),
velocity sign, the dynamic ``mu`` from the scheduler config, true CFG with the norm rescale, and the
VAE's 5-D latents with ``latents_mean`` / ``latents_std``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from diffusers import QwenImagePipeline  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

from senseflow.schedules import RectifiedFlow  # noqa: E402
from senseflow.teachers.base import Conditioning, Guidance, SenseflowError, capture_outputs  # noqa: E402
from senseflow.teachers.qwenimage import (  # noqa: E402
    DROP_IDX, PROMPT_TEMPLATE, QwenImageAdapter, pack_latents, unpack_latents)
from tests.helpers.adapter_checks import latents, one_line_error, ones  # noqa: E402
from tests.helpers.threads import single_thread  # noqa: E402,F401 (module-wide autouse: one thread)
from tests.helpers.tiny_models import make_tiny_flux_folder  # noqa: E402
from tests.helpers.tiny_qwenimage import TINY_QWENIMAGE_SCHEDULER, make_tiny_qwenimage_folder  # noqa: E402

diffusers_logging.disable_progress_bar()
diffusers_logging.set_verbosity_error()

RES = 32          # tiny VAE: 2 px per latent -> 16x16 latents -> 8x8 = 64 packed tokens
MSL = 16          # the adapter's padded text length (the pipeline's default is 512)
PROMPTS = ["a red cat", "a small blue dog on the square"]
#: calculate_shift(64, 16, 256, 0.5, 0.9), by hand: 0.5 + (0.4 / 240) * 48
MU = 0.5 + 0.4 / 240 * 48


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_tiny_qwenimage_folder(tmp_path_factory.mktemp("qwen") / "teacher").path


_loaded: dict = {}


def load(folder: Path, **kw):
    key = (str(folder), tuple(sorted(kw.items())))
    if key not in _loaded:
        kw.setdefault("resolution", RES)
        kw.setdefault("max_sequence_length", MSL)
        _loaded[key] = QwenImageAdapter.from_pretrained(folder, **kw)
    return _loaded[key]


_pipes: dict = {}


def pipeline(folder: Path) -> QwenImagePipeline:
    if str(folder) not in _pipes:
        _pipes[str(folder)] = QwenImagePipeline.from_pretrained(folder)
    return _pipes[str(folder)]


def stock(folder: Path, x: torch.Tensor, sigmas, cfg: float | None = None) -> torch.Tensor:
    """The stock pipeline from the packed latents ``x``, ``output_type="latent"``, unpacked."""
    kw = {"negative_prompt": " ", "true_cfg_scale": cfg} if cfg else {"true_cfg_scale": 1.0}
    with torch.no_grad():
        out = pipeline(folder)(PROMPTS, latents=pack_latents(x), height=RES, width=RES, sigmas=list(sigmas),
                               output_type="latent", max_sequence_length=MSL, **kw).images
    return unpack_latents(out, RES // 2, RES // 2)


# -------------------------------------------------------------------------------------------------
# loading, schedule, packing, prompts
# -------------------------------------------------------------------------------------------------
def test_loads_with_dynamic_mu_and_real_numbers(folder):
    adapter, transformer = load(folder)
    assert type(transformer).__name__ == "QwenImageTransformer2DModel"
    assert adapter.latent_shape() == (4, RES // 2, RES // 2) and adapter.image_seq_len == 64
    assert isinstance(adapter.schedule, RectifiedFlow) and adapter.schedule.prediction == "velocity"
    assert adapter.schedule.mu == pytest.approx(MU) and adapter.schedule.shift == 1.0
    assert adapter.guidance_kinds == frozenset({"cfg"})
    # Qwen-Image's released scheduler (256..8192 tokens, shift 0.5..0.9) at 1024 px = 4096 packed tokens
    real = QwenImageAdapter({"in_channels": 64, "out_channels": 16, "patch_size": 2, "joint_attention_dim": 3584},
                            resolution=1024, vae={"z_dim": 16, "temperal_downsample": [False, True, True],
                                                  "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16},
                            scheduler_config={"base_image_seq_len": 256, "max_image_seq_len": 8192,
                                              "base_shift": 0.5, "max_shift": 0.9})
    assert real.image_seq_len == 4096 and real.schedule.mu == pytest.approx(0.5 + 0.4 / 7936 * 3840)
    # Qwen-Image-Lightning's shift 3: unit 0.75 -> 3 * 0.75 / (1 + 2 * 0.75) = 0.9
    a = load(folder, shift=3.0, load_text_encoders=False)[0]
    assert a.schedule.mu is None and float(a.schedule.from_unit([0.75])[0]) == pytest.approx(0.9)


def test_pack_unpack_equal_the_pipeline_helpers():
    x = torch.randn(2, 4, 6, 10)
    packed = pack_latents(x)
    torch.testing.assert_close(packed, QwenImagePipeline._pack_latents(x.unsqueeze(2), 2, 4, 6, 10), rtol=0, atol=0)
    # the pipeline's unpack takes PIXEL sizes and the VAE factor, and keeps a frame axis
    torch.testing.assert_close(unpack_latents(packed, 6, 10),
                               QwenImagePipeline._unpack_latents(packed, 12, 20, 2)[:, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(packed, 6, 10), x, rtol=0, atol=0)


def test_template_prefix_is_the_drop_index(folder):
    """The tiny tokenizer splits the template like the real one: 34 tokens before the prompt."""
    adapter, _ = load(folder)
    tok = adapter.text_encoder.tokenizer
    ids = tok(PROMPT_TEMPLATE.format("a red cat")).input_ids
    assert DROP_IDX == 34
    assert tok.convert_ids_to_tokens(ids[DROP_IDX - 3:DROP_IDX + 3]) == \
        ["<|im_start|>", "user", "\u010a", "a", "\u0120red", "\u0120cat"]


def test_encode_prompts_equals_pipeline_encode_prompt(folder):
    adapter, _ = load(folder)
    pe, mask = pipeline(folder).encode_prompt(PROMPTS, device="cpu", max_sequence_length=MSL)
    cond = adapter.encode_prompts(PROMPTS)
    ours, our_mask = cond.tensors["prompt_embeds"], cond.tensors["prompt_embeds_mask"]
    # "a red cat" -> a, Ġred, Ġcat + <|im_end|> \n <|im_start|> assistant \n = 8 tokens; the other 12
    assert mask.tolist() == [[1] * 8 + [0] * 4, [1] * 12]
    assert ours.shape == (2, MSL, 32) and our_mask.tolist() == [[1] * 8 + [0] * 8, [1] * 12 + [0] * 4]
    torch.testing.assert_close(ours[:, :12], pe.detach(), atol=1e-6, rtol=0)
    assert ours[:, 12:].abs().max() == 0 and not ours.requires_grad
    # truncation at max_sequence_length, as encode_prompt's [:, :max_sequence_length]
    short = load(folder, max_sequence_length=10)[0].encode_prompts(PROMPTS)
    torch.testing.assert_close(short.tensors["prompt_embeds"], ours[:, :10], atol=1e-6, rtol=0)
    assert short.tensors["prompt_embeds_mask"].tolist() == [[1] * 8 + [0] * 2, [1] * 10]


# -------------------------------------------------------------------------------------------------
# the model call against the stock pipeline
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [None, 4.0])
def test_one_step_stock_pipeline_equals_adapter_x0(folder, cfg):
    """sigmas=[1]: one Euler step from 1 to 0 IS the x0 prediction (with true CFG + norm rescale when cfg)."""
    adapter, transformer = load(folder)
    x = latents(adapter, 2, seed=3)
    ref = stock(folder, x, [1.0], cfg)
    with torch.no_grad():
        x0 = adapter.predict_x0(transformer, x, ones(2), adapter.encode_prompts(PROMPTS),
                                Guidance(cfg=cfg) if cfg else None)
    torch.testing.assert_close(x0, ref, atol=2e-5, rtol=0)
    assert (x0 - x).abs().max() > 0.1


def test_norm_rescaled_cfg_by_hand(folder):
    """The CFG combination written out: v_n + s (v_c - v_n), rescaled per packed token to ||v_c||."""
    adapter, transformer = load(folder)
    x, t = latents(adapter, 2, seed=4), ones(2, 0.6)
    cond = adapter.encode_prompts(PROMPTS)
    with torch.no_grad():
        v_c = adapter.predict(transformer, x, t, cond)
        v_n = adapter.predict(transformer, x, t, adapter.unconditional(2))
        got = adapter.predict_native(transformer, x, t, cond, Guidance(cfg=torch.tensor([2.0, 5.0])))
    s = torch.tensor([2.0, 5.0]).view(2, 1, 1, 1)
    comb = pack_latents(v_n + s * (v_c - v_n))
    want = comb * pack_latents(v_c).norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(got, unpack_latents(want, 16, 16), atol=1e-5, rtol=0)   # batched vs single forwards
    torch.testing.assert_close(pack_latents(got).norm(dim=-1), pack_latents(v_c).norm(dim=-1), atol=1e-5, rtol=0)
    plain = QwenImageAdapter.from_pretrained(folder, resolution=RES, max_sequence_length=MSL, cfg_renorm=False)[0]
    with torch.no_grad():
        lin = plain.predict_native(transformer, x, t, cond, Guidance(cfg=torch.tensor([2.0, 5.0])))
    torch.testing.assert_close(lin, v_n + s * (v_c - v_n), atol=1e-5, rtol=0)


def test_two_step_stock_pipeline_equals_adapter_euler_with_mu_shift(folder):
    adapter, transformer = load(folder)
    x = latents(adapter, 2, seed=5)
    ref = stock(folder, x, [1.0, 0.5], 4.0)
    t0, t1 = adapter.schedule.from_unit([1.0, 0.5])
    assert float(t1) == pytest.approx(math.exp(MU) / (math.exp(MU) + 1.0))        # e^mu / (e^mu + 1/u - 1)
    assert pipeline(folder).scheduler.sigmas[1].item() == pytest.approx(float(t1), abs=1e-6)
    cond, g = adapter.encode_prompts(PROMPTS), Guidance(cfg=4.0)
    with torch.no_grad():
        x_a = adapter.schedule.step(x, adapter.predict_x0(transformer, x, t0.expand(2), cond, g), t0, t1)
        x0 = adapter.predict_x0(transformer, x_a, t1.expand(2), cond, g)
    torch.testing.assert_close(x0, ref, atol=5e-5, rtol=0)


def test_padding_and_batch_do_not_change_the_prediction(folder):
    """One prompt alone (no mask, as the pipeline for one prompt) == the same prompt padded in a batch."""
    adapter, transformer = load(folder)
    x, t = latents(adapter, 2, seed=6), ones(2, 0.7)
    cond = adapter.encode_prompts(PROMPTS)
    with torch.no_grad():
        both = adapter.predict(transformer, x, t, cond)
        alone = adapter.predict(transformer, x[:1], t[:1], Conditioning(
            {"prompt_embeds": cond.tensors["prompt_embeds"][:1, :8]}))
    torch.testing.assert_close(both[:1], alone, atol=1e-5, rtol=0)


def test_predict_passes_t_in_float32_and_img_shapes(folder):
    adapter, transformer = load(folder)
    seen = {}
    h = transformer.register_forward_pre_hook(lambda _m, _a, kw: seen.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            adapter.predict(transformer, latents(adapter, 2), torch.tensor([0.3, 0.8], dtype=torch.float64),
                            adapter.encode_prompts(PROMPTS))
    finally:
        h.remove()
    assert seen["timestep"].dtype == torch.float32
    torch.testing.assert_close(seen["timestep"], torch.tensor([0.3, 0.8]))        # t, not 1000 t
    assert seen["hidden_states"].shape == (2, 64, 16) and seen["img_shapes"] == [[(1, 8, 8)]] * 2
    assert seen["encoder_hidden_states"].shape == (2, 12, 32)                     # cut to the longest prompt
    assert seen["encoder_hidden_states_mask"].tolist() == [[1] * 8 + [0] * 4, [1] * 12]


# -------------------------------------------------------------------------------------------------
# VAE, structure, registration
# -------------------------------------------------------------------------------------------------
def test_vae_latent_statistics_and_frame_axis(folder):
    adapter, _ = load(folder)
    vae = adapter.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
    z = latents(adapter, 1, seed=8)
    with torch.no_grad():
        img = adapter.decode(z)
        ref = vae.decode(z.unsqueeze(2) * std + mean, return_dict=False)[0][:, :, 0]
        torch.testing.assert_close(img, ref, atol=1e-5, rtol=0)
        assert img.shape == (1, 3, RES, RES)
        enc = adapter.encode(img, sample=False)
        want = ((vae.encode(img.unsqueeze(2)).latent_dist.mode() - mean) / std)[:, :, 0]
        torch.testing.assert_close(enc, want, atol=1e-5, rtol=0)


def test_block_names_output_norm_and_tap(folder):
    adapter, transformer = load(folder)
    names = adapter.block_names(transformer)
    assert names == ["transformer_blocks.0", "transformer_blocks.1"]
    assert adapter.output_norm_name(transformer) == "norm_out"
    tap = adapter.feature_tap(transformer)
    assert (tap.name, tap.channels, tap.size, tap.index) == ("transformer_blocks.1", 32, (8, 8), 1)
    with capture_outputs(transformer, names + ["norm_out"]) as feats, torch.no_grad():
        adapter.predict(transformer, latents(adapter, 2), ones(2, 0.5), adapter.encode_prompts(PROMPTS))
    assert feats["norm_out"].shape == (2, 64, 32)


def test_registered_family_and_lora_targets(folder):
    from senseflow.build import build_models
    from senseflow.config import validate
    from senseflow.lora import resolve_targets
    from senseflow.teachers import registry

    fam = registry.get("qwenimage")
    assert fam.pipeline_class == "QwenImagePipeline" and registry.family_of_pipeline("QwenImagePipeline") == "qwenimage"
    assert registry.family_of_pipeline("QwenImageEditPipeline") is None      # edit folders are not text-to-image
    config = validate({"paths": {"teacher": str(folder)}, "teacher": {"family": "qwenimage", "resolution": RES,
                                                                      "options": {"max_sequence_length": MSL}},
                       "method": {"name": "dmd2", "real_guidance": {"cfg": 4.0}}})
    models = build_models(config, torch.device("cpu"))
    assert isinstance(models.teacher.adapter, QwenImageAdapter)
    assert [round(float(a), 5) for a in models.generator.anchors] == \
        [round(float(a), 5) for a in RectifiedFlow(mu=MU).from_unit([1.0, 0.75, 0.5, 0.25])]
    targets = resolve_targets(models.teacher.backbone)
    assert sorted(targets) == ["to_k", "to_out.0", "to_q", "to_v"]    # diffusers' Qwen-Image LoRA script default
    hit = [n for n, m in models.teacher.backbone.named_modules()
           if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in targets)]
    assert len(hit) == 2 * 4 and all(".attn." in n for n in hit)     # the image-stream projections of 2 blocks


# -------------------------------------------------------------------------------------------------
# bad input: one-line SenseflowErrors
# -------------------------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_wrong_class_and_wrong_pipeline(folder, tmp_path):
    bad = _copy(folder, tmp_path / "bad")
    shutil.rmtree(bad / "transformer")
    flux = make_tiny_flux_folder(tmp_path / "flux")
    shutil.copytree(flux.path / "transformer", bad / "transformer")
    with pytest.raises(SenseflowError) as e:
        QwenImageAdapter.from_pretrained(bad, resolution=RES)
    msg = one_line_error(e)
    assert "FluxTransformer2DModel" in msg and "QwenImageTransformer2DModel" in msg and "flux" in msg
    with pytest.raises(SenseflowError) as e:
        QwenImageAdapter.from_pretrained(flux.path, resolution=RES)
    assert "FluxPipeline" in one_line_error(e)


@pytest.mark.parametrize("how", ["files", "folder"])
def test_missing_tokenizer(folder, tmp_path, how):
    bad = _copy(folder, tmp_path / "bad")
    if how == "files":
        for f in ("tokenizer.json", "vocab.json", "merges.txt"):
            (bad / "tokenizer" / f).unlink(missing_ok=True)
    else:
        shutil.rmtree(bad / "tokenizer")
    with pytest.raises(SenseflowError) as e:
        QwenImageAdapter.from_pretrained(bad, resolution=RES, max_sequence_length=MSL)
    assert "tokenizer" in one_line_error(e)
    QwenImageAdapter.from_pretrained(bad, resolution=RES, load_text_encoders=False)      # a prompt cache needs none


def test_dimension_mismatches_and_variants(tmp_path):
    cases = [({"joint_attention_dim": 24}, "joint_attention_dim mismatch"),
             ({"in_channels": 32}, "patch_size=2"),
             ({"zero_cond_t": True}, "zero_cond_t=True")]
    for i, (kw, needle) in enumerate(cases):
        path = make_tiny_qwenimage_folder(tmp_path / f"f{i}", **kw).path
        with pytest.raises(SenseflowError) as e:
            QwenImageAdapter.from_pretrained(path, resolution=RES, max_sequence_length=MSL)
        assert needle in one_line_error(e)


def test_other_bad_inputs(folder, tmp_path):
    for kw in ({"resolution": 30}, {"resolution": RES, "max_sequence_length": 2000}):
        with pytest.raises(SenseflowError) as e:
            QwenImageAdapter.from_pretrained(folder, **kw)
        one_line_error(e)
    bad = _copy(folder, tmp_path / "bad")
    vae = json.loads((bad / "vae" / "config.json").read_text())
    vae["z_dim"] = 8
    (bad / "vae" / "config.json").write_text(json.dumps(vae))
    with pytest.raises(SenseflowError) as e:
        QwenImageAdapter.from_pretrained(bad, resolution=RES, load_text_encoders=False)
    assert "z_dim=8" in one_line_error(e)
    adapter, transformer = load(folder)
    x = latents(adapter, 2)
    with pytest.raises(SenseflowError) as e:       # a prompt cache from another model
        adapter.predict(transformer, x, ones(2), Conditioning({"prompt_embeds": torch.zeros(2, 5, 48)}))
    assert "(2, 5, 48)" in one_line_error(e)
    with pytest.raises(SenseflowError) as e:       # packed latents by mistake
        adapter.predict(transformer, pack_latents(x), ones(2), adapter.encode_prompts(PROMPTS))
    assert "unpacked" in one_line_error(e)
    with pytest.raises(SenseflowError) as e:
        adapter.predict_x0(transformer, x, ones(2), adapter.encode_prompts(PROMPTS), Guidance(embedded=3.5))
    assert "no guidance embedding" in one_line_error(e)


def test_released_shift_terminal_only_stretches_the_stock_sigmas(tmp_path):
    """The released scheduler's shift_terminal 0.02: the stock 2-step sigmas end at 0.02, the time law is unchanged."""
    path = make_tiny_qwenimage_folder(tmp_path / "t", scheduler={**TINY_QWENIMAGE_SCHEDULER, "shift_terminal": 0.02}).path
    adapter = QwenImageAdapter.from_pretrained(path, resolution=RES, load_text_encoders=False)[0]
    assert adapter.schedule.mu == pytest.approx(MU)
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(str(path / "scheduler"))
    sched.set_timesteps(sigmas=[1.0, 0.5], mu=MU)
    assert sched.sigmas[:2].tolist() == pytest.approx([1.0, 0.02])


def test_real_shape_preset_parameter_count_on_meta():
    """qwen-image preset: 60 blocks x (36 D^2 + 30 D + 4 x 128 qk-norm weights) + embedders / norm_out / proj_out,
    D = 24 x 128 = 3072, counted by hand from the block's layers (Linear weights + biases)."""
    from senseflow.bench.presets import count_parameters, get_preset

    d = 3072
    block = 2 * (6 * d * d + 6 * d) + 8 * (d * d + d) + 4 * 128 + 2 * (d * 4 * d + 4 * d + 4 * d * d + d)
    outer = (64 * d + d) + (3584 * d + d) + 3584 + (256 * d + d) + (d * d + d) + (2 * d * d + 2 * d) + (d * 64 + 64)
    preset = get_preset("qwen-image")
    net = preset.build_backbone("meta")
    assert count_parameters(net) == 60 * block + outer == 20_430_401_088
    assert preset.make_adapter(1024).image_seq_len == 4096
    assert preset.make_adapter(1024).schedule.mu == pytest.approx(0.5 + 0.4 / 7936 * 3840)


def test_prompt_cache_stores_the_negative_prompt_and_refuses_another(folder, tmp_path):
    """The cache's unconditional entry is the encoded negative prompt; a run with another one is refused."""
    from senseflow.config import validate
    from senseflow.data.cache import build_cache, open_cache

    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")

    def config(neg: str):
        return validate({"paths": {"teacher": str(folder), "prompts": str(tmp_path / "p.txt")},
                         "teacher": {"family": "qwenimage", "resolution": RES,
                                     "options": {"max_sequence_length": MSL, "negative_prompt": neg}},
                         "method": {"name": "dmd2", "real_guidance": {"cfg": 4.0}}})

    cache = open_cache(build_cache(config(" "), tmp_path / "cache", batch_size=2, progress=False,
                                   log=lambda *a, **k: None))
    adapter, _ = load(folder)
    uncond = cache.unconditional()
    torch.testing.assert_close(uncond.tensors["prompt_embeds"], adapter.unconditional(1).tensors["prompt_embeds"])
    # " " -> Ġ <|im_end|> \n <|im_start|> assistant \n after the 34 dropped template tokens: 6 valid tokens
    assert uncond.tensors["prompt_embeds_mask"].tolist() == [[1] * 6 + [0] * (MSL - 6)]
    cache.check_compatible(config(" "))
    with pytest.raises(SenseflowError) as e:
        cache.check_compatible(config("blurry"))
    assert "negative_prompt" in one_line_error(e)
