"""``senseflow export --format single-file | kohya-lora``: diffusers' OWN readers take the files back.

* single-file: export -> ``<Model>.from_single_file(file, config=<export folder>, subfolder=...)``
  offline -> every weight equals the student's bit for bit, and the family's stock pipeline with that
  backbone and the exported scheduler reproduces ``senseflow generate`` (max abs diff <= 1e-4, fp32);
* kohya-lora: ``pipe.load_lora_weights(<kohya file>)`` (diffusers converts kohya -> diffusers) gives the
  image of the diffusers-format LoRA and of ``senseflow generate``;
* the layouts at the REAL model sizes (FLUX.1-dev, SDXL base, SD3.5-large) on the meta device:
  diffusers' unpatched converter maps our file back to the model's exact keys and shapes, and the
  file has the key names / shapes of the released checkpoints (written here from those files).

diffusers' FLUX.1 converters hard-code FLUX.1's width (3072); for the tiny FLUX the tests run those
converters with that constant replaced (:mod:`tests.helpers.diffusers_widths`).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import diffusers  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402
from diffusers.loaders import lora_pipeline, single_file_model  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from senseflow.cli import main  # noqa: E402
from senseflow.export_diffusers import export_diffusers, seeding  # noqa: E402
from senseflow.export_original import export_kohya_lora, export_single_file  # noqa: E402
from senseflow.generate import image_seed, render  # noqa: E402
from senseflow.original_layout import fuse_lora  # noqa: E402
from senseflow.student import load_student  # noqa: E402
from senseflow.teachers import registry  # noqa: E402
from senseflow.teachers.base import SenseflowError  # noqa: E402
from tests.helpers import tiny_models  # noqa: E402
from tests.helpers.cli_checks import cli_fails  # noqa: E402
from tests.helpers.diffusers_widths import flux_widths, with_constants  # noqa: E402
from tests.helpers.threads import single_thread  # noqa: E402,F401
from tests.integration.test_generate_export import ATOL, PROMPTS, make_student_run, to_unit  # noqa: E402
from tests.unit.test_lora import _lora_run  # noqa: E402

diffusers_logging.disable_progress_bar()
diffusers_logging.set_verbosity_error()

#: the tiny FLUX of tests/helpers/tiny_models.py: 2 heads x 16 = 32 wide, MLP 4 x 32
TINY_FLUX = flux_widths(32, 128)


@pytest.fixture
def tiny_flux_converters(monkeypatch):
    """diffusers' FLUX.1 single-file and kohya converters at the tiny model's width."""
    entry = dict(single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"])
    entry["checkpoint_mapping_fn"] = with_constants(entry["checkpoint_mapping_fn"], TINY_FLUX)
    monkeypatch.setitem(single_file_model.SINGLE_FILE_LOADABLE_CLASSES, "FluxTransformer2DModel", entry)
    monkeypatch.setattr(lora_pipeline, "_convert_kohya_flux_lora_to_diffusers",
                        with_constants(lora_pipeline._convert_kohya_flux_lora_to_diffusers, TINY_FLUX))


def _stock(teacher: str, info: dict, prompts, seeds, **components) -> torch.Tensor:
    """The stock pipeline of ``teacher`` with ``components`` swapped in, called as ``info["call"]`` says."""
    pipe = DiffusionPipeline.from_pretrained(teacher, **components)
    return _call(pipe, info, prompts, seeds)


def _call(pipe, info: dict, prompts, seeds) -> torch.Tensor:
    out = []
    for prompt, seed in zip(prompts, seeds):
        if seeding(info["family"]) == "global":      # SD3, FLUX.1/2, Qwen-Image, Z-Image: the global RNG
            torch.manual_seed(seed)
            out.append(pipe(prompt=prompt, output_type="pt", **info["call"]).images.float())
        else:
            out.append(pipe(prompt=prompt, output_type="pt", generator=torch.Generator("cpu").manual_seed(seed),
                            **info["call"]).images.float())
    return torch.cat(out)


def _qkv_key(family: str) -> tuple[str, list[str]]:
    """One fused weight per family, named as in the released checkpoints, and its diffusers parts."""
    return {"sd3": ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
                    ["transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.attn.to_k.weight",
                     "transformer_blocks.0.attn.to_v.weight"]),
            "flux": ("single_blocks.1.linear1.weight",
                     ["single_transformer_blocks.1.attn.to_q.weight", "single_transformer_blocks.1.attn.to_k.weight",
                      "single_transformer_blocks.1.attn.to_v.weight", "single_transformer_blocks.1.proj_mlp.weight"]),
            # tiny SDXL: layers_per_block 1, so down block 1's attention is input_blocks.3.1
            "sdxl": ("model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight",
                     ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"]),
            "sana": ("blocks.1.cross_attn.kv_linear.weight",
                     ["transformer_blocks.1.attn2.to_k.weight", "transformer_blocks.1.attn2.to_v.weight"]),
            # Qwen-Image's single file keeps diffusers' names (ComfyUI's qwen_image_bf16.safetensors)
            "qwenimage": ("transformer_blocks.1.img_mlp.net.0.proj.weight",
                          ["transformer_blocks.1.img_mlp.net.0.proj.weight"]),
            "zimage": ("layers.1.attention.qkv.weight",
                       ["layers.1.attention.to_q.weight", "layers.1.attention.to_k.weight",
                        "layers.1.attention.to_v.weight"]),
            "flux2": ("double_blocks.1.txt_attn.qkv.weight",
                      ["transformer_blocks.1.attn.add_q_proj.weight", "transformer_blocks.1.attn.add_k_proj.weight",
                       "transformer_blocks.1.attn.add_v_proj.weight"])}[family]


@pytest.mark.parametrize("family", ["sd3", "flux", "sdxl", "sana", "qwenimage", "zimage", "flux2"])
def test_single_file_reads_back_with_from_single_file_and_reproduces(family, tmp_path, capsys, tiny_flux_converters):
    run = make_student_run(tmp_path, family)
    out = tmp_path / "student_file"
    assert main(["export", "--student", str(run), "--out", str(out), "--format", "single-file"]) == 0
    assert "from_single_file" in capsys.readouterr().out
    info = json.loads((out / "senseflow_export.json").read_text())
    path = out / "student_file.safetensors"
    assert info["file"] == path.name and path.is_file()
    student = load_student(run, device="cpu")
    ours = {k: v for k, v in student.backbone.state_dict().items()}

    saved = load_file(str(path))
    key, parts = _qkv_key(family)
    assert torch.equal(saved[key], torch.cat([ours[p] for p in parts], dim=0))
    if family == "qwenimage":       # the identity layout: the diffusers keys, no model.diffusion_model. prefix
        assert set(saved) == set(ours)
    else:
        assert not any(k.startswith(("transformer_blocks.", "down_blocks.", "single_transformer_blocks."))
                       for k in saved)
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["senseflow"])["steps"] == 4

    backbone = info["backbone"]
    cls = getattr(diffusers, info["loader"])
    model = cls.from_single_file(str(path), config=str(out), subfolder=backbone)
    back = model.state_dict()
    assert set(back) == set(ours)
    assert all(torch.equal(back[k], ours[k]) for k in ours)

    scheduler = getattr(diffusers, info["scheduler"]).from_pretrained(str(out), subfolder="scheduler")
    seeds = [image_seed(7, 0)]
    stock = _stock(str(tmp_path / "teacher"), info, PROMPTS[:1], seeds, scheduler=scheduler, **{backbone: model})
    mine = to_unit(render(student, PROMPTS[:1], seeds))
    assert stock.shape == mine.shape
    assert (stock - mine).abs().max().item() < ATOL


def test_single_file_sd35_variant_round_trips_and_sana_sprint_is_refused(tmp_path):
    """SD3.5's qk norms and dual attention (attn2) survive the round trip; SANA-Sprint has no place to go."""
    from senseflow.teachers import sana, sd3

    model = tiny_models.make_sd3_transformer("sd35")
    ours = model.state_dict()
    original = sd3.to_original(ours, dict(model.config))
    assert torch.equal(original["model.diffusion_model.joint_blocks.0.x_block.attn2.ln_q.weight"],
                       ours["transformer_blocks.0.attn2.norm_q.weight"])
    # the last block's context modulation is (shift, scale) in the original, (scale, shift) in diffusers
    last = f"transformer_blocks.{model.config.num_layers - 1}.norm1_context.linear.weight"
    shift_scale = original[f"model.diffusion_model.joint_blocks.{model.config.num_layers - 1}."
                           "context_block.adaLN_modulation.1.weight"]
    half = ours[last].shape[0] // 2
    assert torch.equal(shift_scale[:half], ours[last][half:]) and torch.equal(shift_scale[half:], ours[last][:half])
    from safetensors.torch import save_file
    model.save_config(str(tmp_path / "transformer"))
    save_file({k: v.contiguous() for k, v in original.items()}, str(tmp_path / "sd35.safetensors"))
    back = diffusers.SD3Transformer2DModel.from_single_file(str(tmp_path / "sd35.safetensors"), config=str(tmp_path),
                                                            subfolder="transformer").state_dict()
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)

    sprint = tiny_models.make_sana_transformer(sprint=True)
    with pytest.raises(SenseflowError, match="SANA single-file export: .*use --format diffusers"):
        sana.to_original(sprint.state_dict(), dict(sprint.config))


