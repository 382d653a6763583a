"""The FLUX.2 adapter (dev and klein) against the stock ``Flux2Pipeline`` / ``Flux2KleinPipeline`` on tiny folders.

Every reference value is computed by diffusers' own pipeline code (``encode_prompt``, ``__call__``
with ``latents=``, ``scheduler.sigmas``) or written out from the pipeline's formulas in this file.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from diffusers.utils import logging as diffusers_logging  # noqa: E402

from senseflow.schedules import anchors as unit_to_native  # noqa: E402
from senseflow.teachers import registry  # noqa: E402
from senseflow.teachers.base import Conditioning, Guidance, SenseflowError  # noqa: E402
from senseflow.teachers.flux2 import Flux2Adapter  # noqa: E402
from tests.helpers.threads import single_thread  # noqa: E402,F401 (module-wide autouse: one thread)
from tests.helpers.tiny_flux2 import make_tiny_flux2_folder  # noqa: E402

diffusers_logging.disable_progress_bar()
diffusers_logging.set_verbosity_error()

RES = 32
MSL = 32
PROMPTS = ["a red cat", "a small blue dog on the square"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2")
    return {v: make_tiny_flux2_folder(root / v, v) for v in ("dev", "klein")}


def _stock(tiny):
    """The stock pipeline from the folder's in-memory components (dev: with the plain tokenizer)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline

    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(str(tiny.path / "scheduler"))
    cls = Flux2Pipeline if tiny.variant == "dev" else Flux2KleinPipeline
    return cls(scheduler=sched, vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer,
               transformer=tiny.transformer)


def _load(tiny, **kw):
    return Flux2Adapter.from_pretrained(tiny.path, resolution=RES, max_sequence_length=MSL, **kw)


def test_the_registry_claims_both_flux2_pipelines_and_leaves_flux1_alone():
    assert registry.family_of_pipeline("Flux2KleinPipeline") == "flux2"
    assert registry.family_of_pipeline("Flux2Pipeline") == "flux2"
    assert registry.family_of_pipeline("FluxPipeline") == "flux"
    assert registry.family_of_backbone_class("Flux2Transformer2DModel").name == "flux2"
    assert registry.get("flux2").noise.stream == "global"


@pytest.mark.parametrize("variant", ["dev", "klein"])
def test_prompt_encoding_equals_the_pipelines_encode_prompt(folders, variant):
    tiny = folders[variant]
    adapter, _ = _load(tiny)
    ours = adapter.encode_prompts(PROMPTS).tensors["prompt_embeds"]
    ref, ids = _stock(tiny).encode_prompt(prompt=PROMPTS, device="cpu", max_sequence_length=MSL)
    assert ours.shape == ref.shape == (2, MSL, 3 * 8)
    assert torch.equal(ours, ref)
    assert not torch.allclose(ours[0], ours[1])         # the prompt reaches the embedding
    assert ids[0, :, 3].tolist() == list(range(MSL))    # text position ids (0, 0, 0, k)


def test_dev_folder_with_a_pixtral_processor_loads_through_its_tokenizer_files(tmp_path, folders):
    from diffusers import DiffusionPipeline

    tiny = make_tiny_flux2_folder(tmp_path / "devp", "dev", processor=True)
    with pytest.raises(Exception):      # the stock loader needs torchvision for the PixtralProcessor
        DiffusionPipeline.from_pretrained(str(tiny.path))
    adapter, _ = _load(tiny)
    ref, _ = _stock(tiny).encode_prompt(prompt=PROMPTS, device="cpu", max_sequence_length=MSL)
    assert torch.equal(adapter.encode_prompts(PROMPTS).tensors["prompt_embeds"], ref)


