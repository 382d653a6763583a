"""True CFG on top of FLUX's guidance embedding (the released SiD-DiT FLUX loop).

Reference: apple-aiml-research/ml-sid-dit ``training/sid_dit_flux_util.py::sid_dit_denoise``: the
uncond branch is ``encode_prompt([""] * batch)``, both branches get ``guidance = guidance_scale``
through the embedding, and ``flow = flow_uncond + s * (flow_text - flow_uncond)``.  The expected
values below come from two raw ``FluxTransformer2DModel`` calls set up with the stock
``FluxPipeline``'s own helpers (``encode_prompt``, ``_pack_latents``, ``_prepare_latent_image_ids``).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import FluxPipeline  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

from senseflow.config import load_config  # noqa: E402
from senseflow.methods import SiDConfig  # noqa: E402
from senseflow.rng import RandomStreams  # noqa: E402
from senseflow.teachers.base import Guidance, SenseflowError  # noqa: E402
from senseflow.teachers.flux import FluxAdapter  # noqa: E402
from tests.helpers.tiny_models import make_tiny_flux_folder  # noqa: E402

diffusers_logging.disable_progress_bar()

RES, MSL = 32, 8
PROMPTS = ["a red cat", "a small blue dog on the square"]


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    return make_tiny_flux_folder(tmp_path_factory.mktemp("flux") / "dev").path


def _raw_velocity(pipe, x, t, prompts, g):
    """One transformer call the way the released loop makes it (guidance = g through the embedding)."""
    with torch.no_grad():
        pe, pooled, text_ids = pipe.encode_prompt(prompts, None, max_sequence_length=MSL)
        b, c, h, w = x.shape
        out = pipe.transformer(hidden_states=FluxPipeline._pack_latents(x, b, c, h, w), timestep=t,
                               guidance=torch.full((b,), g), pooled_projections=pooled, encoder_hidden_states=pe,
                               txt_ids=text_ids, img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2,
                                                                                                "cpu", x.dtype),
                               return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, h * 2, w * 2, 2)   # pixel sizes, tiny VAE factor 2


def test_true_cfg_is_uncond_plus_s_times_cond_minus_uncond(dev):
    adapter, transformer = FluxAdapter.from_pretrained(dev, resolution=RES, max_sequence_length=MSL, true_cfg=True)
    pipe = FluxPipeline.from_pretrained(dev)
    x = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(5))
    t, s, g = torch.tensor([0.7, 0.4]), 4.5, 4.5
    v_c = _raw_velocity(pipe, x, t, PROMPTS, g)
    v_u = _raw_velocity(pipe, x, t, ["", ""], g)
    assert not torch.allclose(v_c, v_u)
    v = v_u + s * (v_c - v_u)
    want = x - t.view(-1, 1, 1, 1) * v                        # x0 = x_t - t v (rectified flow)
    with torch.no_grad():
        got = adapter.predict_x0(transformer, x, t.double(), adapter.encode_prompts(PROMPTS),
                                 Guidance(cfg=s, embedded=g))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # s = 1: one conditional call (no uncond branch)
    with torch.no_grad():
        one = adapter.predict_x0(transformer, x, t.double(), adapter.encode_prompts(PROMPTS),
                                 Guidance(cfg=1.0, embedded=g))
    torch.testing.assert_close(one, x - t.view(-1, 1, 1, 1) * v_c, rtol=1e-4, atol=1e-5)


def test_sid_guidance_spec_reaches_the_teacher_as_cfg_plus_embedding():
    spec = SiDConfig(teacher_guidance={"cfg": 4.5, "embedded": 4.5}).teacher_guidance
    g = spec.sample(RandomStreams(0))
    assert (g.cfg, g.embedded, g.uses_cfg) == (4.5, 4.5, True)


def test_cfg_needs_the_switch_and_an_empty_prompt(dev):
    plain, transformer = FluxAdapter.from_pretrained(dev, resolution=RES, max_sequence_length=MSL)
    x = torch.randn(2, *plain.latent_shape())
    with pytest.raises(SenseflowError, match="no unconditional branch") as e:
        plain.predict_x0(transformer, x, torch.full((2,), 0.5, dtype=torch.float64), plain.encode_prompts(PROMPTS),
                         Guidance(cfg=4.5, embedded=4.5))
    assert "\n" not in str(e.value)
    with pytest.raises(SenseflowError, match="teacher.options.true_cfg: true"):
        plain.unconditional(2)
    # a cache-fed adapter (no text encoders) needs the cached empty prompt
    full, _ = FluxAdapter.from_pretrained(dev, resolution=RES, max_sequence_length=MSL, true_cfg=True)
    bare, _ = FluxAdapter.from_pretrained(dev, resolution=RES, max_sequence_length=MSL, true_cfg=True,
                                          load_text_encoders=False)
    with pytest.raises(SenseflowError, match="rebuild the prompt cache") as e:
        bare.unconditional(2)
    assert "\n" not in str(e.value)
    bare.set_unconditional(full.unconditional(1))
    for k, v in full.unconditional(2).tensors.items():
        torch.testing.assert_close(bare.unconditional(2).tensors[k], v)
    # releasing the encoders keeps the empty prompt
    full.release_text_encoders()
    assert full.unconditional(1).tensors["prompt_embeds"].shape == (1, MSL, 32)


def test_cache_stores_the_flux_empty_prompt_only_with_true_cfg(dev, tmp_path):
    from senseflow.data.cache import build_cache, open_cache

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na dog\n")

    def cfg(options):
        return load_config("configs/flux/sid.yaml", [
            f"paths.teacher={dev}", f"paths.prompts={prompts}", f"paths.output={tmp_path / 'run'}",
            "teacher.resolution=32", "teacher.dtype=float32", f"teacher.options={options}"], check_paths=False)

    with_cfg = cfg({"fake_guidance_embed": True, "true_cfg": True, "max_sequence_length": MSL})
    path = build_cache(with_cfg, tmp_path / "cache_cfg")
    assert open_cache(path).unconditional().tensors["prompt_embeds"].shape == (1, MSL, 32)
    without = cfg({"max_sequence_length": MSL})
    path = build_cache(without, tmp_path / "cache_plain")
    with pytest.raises(SenseflowError, match="holds no unconditional embedding") as e:
        open_cache(path).unconditional()
    assert "\n" not in str(e.value)


def test_flux_sid_recipe_matches_the_released_loop():
    cfg = load_config("configs/flux/sid.yaml", check_paths=False)
    m = cfg.method
    for spec in (m.teacher_guidance, m.fake_guidance, m.fake_train_guidance):   # cfg_eval_real/_fake, cfg_train_fake
        assert (spec.cfg, spec.embedded) == (4.5, 4.5)
    opts = cfg.teacher.options
    assert opts["true_cfg"] and opts["fake_guidance_embed"] and opts["student_guidance_embed"]
    assert opts["default_embedded_guidance"] == 1.0   # sid_dit_generate's default guidance_scale for G
    assert (m.weighting, m.rollout_noise) == ("one_minus_t", "fresh")


def test_sid_on_flux_runs_teacher_and_fake_with_cfg_on_the_embedding(dev):
    """The recipe's networks (full copies with the guidance embedding) and guidance, on the tiny FLUX."""
    from senseflow.generator import FewStepGenerator
    from senseflow.methods import DistillationModels, SiD
    from senseflow.methods.base import Batch
    from senseflow.schedules import anchors
    from senseflow.teachers.base import Denoiser, freeze

    adapter, transformer = FluxAdapter.from_pretrained(dev, resolution=RES, max_sequence_length=MSL, true_cfg=True,
                                                       fake_guidance_embed=True, student_guidance_embed=True,
                                                       default_embedded_guidance=1.0)
    teacher = Denoiser(freeze(transformer), adapter)
    gen = FewStepGenerator(Denoiser(adapter.make_student(transformer).requires_grad_(True), adapter),
                           anchors(adapter.schedule, [1.0, 0.5]))
    fake = Denoiser(adapter.make_fake_score(transformer).requires_grad_(True), adapter)
    cfg = load_config("configs/flux/sid.yaml", check_paths=False).method
    method = SiD(DistillationModels(teacher=teacher, generator=gen, fake_score=fake), cfg)
    seen = {}

    def spy(name):
        def hook(_m, args, kwargs):
            seen.setdefault(name, []).append((kwargs["hidden_states"].shape[0], kwargs["guidance"].tolist()))
        return hook

    handles = [net.register_forward_pre_hook(spy(name), with_kwargs=True)
               for name, net in (("teacher", teacher.backbone), ("fake", fake.backbone), ("gen", gen.denoiser.backbone))]
    batch = Batch(PROMPTS, adapter.encode_prompts(PROMPTS))
    out = method.loss("generator", batch, RandomStreams(0))
    for h in handles:
        h.remove()
    assert torch.isfinite(out.loss)
    assert seen["teacher"] == [(4, [4.5] * 4)] and seen["fake"] == [(4, [4.5] * 4)]   # [cond; uncond], g = 4.5
    assert all(n == 2 and g == [1.0, 1.0] for n, g in seen["gen"])                    # G: guidance 1, no CFG