def test_single_file_zimage_has_the_original_names_and_refuses_what_diffusers_cannot_split():
    """Z-Image's original names (those diffusers' converter renames from); GQA / other patch sizes refused."""
    from senseflow.teachers import zimage
    from tests.helpers import tiny_zimage

    model = tiny_zimage.make_zimage_transformer()
    ours = model.state_dict()
    original = zimage.to_original(ours, dict(model.config))
    assert torch.equal(original["x_embedder.weight"], ours["all_x_embedder.2-1.weight"])
    assert torch.equal(original["final_layer.adaLN_modulation.1.bias"],
                       ours["all_final_layer.2-1.adaLN_modulation.1.bias"])
    assert torch.equal(original["noise_refiner.0.attention.out.weight"],
                       ours["noise_refiner.0.attention.to_out.0.weight"])
    assert torch.equal(original["context_refiner.0.attention.k_norm.weight"],
                       ours["context_refiner.0.attention.norm_k.weight"])
    assert original["layers.1.attention.qkv.weight"].shape == (3 * 32, 32)
    assert len(original) == len(ours) - 2 * (2 + 2 * 1)          # q, k, v -> qkv in each of the 4 blocks
    with pytest.raises(SenseflowError, match="grouped-query"):
        zimage.to_original(ours, {**model.config, "n_kv_heads": 1})
    with pytest.raises(SenseflowError, match="patch sizes"):
        zimage.to_original(ours, {**model.config, "all_patch_size": (2, 4), "all_f_patch_size": (1, 1)})


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "klein"])
def test_single_file_flux2_has_bfl_names_and_the_unpatched_converter_maps_it_back(guidance):
    """FLUX.2-dev (guidance embedder) and klein (none): BFL's names, (shift, scale) final modulation, and
    diffusers' ``convert_flux2_transformer_checkpoint_to_diffusers`` as shipped gives our exact weights back."""
    from senseflow.teachers import flux2
    from tests.helpers import tiny_flux2

    model = tiny_flux2.make_flux2_transformer(guidance_embeds=guidance)
    ours = model.state_dict()
    original = flux2.to_original(ours, dict(model.config))
    assert ("guidance_in.in_layer.weight" in original) == guidance
    final, mine = original["final_layer.adaLN_modulation.1.weight"], ours["norm_out.linear.weight"]
    assert torch.equal(final[:16], mine[16:]) and torch.equal(final[16:], mine[:16])     # width 16: (shift, scale)
    assert torch.equal(original["single_blocks.0.norm.key_norm.scale"],
                       ours["single_transformer_blocks.0.attn.norm_k.weight"])
    assert torch.equal(original["double_stream_modulation_txt.lin.weight"],
                       ours["double_stream_modulation_txt.linear.weight"])
    convert = single_file_model.SINGLE_FILE_LOADABLE_CLASSES["Flux2Transformer2DModel"]["checkpoint_mapping_fn"]
    back = convert(checkpoint=dict(original), config=dict(model.config))
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)