def test_schedule_is_the_pipelines_empirical_mu_exponential_shift(folders):
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    tiny = folders["dev"]
    pipe = _stock(tiny)
    pipe(prompt=PROMPTS[0], height=RES, width=RES, num_inference_steps=3, max_sequence_length=MSL,
         output_type="latent")
    adapter, _ = _load(tiny, mu_steps=3)
    mu = compute_empirical_mu(image_seq_len=(RES // 4) ** 2, num_steps=3)
    # the pipeline's sigmas: linspace(1, 1/3, 3) shifted exp(mu) / (exp(mu) + 1/s - 1), then the terminal 0
    hand = [math.exp(mu) / (math.exp(mu) + 1 / s - 1) for s in (1.0, 2 / 3, 1 / 3)]
    assert pipe.scheduler.sigmas.tolist()[:3] == pytest.approx(hand, abs=1e-6)
    assert [float(a) for a in unit_to_native(adapter.schedule, [1.0, 2 / 3, 1 / 3])] == pytest.approx(hand, abs=1e-6)
    # the default law: mu for the pipelines' 50 steps; at 1024 px (4096 tokens) that is mu = 2.02
    real_vae = {"latent_channels": 4, "block_out_channels": [1, 1, 1, 1], "patch_size": [2, 2]}   # factor 8
    assert Flux2Adapter(tiny.transformer, resolution=1024, vae=real_vae,
                        scheduler_config=dict(pipe.scheduler.config)).schedule.mu == pytest.approx(2.0233, abs=1e-4)


def _noise(adapter, n, seed=3):
    return torch.randn((n, *adapter.latent_shape()), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant,guidance", [("dev", 2.5), ("klein", 3.0)])
def test_one_and_two_step_pipeline_runs_equal_the_adapters_x0_and_euler_steps(folders, variant, guidance):
    from senseflow.teachers.flux2 import to_tokens, unpatchify

    tiny = folders[variant]
    adapter, backbone = _load(tiny)
    cond = adapter.encode_prompts(PROMPTS[:1])
    g = Guidance(embedded=guidance) if variant == "dev" else Guidance(cfg=guidance)
    x = _noise(adapter, 1)
    pipe = _stock(tiny)
    call = dict(prompt=PROMPTS[0], height=RES, width=RES, guidance_scale=guidance, max_sequence_length=MSL,
                latents=x.clone(), output_type="latent")

    def to_pipeline_latent(z):   # dev returns the packed tokens, klein the denormalised VAE latent
        if variant == "dev":
            return to_tokens(z)
        mean, std = adapter._bn_stats(z)
        return unpatchify(z * std + mean)

    with torch.no_grad():
        one = pipe(num_inference_steps=1, **call).images
        x0 = adapter.predict_x0(backbone, x, torch.tensor([1.0], dtype=torch.float64), cond, g)
        assert (one - to_pipeline_latent(x0)).abs().max().item() < 1e-5
        two = pipe(num_inference_steps=2, **call).images
        s0, s1 = (float(s) for s in pipe.scheduler.sigmas[:2])
        v0 = adapter.predict_native(backbone, x, torch.tensor([s0], dtype=torch.float64), cond, g)
        x1 = x + (s1 - s0) * v0
        v1 = adapter.predict_native(backbone, x1, torch.tensor([s1], dtype=torch.float64), cond, g)
        x2 = x1 + (0.0 - s1) * v1
        assert (two - to_pipeline_latent(x2)).abs().max().item() < 1e-5
        assert (two - one).abs().max().item() > 1e-3       # the second step matters
        if variant == "klein":     # decoded: the adapter's decode is the pipeline's (images in [0, 1])
            img = pipe(num_inference_steps=1, **{**call, "output_type": "pt"}).images
            ours = (adapter.decode(x0) / 2 + 0.5).clamp(0, 1)
            assert (img - ours).abs().max().item() < 1e-5


def test_encode_inverts_decode_layout_and_normalises_with_the_vae_batch_norm(folders):
    from senseflow.teachers.flux2 import patchify, unpatchify

    tiny = folders["klein"]
    adapter, _ = _load(tiny, load_text_encoders=False)
    z = torch.randn(2, 4, 8, 8)
    p = patchify(z)
    assert p.shape == (2, 16, 4, 4)
    # channel c*4 + 2*di + dj of patch (i, j) is z[c, 2i + di, 2j + dj] (Flux2Pipeline._patchify_latents)
    assert p[1, 3 * 4 + 2 * 1 + 0, 2, 3] == z[1, 3, 5, 6]
    assert torch.equal(unpatchify(p), z)
    img = torch.rand(1, 3, RES, RES) * 2 - 1
    with torch.no_grad():
        lat = adapter.encode(img)
        mode = tiny.vae.encode(img).latent_dist.mode()
    bn = tiny.vae.bn
    hand = (patchify(mode) - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + 1e-4)
    assert torch.allclose(lat, hand, atol=1e-6)


def test_guidance_rules_per_variant(folders):
    dev, dev_backbone = _load(folders["dev"], load_text_encoders=False)
    student = dev.make_student(dev_backbone)
    assert student.config.guidance_embeds is False
    assert not any("guidance_embedder" in k for k in student.state_dict())
    assert dev.guidance_kinds == {"embedded"}
    with pytest.raises(SenseflowError, match="guidance-distilled"):
        dev.unconditional(1)
    klein, kb = _load(folders["klein"], load_text_encoders=False)
    assert klein.guidance_kinds == {"cfg"}
    x = _noise(klein, 1)
    cond = Conditioning({"prompt_embeds": torch.zeros(1, 4, 24)})
    with pytest.raises(SenseflowError, match="no guidance embedding"):
        klein.predict_native(kb, x, torch.tensor([0.5], dtype=torch.float64), cond, Guidance(embedded=2.0))


def test_distilled_klein_refuses_cfg(tmp_path):
    tiny = make_tiny_flux2_folder(tmp_path / "k", "klein", is_distilled=True)
    adapter, _ = _load(tiny, load_text_encoders=False)
    with pytest.raises(SenseflowError, match="step-distilled"):
        adapter.unconditional(1)


def _one_line(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg


def test_bad_folders_fail_with_one_line(tmp_path, folders):
    # the transformer of another class
    wrong = make_tiny_flux2_folder(tmp_path / "wrong", "klein")
    cfg = json.loads((wrong.path / "transformer" / "config.json").read_text())
    cfg["_class_name"] = "FluxTransformer2DModel"
    (wrong.path / "transformer" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SenseflowError) as e:
        _load(wrong)
    _one_line(e, "FluxTransformer2DModel", "Flux2Transformer2DModel")
    # no tokenizer
    notok = make_tiny_flux2_folder(tmp_path / "notok", "klein", with_tokenizer=False)
    with pytest.raises(SenseflowError) as e:
        _load(notok)
    _one_line(e, "tokenizer")
    # the text encoder does not fit the transformer (3 x 8 stacked features vs 30)
    dims = make_tiny_flux2_folder(tmp_path / "dims", "dev", joint_attention_dim=30)
    with pytest.raises(SenseflowError) as e:
        _load(dims)
    _one_line(e, "joint_attention_dim", "30", "24")
    # the VAE does not fit (in_channels 4 x 4 expected)
    vae = make_tiny_flux2_folder(tmp_path / "vae", "klein", in_channels=12)
    with pytest.raises(SenseflowError) as e:
        _load(vae, load_text_encoders=False)
    _one_line(e, "in_channels=12", "latent_channels=4")
    # a FLUX.1 folder is not FLUX.2, and another Flux2 pipeline is not a variant we know
    idx = json.loads((folders["klein"].path / "model_index.json").read_text())
    other = tmp_path / "other"
    import shutil
    shutil.copytree(folders["klein"].path, other)
    (other / "model_index.json").write_text(json.dumps({**idx, "_class_name": "FluxPipeline"}))
    with pytest.raises(SenseflowError) as e:
        Flux2Adapter.from_pretrained(other, resolution=RES)
    _one_line(e, "FluxPipeline", "flux")
    (other / "model_index.json").write_text(json.dumps({**idx, "_class_name": "Flux2KleinInpaintPipeline"}))
    with pytest.raises(SenseflowError) as e:
        Flux2Adapter.from_pretrained(other, resolution=RES)
    _one_line(e, "Flux2KleinInpaintPipeline", "Flux2Pipeline or Flux2KleinPipeline")
    # too few encoder layers for the requested hidden states
    with pytest.raises(SenseflowError) as e:
        _load(folders["klein"], text_encoder_out_layers=(9, 18, 40))
    _one_line(e, "40", "28 layers")
    # a resolution the VAE x patchify grid cannot take
    with pytest.raises(SenseflowError) as e:
        Flux2Adapter.from_pretrained(folders["klein"].path, resolution=30, load_text_encoders=False)
    _one_line(e, "resolution 30", "multiple of 4")


def test_auto_lora_targets_are_the_diffusers_flux2_scripts_modules():
    """train_dreambooth_lora_flux2(_klein).py without --lora_layers: to_k/q/v, to_out.0, to_qkv_mlp_proj, and the
    single blocks' attn.to_out (named per block)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from senseflow.lora import apply_lora
    from tests.helpers.tiny_flux2 import make_flux2_transformer

    net = apply_lora(make_flux2_transformer(), rank=2)
    adapted = sorted(n for n, m in net.named_modules() if isinstance(m, BaseTunerLayer))
    double = [f"transformer_blocks.{i}.attn.{p}" for i in range(2) for p in ("to_k", "to_out.0", "to_q", "to_v")]
    single = [f"single_transformer_blocks.{i}.attn.{p}" for i in range(2) for p in ("to_out", "to_qkv_mlp_proj")]
    assert adapted == sorted(double + single)


def test_dev_tokenizer_of_an_unknown_class_loads_from_its_files(tmp_path):
    """A tokenizer_config.json naming a class this transformers does not know: the tokenizer files still load and
    encode exactly as the pipeline's tokenizer; without any chat template the folder is refused in one line."""
    tiny = make_tiny_flux2_folder(tmp_path / "devp", "dev", processor=True)
    ref, _ = _stock(tiny).encode_prompt(prompt=PROMPTS, device="cpu", max_sequence_length=MSL)
    cfg_path = tiny.path / "tokenizer" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "tokenizer_class": "NoSuchTokenizerClass"}))
    adapter, _ = _load(tiny)
    assert torch.equal(adapter.encode_prompts(PROMPTS).tensors["prompt_embeds"], ref)
    (tiny.path / "tokenizer" / "chat_template.jinja").unlink()
    with pytest.raises(SenseflowError) as e:
        _load(tiny)
    _one_line(e, "chat template", "chat_template.jinja")


def test_block_names_output_norm_and_feature_tap_read_the_image_tokens(folders):
    from senseflow.teachers.base import capture_outputs

    adapter, backbone = _load(folders["dev"], load_text_encoders=False)
    names = adapter.block_names(backbone)
    assert names == ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                     "single_transformer_blocks.1"]
    assert adapter.output_norm_name(backbone) == "norm_out"
    tap = adapter.feature_tap(backbone)
    # the middle double block's IMAGE stream (index 1 of its (text, image) output), an 8 x 8 token grid at 32 px
    assert (tap.name, tap.index, tap.channels, tap.size) == ("transformer_blocks.1", 1, 16, (8, 8))
    seen = {}
    handle = backbone.get_submodule(tap.name).register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    x = _noise(adapter, 2)
    cond = Conditioning({"prompt_embeds": torch.randn(2, 5, 24)})
    with torch.no_grad(), capture_outputs(backbone, ["norm_out"]) as store:
        adapter.predict(backbone, x, torch.tensor([0.5, 0.5], dtype=torch.float64), cond)
    handle.remove()
    assert seen["out"][tap.index].shape == (2, 64, 16) and seen["out"][0].shape == (2, 5, 16)
    assert store["norm_out"].shape == (2, 64, 16)      # image tokens only (text removed before the norm)