def test_sdxl_checkpoint_reads_back_as_a_whole_pipeline_and_reproduces(tmp_path, capsys):
    """``--format checkpoint``: UNet + both CLIPs + VAE in one file; ``StableDiffusionXLPipeline.from_single_file``."""
    run = make_student_run(tmp_path, "sdxl")
    out = tmp_path / "sdxl_full"
    assert main(["export", "--student", str(run), "--out", str(out), "--format", "checkpoint"]) == 0
    assert "StableDiffusionXLPipeline.from_single_file" in capsys.readouterr().out
    info = json.loads((out / "senseflow_export.json").read_text())
    path = out / "sdxl_full.safetensors"
    saved = load_file(str(path))
    # the prefixes of sd_xl_base_1.0.safetensors: UNet, CLIP-L (HF names), OpenCLIP bigG, VAE
    assert {k.split(".")[0] for k in saved} == {"model", "conditioner", "first_stage_model"}
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in saved
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in saved
    assert saved["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4          # LDM's 1x1 conv
    teacher = tmp_path / "teacher"
    scheduler = diffusers.LCMScheduler.from_pretrained(str(out), subfolder="scheduler")
    pipe = diffusers.StableDiffusionXLPipeline.from_single_file(str(path), config=str(teacher), scheduler=scheduler)
    student = load_student(run, device="cpu")
    ours = student.backbone.state_dict()
    back = pipe.unet.state_dict()
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    reference = DiffusionPipeline.from_pretrained(str(teacher))
    for name in ("text_encoder", "text_encoder_2", "vae"):
        a, b = getattr(reference, name).state_dict(), getattr(pipe, name).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    seeds = [image_seed(7, 1)]
    stock = _call(pipe, info, PROMPTS[1:2], seeds)
    assert (stock - to_unit(render(student, PROMPTS[1:2], seeds))).abs().max().item() < ATOL

# -------------------------------------------------------------------------------------------------
# real sizes, on the meta device
# -------------------------------------------------------------------------------------------------
#: FLUX.1-dev / SDXL base / SD3.5-large transformer configs (their diffusers config.json, abridged)
REAL = {
    "flux": ("FluxTransformer2DModel", dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                            pooled_projection_dim=768, guidance_embeds=True,
                                            axes_dims_rope=(16, 56, 56))),
    "sdxl": ("UNet2DConditionModel", dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                                          block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
                                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                            "CrossAttnDownBlock2D"),
                                          up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                          transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                                          use_linear_projection=True, addition_embed_type="text_time",
                                          addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)),
    "sd3": ("SD3Transformer2DModel", dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38,
                                          attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                                          caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
                                          pos_embed_max_size=192, qk_norm="rms_norm")),
}
#: key -> shape in the released single files (flux1-dev.safetensors, sd_xl_base_1.0.safetensors,
#: sd3.5_large.safetensors); the SDXL upsamplers sit after an attention (``.2.conv``)
RELEASED = {
    "flux": {"double_blocks.18.img_attn.qkv.weight": (9216, 3072), "single_blocks.37.linear1.weight": (21504, 3072),
             "single_blocks.37.linear2.weight": (3072, 15360), "guidance_in.in_layer.weight": (3072, 256),
             "double_blocks.0.txt_attn.norm.key_norm.scale": (128,), "final_layer.adaLN_modulation.1.weight": (6144, 3072),
             "img_in.weight": (3072, 64)},
    "sdxl": {"model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
             "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
             "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
             "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
             "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
             "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
             "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
             "model.diffusion_model.out.2.weight": (4, 320, 3, 3)},
    "sd3": {"model.diffusion_model.joint_blocks.37.context_block.adaLN_modulation.1.weight": (4864, 2432),
            "model.diffusion_model.joint_blocks.0.x_block.attn.ln_q.weight": (64,),
            "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (7296, 2432),
            "model.diffusion_model.pos_embed": (1, 36864, 2432),
            "model.diffusion_model.final_layer.adaLN_modulation.1.weight": (4864, 2432)},
}


@pytest.mark.parametrize("family", ["flux", "sdxl", "sd3"])
def test_real_size_layouts_match_released_keys_and_diffusers_reads_them(family):
    cls_name, config = REAL[family]
    cls = getattr(diffusers, cls_name)
    with torch.device("meta"):
        model = cls(**config)
    ours = model.state_dict()
    original = registry.get(family).export.single_file.to_original(ours, dict(model.config))
    for key, shape in RELEASED[family].items():
        assert tuple(original[key].shape) == shape, key
    convert = single_file_model.SINGLE_FILE_LOADABLE_CLASSES[cls_name]["checkpoint_mapping_fn"]   # unpatched
    back = convert(checkpoint=dict(original), config=dict(model.config))
    assert set(back) == set(ours)
    assert all(back[k].shape == ours[k].shape for k in ours)


#: the new families at their real sizes (senseflow.bench.presets' configs): original key -> shape, worked out
#: from each config (not read from a released file): FLUX.2-dev width 48 x 128 = 6144, MLP 3 x 6144 = 18432
#: (SwiGLU: linear1 = 3 x 6144 + 2 x 18432 rows); Z-Image width 3840, 2x2 patches of 16 channels = 64;
#: Qwen-Image width 24 x 128 = 3072, img_mod 6 x 3072
NEW_REAL = {
    "flux2-dev": {"double_blocks.7.img_attn.qkv.weight": (18432, 6144), "single_blocks.47.linear1.weight": (55296, 6144),
                  "single_blocks.47.linear2.weight": (6144, 24576), "txt_in.weight": (6144, 15360),
                  "guidance_in.in_layer.weight": (6144, 256), "final_layer.adaLN_modulation.1.weight": (12288, 6144),
                  "single_stream_modulation.lin.weight": (18432, 6144)},
    "flux2-klein-4b": {"double_blocks.4.txt_attn.qkv.weight": (9216, 3072), "txt_in.weight": (3072, 7680)},
    "zimage": {"layers.29.attention.qkv.weight": (11520, 3840), "x_embedder.weight": (3840, 64),
               "final_layer.linear.weight": (64, 3840), "cap_embedder.1.weight": (3840, 2560),
               "noise_refiner.1.attention.q_norm.weight": (128,)},
    "qwen-image": {"transformer_blocks.59.img_mod.1.weight": (18432, 3072), "img_in.weight": (3072, 64),
                   "txt_in.weight": (3072, 3584)},
}


@pytest.mark.parametrize("preset", list(NEW_REAL))
def test_real_size_new_family_layouts_have_the_shapes_and_diffusers_reads_them(preset):
    """FLUX.2 / Z-Image / Qwen-Image at their real sizes (meta device) through diffusers' converters as shipped."""
    from senseflow.bench.presets import get_preset

    spec = get_preset(preset)
    with torch.device("meta"):
        model = getattr(diffusers, spec.model_class)(**spec.config)
    ours = model.state_dict()
    original = registry.get(spec.family).export.single_file.to_original(ours, dict(model.config))
    for key, shape in NEW_REAL[preset].items():
        assert tuple(original[key].shape) == shape, key
    assert ("guidance_in.in_layer.weight" in original) == (preset == "flux2-dev")
    convert = single_file_model.SINGLE_FILE_LOADABLE_CLASSES[spec.model_class]["checkpoint_mapping_fn"]
    back = convert(checkpoint=dict(original), config=dict(model.config))
    assert set(back) == set(ours)
    assert all(back[k].shape == ours[k].shape for k in ours)


def test_real_size_sdxl_vae_and_open_clip_match_released_keys_and_diffusers_reads_them():
    """sd_xl_base_1.0's VAE and OpenCLIP bigG parts at their real sizes (meta device)."""
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from senseflow.teachers import sdxl

    vae_config = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                      layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024)
    with torch.device("meta"):
        vae = diffusers.AutoencoderKL(**vae_config)
        bigg = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                          num_hidden_layers=32, num_attention_heads=20,
                                                          projection_dim=1280, hidden_act="gelu"))
    ours = vae.state_dict()
    original = sdxl._vae_to_ldm(ours, dict(vae.config))
    released = {"first_stage_model.encoder.down.3.block.1.conv2.weight": (512, 512, 3, 3),
                "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
                "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
                "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
                "first_stage_model.quant_conv.weight": (8, 8, 1, 1)}
    for key, shape in released.items():
        assert tuple(original[key].shape) == shape, key
    back = sfu.convert_ldm_vae_checkpoint(dict(original), dict(vae.config))
    assert set(back) == set(ours) and all(back[k].shape == ours[k].shape for k in ours)

    ours = bigg.state_dict()
    original = sdxl._open_clip_to_ldm(ours)
    assert tuple(original["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"].shape) == \
        (3840, 1280)
    assert tuple(original["conditioner.embedders.1.model.positional_embedding"].shape) == (77, 1280)
    back = sfu.convert_open_clip_checkpoint(bigg, dict(original), prefix="conditioner.embedders.1.model.")
    assert set(back) == {k for k in ours if not k.endswith("position_ids")}
    assert all(back[k].shape == ours[k].shape for k in back)

# -------------------------------------------------------------------------------------------------
# kohya LoRA
# -------------------------------------------------------------------------------------------------
def test_fuse_lora_is_the_stacked_deltas():
    g = torch.Generator().manual_seed(0)
    a1, b1 = torch.randn(2, 5, generator=g), torch.randn(3, 2, generator=g)
    a3, b3 = torch.randn(2, 5, generator=g), torch.randn(4, 2, generator=g)
    down, up, scale = fuse_lora([(a1, b1, 1.5), None, (a3, b3, 1.5)], [3, 2, 4], 5, "test")
    assert down.shape == (6, 5) and up.shape == (9, 6) and scale == 1.5
    expected = torch.cat([b1 @ a1, torch.zeros(2, 5), b3 @ a3])          # the parts' own deltas, stacked
    assert torch.allclose(up @ down, expected, atol=1e-6)
    down, up, scale = fuse_lora([(a1, b1, 2.0), (a3, b3[:2], 0.5)], [3, 2], 5, "test")   # scales folded
    assert scale == 1.0
    assert torch.allclose(up @ down, torch.cat([2.0 * b1 @ a1, 0.5 * b3[:2] @ a3]), atol=1e-6)
    with pytest.raises(SenseflowError, match="ranks"):
        fuse_lora([(a1, b1, 1.0), (torch.randn(3, 5), torch.randn(2, 3), 1.0)], [3, 2], 5, "test")


def test_real_size_flux_kohya_lora_splits_back_with_diffusers_unpatched_converter():
    """FLUX.1's real widths (3072 / MLP 12288): our fused qkv / linear1 adapters go through diffusers'
    ``_convert_kohya_flux_lora_to_diffusers`` as shipped and come back as the per-part deltas."""
    from senseflow.teachers import flux

    g = torch.Generator().manual_seed(0)
    inner, rank, scale = 3072, 2, 0.75

    def pair(rows: int):
        return (torch.randn(rank, inner, generator=g), torch.randn(rows, rank, generator=g), scale)

    pairs = {f"transformer_blocks.18.attn.{p}": pair(inner) for p in ("to_q", "to_k", "to_v", "add_q_proj")}
    pairs["transformer_blocks.18.ff.net.2"] = (torch.randn(rank, 4 * inner, generator=g),
                                               torch.randn(inner, rank, generator=g), scale)
    pairs.update({f"single_transformer_blocks.37.attn.{p}": pair(inner) for p in ("to_q", "to_k", "to_v")})
    pairs["single_transformer_blocks.37.proj_mlp"] = pair(4 * inner)
    kohya = flux.to_kohya(pairs, {"num_attention_heads": 24, "attention_head_dim": 128})
    assert kohya["lora_unet_single_blocks_37_linear1.lora_up.weight"].shape == (21504, 4 * rank)
    assert kohya["lora_unet_double_blocks_18_img_mlp_2.alpha"].item() == scale * rank
    back = lora_pipeline._convert_kohya_flux_lora_to_diffusers(dict(kohya))
    for name, (down, up, s) in pairs.items():     # delta W applied to random probes (the full products are big)
        a, b = back[f"transformer.{name}.lora_A.weight"], back[f"transformer.{name}.lora_B.weight"]
        x = torch.randn(down.shape[1], 3, generator=g)
        ours = s * (up @ (down @ x))
        assert (b @ (a @ x) - ours).abs().max() <= 1e-5 * ours.abs().max(), name      # float32 rounding only
    # the txt stream's k / v had no adapter: they come back as exact zeros
    assert torch.count_nonzero(back["transformer.transformer_blocks.18.attn.add_k_proj.lora_B.weight"]) == 0

@pytest.mark.parametrize("preset", list(NEW_REAL))
def test_real_size_new_family_kohya_loras_map_back_to_every_auto_target(preset):
    """Every module the family's ``target_modules: auto`` adapts at the real size (meta device; 4 x 60 for
    Qwen-Image, 4 x (30 + 2 + 2) for Z-Image, FLUX.2-dev's 8 double + 48 single blocks, klein-4B's 5 + 20)
    goes through the pipeline's own ``lora_state_dict`` (diffusers' converters as shipped) back onto itself."""
    from senseflow.bench.presets import get_preset

    spec = get_preset(preset)
    desc = registry.get(spec.family)
    with torch.device("meta"):
        model = getattr(diffusers, spec.model_class)(**spec.config)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and any(n == t or n.endswith("." + t) for t in desc.lora_targets)]
    # FLUX.2: to_q/k/v/out.0 per double block, to_qkv_mlp_proj per single block, and the single blocks'
    # attn.to_out only for blocks 0-23 (flux2.py's auto list names them by index)
    expected = {"flux2-dev": 8 * 4 + 48 + 24, "flux2-klein-4b": 5 * 4 + 20 + 20, "zimage": 34 * 4,
                "qwen-image": 60 * 4}[preset]
    assert len(names) == expected
    pairs = {n: (torch.zeros(1, model.get_submodule(n).in_features),
                 torch.zeros(model.get_submodule(n).out_features, 1), 1.0) for n in names}
    kohya = desc.export.kohya_lora.to_kohya(pairs, dict(model.config))
    assert all(k.startswith("lora_unet_") for k in kohya)
    back = getattr(diffusers, desc.pipeline_class).lora_state_dict(dict(kohya))
    assert {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in back} == set(names)
    for n in names:
        assert back[f"transformer.{n}.lora_B.weight"].shape == (model.get_submodule(n).out_features, 1), n


def test_real_size_sdxl_kohya_names_are_sd_scripts_and_map_back_to_every_module():
    """SDXL base's 560 attention projections (70 transformer blocks: 2x2 + 2x10 down, 10 mid, 3x2 + 3x10 up;
    8 each): sd-scripts' names, and diffusers' kohya path (sgm block
    renumbering + key conversion + PEFT renaming) lands each one on its own module."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    from senseflow.teachers import sdxl

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**REAL["sdxl"][1])
    names = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)
             and n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    pairs = {n: (torch.zeros(1, unet.get_submodule(n).in_features), torch.zeros(unet.get_submodule(n).out_features, 1),
                 1.0) for n in names}
    kohya = sdxl.to_kohya(pairs, dict(unet.config))
    for name in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                 "lora_unet_output_blocks_0_1_transformer_blocks_9_attn2_to_k",
                 "lora_unet_middle_block_1_transformer_blocks_9_attn1_to_out_0"):
        assert name + ".lora_down.weight" in kohya, name
    state, _ = diffusers.StableDiffusionXLPipeline.lora_state_dict(dict(kohya), unet_config=unet.config)
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
    assert len(names) == 70 * 8 and {k.rsplit(".lora_", 1)[0] for k in peft} == set(names)

@pytest.mark.parametrize("family", ["sdxl", "flux", "qwenimage", "zimage", "flux2"])
def test_kohya_lora_reloads_with_diffusers_own_loader_and_reproduces(family, tmp_path, tiny_flux_converters):
    run = _lora_run(tmp_path, family)
    student = load_student(run)
    base = export_diffusers(run, tmp_path / "export", loaded=student)
    out = export_kohya_lora(run, tmp_path / "kohya", loaded=student)
    kohya = load_file(str(out / "kohya.safetensors"))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in kohya)
    # rank 4, alpha 8 (scale 2): kohya's alpha / rank must stay 2 -- 8 for a plain module, 24 for FLUX's fused qkv
    if family == "sdxl":
        name = "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q"
        assert kohya[name + ".alpha"].item() == 8.0
        assert kohya[name + ".lora_down.weight"].shape == (4, 16)
    elif family == "qwenimage":    # musubi-tuner's names: diffusers' module path with "_"
        name = "lora_unet_transformer_blocks_1_attn_to_out_0"
        assert kohya[name + ".alpha"].item() == 8.0 and kohya[name + ".lora_down.weight"].shape[0] == 4
        assert len(kohya) == 3 * 4 * len(student.backbone.transformer_blocks)   # to_q/k/v/out.0, 3 tensors each
    elif family == "zimage":       # the refiners too, q / k / v unfused
        for name in ("lora_unet_layers_1_attention_to_k", "lora_unet_noise_refiner_0_attention_to_out_0",
                     "lora_unet_context_refiner_0_attention_to_q"):
            assert kohya[name + ".alpha"].item() == 8.0 and kohya[name + ".lora_down.weight"].shape[0] == 4, name
    elif family == "flux2":        # BFL names; q / k / v fused into one rank-12 block-sparse adapter, alpha 24
        cfg = student.backbone.config
        inner = cfg.num_attention_heads * cfg.attention_head_dim
        name = "lora_unet_double_blocks_0_img_attn_qkv"
        assert kohya[name + ".alpha"].item() == 24.0 and kohya[name + ".lora_up.weight"].shape == (3 * inner, 12)
        up = kohya[name + ".lora_up.weight"]
        assert torch.count_nonzero(up[:inner, 4:]) == 0 and torch.count_nonzero(up[inner:2 * inner, :4]) == 0
        assert kohya["lora_unet_single_blocks_0_linear1.alpha"].item() == 8.0
        assert kohya["lora_unet_single_blocks_0_linear2.alpha"].item() == 8.0
        assert kohya["lora_unet_double_blocks_0_img_attn_proj.alpha"].item() == 8.0
    else:
        name = "lora_unet_double_blocks_0_img_attn_qkv"
        assert kohya[name + ".alpha"].item() == 24.0
        assert kohya[name + ".lora_down.weight"].shape == (12, 32) and kohya[name + ".lora_up.weight"].shape == (96, 12)
        assert kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * 32 + 128, 16)

    info = json.loads((base / "senseflow_export.json").read_text())
    prompt, seed = PROMPTS[1], image_seed(0, 0)
    pipe = DiffusionPipeline.from_pretrained(str(base))
    pipe.load_lora_weights(str(out), weight_name="kohya.safetensors")
    from_kohya = _call(pipe, info, [prompt], [seed])
    pipe = DiffusionPipeline.from_pretrained(str(base))
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    from_diffusers = _call(pipe, info, [prompt], [seed])
    assert (from_kohya - from_diffusers).abs().max().item() <= 1e-4
    ours = to_unit(render(student, [prompt], [seed]))
    assert (from_kohya - ours).abs().max().item() <= 1e-4, (from_kohya - ours).abs().max().item()
    plain = _call(DiffusionPipeline.from_pretrained(str(base)), info, [prompt], [seed])   # the adapters matter
    assert (plain - ours).abs().max().item() > 100 * ATOL, (plain - ours).abs().max().item()


def test_kohya_refuses_adapters_diffusers_would_read_back_wrong_or_drop():
    """Qwen-Image / Z-Image: diffusers rebuilds the dots from a list of protected names, so a module outside
    it (``norm_added_q`` -> ``norm.added.q``) would land elsewhere; FLUX.2: the kohya converter only WARNS on
    a key it does not know (a modulation), so the adapter would vanish.  All three are one-line errors."""
    from senseflow.teachers import flux2, qwenimage, zimage

    pair = (torch.ones(2, 8), torch.ones(8, 2), 1.0)
    cfg = {"num_attention_heads": 2, "attention_head_dim": 4}
    for to_kohya, module in ((qwenimage.to_kohya, "transformer_blocks.0.attn.norm_added_q"),
                             (zimage.to_kohya, "layers.0.attention.norm_q"),
                             (flux2.to_kohya, "double_stream_modulation_img.linear")):
        with pytest.raises(SenseflowError, match="use --format diffusers") as err:
            to_kohya({"transformer_blocks.0.attn.to_q" if to_kohya is not zimage.to_kohya
                      else "layers.0.attention.to_q": pair, module: pair}, cfg)
        assert module in str(err.value) and "\n" not in str(err.value)
    # and the accepted names come back through diffusers' converters onto their own modules
    back = lora_pipeline.QwenImageLoraLoaderMixin.lora_state_dict(
        qwenimage.to_kohya({"transformer_blocks.3.attn.to_out.0": pair}, cfg))
    assert set(back) == {"transformer.transformer_blocks.3.attn.to_out.0.lora_A.weight",
                         "transformer.transformer_blocks.3.attn.to_out.0.lora_B.weight"}


def test_refusals_are_one_line_and_write_nothing(tmp_path, capsys):
    run = make_student_run(tmp_path, "sd3")
    out = tmp_path / "x"
    base = ["export", "--student", str(run), "--out", str(out)]
    cli_fails(capsys, [*base, "--format", "kohya-lora"], "kohya", "sd3",      # diffusers reads no SD3 kohya file
           "flux", "sdxl", "qwenimage", "zimage", "flux2")
    cli_fails(capsys, [*base, "--format", "single-file", "--link", "copy"], "--link", "diffusers")
    cli_fails(capsys, [*base, "--format", "checkpoint"], "whole-model", "sdxl")
    cli_fails(capsys, ["export", "--student", str(run), "--out", str(tmp_path / "a.safetensors"), "--format",
                    "single-file"], "folder")
    assert not out.exists() and not (tmp_path / "a.safetensors").exists()
    out.mkdir()
    (out / "keep.txt").write_text("x")
    cli_fails(capsys, [*base, "--format", "single-file"], "--overwrite")
    assert (out / "keep.txt").exists()
    assert main([*base, "--format", "single-file", "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "x.safetensors").is_file()
    assert not list(tmp_path.glob(".x.*"))
    assert main([*base, "--format", "single-file", "--overwrite", "--dtype", "bfloat16"]) == 0   # half the bytes
    assert {v.dtype for v in load_file(str(out / "x.safetensors")).values()} == {torch.bfloat16}
    full = make_student_run(tmp_path / "sdxl", "sdxl")
    with pytest.raises(SenseflowError, match="no LoRA adapters"):     # a full-weight student has no adapters
        export_kohya_lora(full, tmp_path / "y")
    assert not (tmp_path / "y").exists()
    broken = load_student(run)
    with torch.no_grad():
        next(broken.backbone.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(SenseflowError, match="non-finite"):           # never written with a NaN
        export_single_file(run, tmp_path / "nan", loaded=broken)
    assert not (tmp_path / "nan").exists() and not list(tmp_path.glob(".nan.*"))
    with pytest.raises(SenseflowError, match="families with one: sd3, flux, flux2, sdxl, sana, qwenimage, zimage"):
        export_single_file(run, tmp_path / "z", loaded=_as_family(load_student(run), "toy"))
    assert not (tmp_path / "z").exists()


def _as_family(student, family: str):
    """The same loaded student, claiming another family (to reach the refusal of a family without a layout)."""
    import dataclasses

    spec = dataclasses.replace(student.spec, meta={**student.spec.meta, "family": family})
    return dataclasses.replace(student, spec=spec)
