"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``) teacher adapter, loaded from a local diffusers folder.

What the stock ``StableDiffusion3Pipeline`` (diffusers 0.42) does, and this adapter reproduces:

* the transformer is called as ``transformer(hidden_states=x_t, timestep=1000 * sigma,
  encoder_hidden_states=prompt_embeds, pooled_projections=pooled, return_dict=False)[0]`` and
  predicts the rectified-flow velocity ``v = eps - x0`` (``FlowMatchEulerDiscreteScheduler.step``
  is ``x_{t'} = x_t + (t' - t) v``), so ``x0 = x_t - t v``.  The timestep is passed in float32, as
  the pipeline passes the scheduler's float32 timesteps (the transformer's sinusoidal embedding
  upcasts it anyway; a bf16 timestep would round ``1000 t`` to multiples of 4 near 1000);
* prompts: CLIP-L and CLIP-G penultimate hidden states (``hidden_states[-2]``, no attention mask)
  concatenated on the feature dim, zero-padded to the T5 width, T5 states (``max_sequence_length``
  tokens) appended on the sequence dim -- zeros of that length when there is no T5; the pooled
  embedding is the concatenation of both CLIP ``text_embeds``;
* the unconditional branch is the encoded empty prompt ``""``;
* latents: ``decode(z) = vae.decode(z / scaling_factor + shift_factor)``, ``encode(x) = (z - shift) * scaling``;
* the scheduler's static ``shift`` (3.0 for SD3 / SD3.5) defines the schedule's unit -> native time map.

Beyond the pipeline, folders with only SOME encoders are supported (the toy teacher is an SD3 folder
with just ``text_encoder/`` + ``tokenizer/`` and no VAE): whatever CLIP encoders exist are used,
features are zero-padded to ``joint_attention_dim`` and pooled embeddings to ``pooled_projection_dim``
(on the right), ``max_sequence_length=0`` means "no T5 tokens at all", and a folder without ``vae/``
works in pixel space.  Every shape is checked against the transformer config at load time, from
the config files, before any weights are read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..released import ReleasedForms
from ..schedules import RectifiedFlow, as_time
from . import loading, registry
from .base import Conditioning, FeatureTap, SenseflowError
from .common import DiffusersFolderAdapter, flow_export_scheduler, flow_step_kwargs, max_sequence_length_kwarg

TRANSFORMER_CLASS = "SD3Transformer2DModel"
CLIP_CLASS = "CLIPTextModelWithProjection"
T5_CLASS = "T5EncoderModel"
VAE_CLASS = "AutoencoderKL"
#: (encoder, tokenizer) subfolders of the two CLIP slots, in the pipeline's order (CLIP-L, CLIP-G)
CLIP_SLOTS: tuple[tuple[str, str], ...] = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
T5_SLOT: tuple[str, str] = ("text_encoder_3", "tokenizer_3")
DEFAULT_SHIFT = 3.0
#: the pipeline refuses longer T5 sequences
MAX_T5_TOKENS = 512


@dataclass
class TextEncoder:
    """One loaded text encoder with its tokenizer (``kind``: ``"clip"`` or ``"t5"``)."""

    name: str
    tokenizer: Any
    model: nn.Module
    kind: str


def _cfg(obj: Any) -> Mapping[str, Any]:
    """A config as a mapping: a dict, a diffusers FrozenDict, a transformers PretrainedConfig or a model."""
    if isinstance(obj, Mapping):
        return obj
    cfg = getattr(obj, "config", obj)
    if isinstance(cfg, Mapping):
        return cfg
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    raise TypeError(f"cannot read a config from {type(obj).__name__}")


def check_dims(transformer: Mapping[str, Any], *, resolution: int, clip: Sequence[Mapping[str, Any]] = (),
               clip_max_length: int | None = None, t5: Mapping[str, Any] | None = None, max_sequence_length: int = 0,
               vae: Mapping[str, Any] | None = None, where: str = "the SD3 folder") -> None:
    """Check that encoders, VAE, resolution and transformer fit together; one-line ``SenseflowError`` if not.

    Works on plain config dicts so :meth:`SD3Adapter.from_pretrained` can check a folder before
    reading any weights.
    """
    joint = int(transformer["joint_attention_dim"])
    pooled_dim = int(transformer["pooled_projection_dim"])
    in_ch = int(transformer["in_channels"])
    patch = int(transformer.get("patch_size", 2))
    pos_max = transformer.get("pos_embed_max_size")

    if max_sequence_length < 0 or max_sequence_length > MAX_T5_TOKENS:
        raise SenseflowError(f"max_sequence_length={max_sequence_length} is out of range: use 0 (no T5 tokens) "
                             f"to {MAX_T5_TOKENS} (SD3 was trained with 77 or 256)")
    # -- text side ---------------------------------------------------------------------------------
    if clip:
        widths = [int(c["hidden_size"]) for c in clip]
        if sum(widths) > joint:
            raise SenseflowError(f"joint_attention_dim mismatch in {where}: the CLIP encoders' hidden sizes "
                                 f"{'+'.join(map(str, widths))}={sum(widths)} exceed the transformer's "
                                 f"joint_attention_dim={joint}; the text encoders do not belong to this transformer")
        proj = [int(c.get("projection_dim", c["hidden_size"])) for c in clip]
        if sum(proj) > pooled_dim or (len(clip) == len(CLIP_SLOTS) and sum(proj) != pooled_dim):
            raise SenseflowError(f"pooled_projection_dim mismatch in {where}: the CLIP projections "
                                 f"{'+'.join(map(str, proj))}={sum(proj)} do not match the transformer's "
                                 f"pooled_projection_dim={pooled_dim}; the text encoders do not belong to this "
                                 f"transformer")
        if clip_max_length is not None:
            for c in clip:
                n_pos = int(c.get("max_position_embeddings", clip_max_length))
                if clip_max_length > n_pos:
                    raise SenseflowError(f"the CLIP tokenizer pads to {clip_max_length} tokens but the encoder has "
                                         f"max_position_embeddings={n_pos} in {where}: set the tokenizer's "
                                         f"model_max_length to {n_pos}")
    if t5 is not None and max_sequence_length > 0:
        d_model = int(t5["d_model"])
        if d_model != joint:
            raise SenseflowError(f"joint_attention_dim mismatch in {where}: the T5 encoder has d_model={d_model} "
                                 f"but the transformer's joint_attention_dim={joint}; the text encoders do not "
                                 f"belong to this transformer")
    # -- image side --------------------------------------------------------------------------------
    if vae is not None:
        lat = int(vae["latent_channels"])
        if lat != in_ch:
            raise SenseflowError(f"the VAE has latent_channels={lat} but the transformer's in_channels={in_ch} in "
                                 f"{where}: the vae/ does not belong to this transformer")
        scale = 2 ** (len(vae["block_out_channels"]) - 1)
    else:
        if in_ch != 3:
            raise SenseflowError(f"{where} has no vae/ (pixel space) but the transformer has in_channels={in_ch}: "
                                 f"add the model's vae/ subfolder (a pixel-space teacher needs in_channels=3)")
        scale = 1
    if resolution <= 0 or resolution % (scale * patch) != 0:
        raise SenseflowError(f"resolution {resolution} is not a multiple of {scale * patch} (VAE factor {scale} x "
                             f"patch size {patch}): pick a resolution divisible by {scale * patch}")
    tokens_side = resolution // scale // patch
    if pos_max is not None and tokens_side > int(pos_max):
        raise SenseflowError(f"resolution {resolution} gives {tokens_side} patches per side but the transformer's "
                             f"pos_embed_max_size is {pos_max}: use a resolution of at most "
                             f"{int(pos_max) * scale * patch}")


class SD3Adapter(DiffusersFolderAdapter):
    """SD3 / SD3.5 family adapter (see module docstring)."""

    guidance_kinds = frozenset({"cfg"})
    family = "sd3"
    label = "SD3"
    #: released trainer_sd35_senseflow.py: omega = noise_scheduler.sigmas[t] ** 2; ISG t_mid an integer table index
    released = ReleasedForms(omega="sigma_table_sq", isg_form="two_step", isg_grid="unit_index")

    def __init__(self, transformer_config: Mapping[str, Any] | nn.Module, *, resolution: int,
                 shift: float = DEFAULT_SHIFT, clip_encoders: Sequence[TextEncoder] = (),
                 t5_encoder: TextEncoder | None = None, vae: nn.Module | None = None,
                 max_sequence_length: int = 256, clip_max_length: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, source: str | None = None) -> None:
        self.config = dict(_cfg(transformer_config))
        self.resolution = int(resolution)
        self.schedule = RectifiedFlow(shift=float(shift), prediction="velocity")
        self.clip_encoders = list(clip_encoders)
        self.t5_encoder = t5_encoder if max_sequence_length > 0 else None
        self.vae = vae
        self.max_sequence_length = int(max_sequence_length)
        self.device = torch.device(device)
        self.dtype = dtype
        self.source = source or "the SD3 model"
        if self.clip_encoders and clip_max_length is None:
            # the pipeline pads every CLIP prompt to the FIRST tokenizer's model_max_length
            first = self.clip_encoders[0]
            clip_max_length = loading.tokenizer_max_length(
                first.tokenizer, fallback=int(_cfg(first.model).get("max_position_embeddings", 77)))
        self.clip_max_length = clip_max_length
        for enc in self.clip_encoders + ([self.t5_encoder] if self.t5_encoder is not None else []):
            if getattr(enc.tokenizer, "pad_token", None) is None:
                raise SenseflowError(f"the {enc.name} tokenizer of {self.source} has no pad token, but SD3 pads every "
                                     f"prompt to a fixed length: set pad_token in its tokenizer_config.json")
        check_dims(self.config, resolution=self.resolution, clip=[_cfg(e.model) for e in self.clip_encoders],
                   clip_max_length=clip_max_length,
                   t5=None if self.t5_encoder is None else _cfg(self.t5_encoder.model),
                   max_sequence_length=self.max_sequence_length,
                   vae=None if vae is None else _cfg(vae), where=self.source)
        self._uncond: Conditioning | None = None

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, resolution: int, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, load_text_encoders: bool = True,
                        max_sequence_length: int = 256, shift: float | None = None,
                        ) -> tuple["SD3Adapter", nn.Module]:
        """Load ``(adapter, transformer)`` from a local SD3 / SD3.5 diffusers folder (nothing is downloaded).

        ``load_text_encoders=False`` skips the encoders (prompts then come from a prompt cache; see
        :meth:`set_unconditional`).  ``max_sequence_length=0`` drops the T5 tokens (T5 is not loaded).
        ``shift`` overrides ``scheduler/scheduler_config.json`` (default 3.0).
        """
        from diffusers import AutoencoderKL, SD3Transformer2DModel

        folder = loading.as_folder(folder, "SD3 teacher folder")
        index = loading.read_model_index(folder)
        fam = loading.pipeline_family(index)
        if fam is not None and fam != "sd3":
            raise SenseflowError(f"{folder}/model_index.json is a {index.get('_class_name')}, not an SD3 pipeline: "
                                 f"use the {fam} teacher family for this folder")
        tdir = loading.require_subfolder(
            folder, "transformer", hint="an SD3/SD3.5 diffusers folder needs transformer/ (SD3Transformer2DModel)")
        tcfg = loading.check_model_class(tdir, TRANSFORMER_CLASS, adapter="SD3")
        for key in ("joint_attention_dim", "pooled_projection_dim", "in_channels"):
            if key not in tcfg:
                raise SenseflowError(f"{tdir}/config.json has no {key}: re-save the transformer with save_pretrained")

        # -- schedule --------------------------------------------------------------------------
        if shift is None:
            sched = loading.read_scheduler_config(folder)
            if sched.get("use_dynamic_shifting"):
                raise SenseflowError(f"{folder}/scheduler uses dynamic shifting, which SD3 models do not: pass an "
                                     f"explicit shift= (SD3/SD3.5: 3.0)")
            shift = float(sched.get("shift", DEFAULT_SHIFT))

        # -- which components, checked from config files before loading any weights ------------------
        def present(name: str) -> bool:
            if loading.has_subfolder(folder, name):
                return True
            if loading.index_declares(index, name):
                raise SenseflowError(f"model_index.json lists {name} but {folder}/{name} is missing: copy it from "
                                     f"the original model, or set \"{name}\": [null, null] in model_index.json to "
                                     f"run without it")
            return False

        clip_slots: list[tuple[str, str]] = []
        t5_slot: tuple[str, str] | None = None
        if load_text_encoders:
            clip_slots = [slot for slot in CLIP_SLOTS if present(slot[0])]
            if not clip_slots:
                raise SenseflowError(f"{folder} has no CLIP text encoder (text_encoder/ or text_encoder_2/): SD3 "
                                     f"needs one for the pooled projection; add it, or pass "
                                     f"load_text_encoders=False and use a prompt cache")
            if max_sequence_length > 0 and present(T5_SLOT[0]):
                t5_slot = T5_SLOT
        clip_cfgs = [loading.check_model_class(folder / enc, CLIP_CLASS, adapter="SD3") for enc, _ in clip_slots]
        t5_cfg = None if t5_slot is None else loading.check_model_class(folder / t5_slot[0], T5_CLASS, adapter="SD3")
        vae_dir = folder / "vae"
        vae_cfg = loading.check_model_class(vae_dir, VAE_CLASS, adapter="SD3") if present("vae") else None
        tokenizers = {tok: loading.load_tokenizer(folder / tok) for _, tok in clip_slots}
        if t5_slot is not None:
            tokenizers[t5_slot[1]] = loading.load_tokenizer(folder / t5_slot[1])
        clip_max = None
        if clip_slots:
            clip_max = loading.tokenizer_max_length(tokenizers[clip_slots[0][1]],
                                                    fallback=int(clip_cfgs[0].get("max_position_embeddings", 77)))
        check_dims(tcfg, resolution=resolution, clip=clip_cfgs, clip_max_length=clip_max, t5=t5_cfg,
                   max_sequence_length=max_sequence_length, vae=vae_cfg, where=str(folder))

        # -- load ----------------------------------------------------------------------------------
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        transformer = loading.load_model(SD3Transformer2DModel, tdir, dtype=dtype, device=device, adapter="SD3")
        clip_encoders = [
            TextEncoder(enc, tokenizers[tok], loading.load_model(CLIPTextModelWithProjection, folder / enc,
                                                                 dtype=dtype, device=device, frozen=True,
                                                                 adapter="SD3"), "clip")
            for enc, tok in clip_slots
        ]
        t5_encoder = None
        if t5_slot is not None:
            t5_encoder = TextEncoder(t5_slot[0], tokenizers[t5_slot[1]],
                                     loading.load_model(T5EncoderModel, folder / t5_slot[0], dtype=dtype,
                                                        device=device, frozen=True, adapter="SD3"), "t5")
        vae = None
        if vae_cfg is not None:
            vae = loading.load_model(AutoencoderKL, vae_dir, dtype=dtype, device=device, frozen=True, adapter="SD3")
        adapter = cls(transformer.config, resolution=resolution, shift=shift, clip_encoders=clip_encoders,
                      t5_encoder=t5_encoder, vae=vae, max_sequence_length=max_sequence_length,
                      clip_max_length=clip_max, device=device, dtype=dtype, source=str(folder))
        return adapter, transformer

    # -- the model call ------------------------------------------------------------------------
    def predict(self, backbone: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning,
                embedded_guidance: Tensor | None = None) -> Tensor:
        if embedded_guidance is not None:
            raise SenseflowError("SD3 models have no guidance embedding: use cfg guidance")
        try:
            prompt_embeds = cond.tensors["prompt_embeds"]
            pooled = cond.tensors["pooled_prompt_embeds"]
        except KeyError as exc:
            raise SenseflowError(f"SD3 conditioning needs 'prompt_embeds' and 'pooled_prompt_embeds', got "
                                 f"{sorted(cond.tensors)}: encode prompts with the SD3 adapter") from None
        n = x_t.shape[0]
        joint, pooled_dim = int(self.config["joint_attention_dim"]), int(self.config["pooled_projection_dim"])
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != joint or prompt_embeds.shape[0] != n:
            raise SenseflowError(f"prompt_embeds has shape {tuple(prompt_embeds.shape)} but the transformer needs "
                                 f"[{n}, tokens, {joint}]: the prompt cache was built for another model")
        if pooled.ndim != 2 or pooled.shape[-1] != pooled_dim or pooled.shape[0] != n:
            raise SenseflowError(f"pooled_prompt_embeds has shape {tuple(pooled.shape)} but the transformer needs "
                                 f"[{n}, {pooled_dim}]: the prompt cache was built for another model")
        t = as_time(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(n)
        dtype = loading.module_dtype(backbone)
        out = backbone(
            hidden_states=x_t.to(dtype),
            timestep=(t * 1000.0).to(torch.float32),
            encoder_hidden_states=prompt_embeds.to(device=x_t.device, dtype=dtype),
            pooled_projections=pooled.to(device=x_t.device, dtype=dtype),
            return_dict=False,
        )[0]
        return out.to(x_t.dtype)

    # -- prompts -------------------------------------------------------------------------------
    @property
    def has_text_encoders(self) -> bool:
        return bool(self.clip_encoders)

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """``StableDiffusion3Pipeline.encode_prompt`` for a list of prompts (no_grad)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not self.clip_encoders:
            raise SenseflowError("the SD3 adapter was loaded without text encoders (load_text_encoders=False): "
                                 "use a prompt cache, or load the teacher with its text encoders")
        joint, pooled_dim = int(self.config["joint_attention_dim"]), int(self.config["pooled_projection_dim"])
        b = len(prompts)
        with torch.no_grad():
            feats, pooled = [], []
            for enc in self.clip_encoders:
                ids = enc.tokenizer(prompts, padding="max_length", max_length=self.clip_max_length, truncation=True,
                                    return_tensors="pt").input_ids.to(self.device)
                out = enc.model(ids, output_hidden_states=True)
                feats.append(out.hidden_states[-2])
                pooled.append(out.text_embeds)
            seq = {f.shape[1] for f in feats}
            if len(seq) != 1:
                raise SenseflowError(f"the CLIP encoders returned different sequence lengths {sorted(seq)}: give "
                                     f"both tokenizers the same model_max_length")
            clip = torch.cat(feats, dim=-1)
            clip = F.pad(clip, (0, joint - clip.shape[-1]))
            parts = [clip]
            if self.max_sequence_length > 0:
                if self.t5_encoder is not None:
                    ids = self.t5_encoder.tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length,
                                                    truncation=True, add_special_tokens=True,
                                                    return_tensors="pt").input_ids.to(self.device)
                    t5 = self.t5_encoder.model(ids)[0]
                else:
                    t5 = torch.zeros(b, self.max_sequence_length, joint, device=clip.device, dtype=clip.dtype)
                parts.append(t5.to(clip.dtype))
            prompt_embeds = torch.cat(parts, dim=-2)
            pooled_embeds = torch.cat(pooled, dim=-1)
            pooled_embeds = F.pad(pooled_embeds, (0, pooled_dim - pooled_embeds.shape[-1]))
        if prompt_embeds.shape[-1] != joint or pooled_embeds.shape[-1] != pooled_dim:
            raise SenseflowError(f"encoded prompts have widths {prompt_embeds.shape[-1]}/{pooled_embeds.shape[-1]} "
                                 f"but the transformer needs {joint}/{pooled_dim}: the text encoders do not belong "
                                 f"to this transformer")
        return Conditioning({"prompt_embeds": prompt_embeds.to(self.dtype),
                             "pooled_prompt_embeds": pooled_embeds.to(self.dtype)})

    def unconditional(self, batch_size: int) -> Conditioning:
        """The encoded empty prompt (cached), expanded to ``batch_size``."""
        if self._uncond is None:
            if not self.clip_encoders:
                raise SenseflowError("the SD3 adapter has no text encoders and no cached empty-prompt embedding: "
                                     "call set_unconditional() with the prompt cache's entry for \"\"")
            self._uncond = self.encode_prompts([""])
        return self._uncond.expand(batch_size)

    def release_text_encoders(self) -> None:
        """Drop the text encoders (after caching prompts) to free memory; the empty prompt stays cached."""
        if self.clip_encoders and self._uncond is None:
            self._uncond = self.encode_prompts([""])
        self.clip_encoders, self.t5_encoder = [], None

    # -- latents -------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _vae_factors(self) -> tuple[float, float]:
        cfg = self.vae.config
        shift = cfg.get("shift_factor")
        return float(cfg["scaling_factor"]), 0.0 if shift is None else float(shift)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images in ``[-1, 1]`` (pipeline: ``vae.decode(z / scaling + shift)``); gradients flow."""
        if self.vae is None:
            return latents
        scaling, shift = self._vae_factors()
        z = latents.to(loading.module_dtype(self.vae)) / scaling + shift
        return self.vae.decode(z, return_dict=False)[0].to(latents.dtype)

    def encode(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        """Images in ``[-1, 1]`` -> latents ``(z - shift) * scaling`` (``sample=False``: the posterior mode)."""
        if self.vae is None:
            return images
        scaling, shift = self._vae_factors()
        dist = self.vae.encode(images.to(loading.module_dtype(self.vae))).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return ((z - shift) * scaling).to(images.dtype)

    # -- structure -----------------------------------------------------------------------------
    def feature_tap(self, backbone: nn.Module, layer: str | None = None) -> FeatureTap | None:
        """DMD2's GAN head reads the image tokens of the middle transformer block (or ``layer``)."""
        patch = int(loading.config_of(backbone).get("patch_size", 2))
        return self.token_grid_tap(backbone, self.block_names(backbone), layer, patch=patch, index=1)

    # -- devices -------------------------------------------------------------------------------
    def text_encoders(self) -> list:
        return self.clip_encoders + ([self.t5_encoder] if self.t5_encoder is not None else [])

    def __repr__(self) -> str:
        encs = [e.name for e in self.clip_encoders] + ([self.t5_encoder.name] if self.t5_encoder else [])
        return (f"SD3Adapter(source={self.source!r}, resolution={self.resolution}, schedule={self.schedule}, "
                f"encoders={encs}, vae={'yes' if self.vae is not None else 'no (pixel space)'}, "
                f"max_sequence_length={self.max_sequence_length})")


# -------------------------------------------------------------------------------------------------
# the family descriptor (senseflow.teachers.registry)
# -------------------------------------------------------------------------------------------------
#: StableDiffusion3Pipeline's default (the export snippet passes a value only where the student needs another one)
PIPELINE_MAX_SEQUENCE_LENGTH = 256


def export_call_kwargs(student, call: dict) -> None:
    """StableDiffusion3Pipeline arguments beyond the common ones (moved from ``export_diffusers.pipeline_call``)."""
    max_sequence_length_kwarg(student.adapter, call, PIPELINE_MAX_SEQUENCE_LENGTH)


def check_export(student) -> None:
    """Moved from ``export_diffusers.export_diffusers``."""
    if getattr(student.adapter, "max_sequence_length", 1) == 0:
        raise SenseflowError("this SD3 student was trained with max_sequence_length=0 (no T5 tokens), which "
                             "StableDiffusion3Pipeline cannot reproduce: use senseflow generate")


# -- senseflow bench (moved from bench/presets.py Preset methods) ---------------------------------------
def _bench_multiple(preset) -> int:
    return preset.vae_factor * int(preset.config.get("patch_size", 2))


def _bench_tokens(preset, resolution: int) -> int:
    side = resolution // preset.vae_factor
    p = int(preset.config.get("patch_size", 2))
    return (side // p) ** 2


def _bench_adapter(preset, resolution: int, device: torch.device, dtype: torch.dtype) -> "SD3Adapter":
    from ..bench.presets import LatentSpace

    adapter = SD3Adapter(preset.config, resolution=resolution,
                         vae=LatentSpace(preset.latent_channels, preset.vae_factor),
                         max_sequence_length=0, device=device, dtype=dtype, source=f"preset {preset.name}")
    adapter.set_unconditional(preset.conditioning(1, device, dtype, seed=1))
    return adapter


def _bench_inputs(preset, x, t, cond, resolution, device, dtype, config) -> dict:
    return {"hidden_states": x, "timestep": t * 1000.0,
            "encoder_hidden_states": cond.tensors["prompt_embeds"],
            "pooled_projections": cond.tensors["pooled_prompt_embeds"], "return_dict": False}


def load_from_config(config, device: torch.device) -> tuple[SD3Adapter, nn.Module]:
    """SD3 / SD3.5 (moved from ``build._load_sd3``)."""
    from ..build import loader_kwargs

    return SD3Adapter.from_pretrained(config.paths.teacher, **loader_kwargs(config, device, shift=config.teacher.shift))


# -------------------------------------------------------------------------------------------------
# the original single-file layout (``senseflow export --format single-file``)
# -------------------------------------------------------------------------------------------------
def to_original(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """The MMDiT in Stability's layout (``model.diffusion_model.joint_blocks.N.x_block.attn.qkv``, ...).

    The inverse of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``: fused q/k/v, the
    SD3.5 qk norms (``ln_q`` / ``ln_k``) and dual-attention ``attn2``, the last block's context branch
    (no output projection / MLP, its modulation in (shift, scale) order) and the final layer's
    (shift, scale) modulation.  ComfyUI's "Load Diffusion Model" reads it (models/diffusion_models).
    """
    from ..original_layout import KeyMap, block_ids, swap_halves

    m = KeyMap(state, "SD3 single-file export")
    m.move("pos_embed.pos_embed", "pos_embed")
    m.move("pos_embed.proj", "x_embedder.proj")
    m.move("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0")
    m.move("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2")
    m.move("context_embedder", "context_embedder")
    m.move("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0")
    m.move("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2")
    blocks = block_ids(state, "transformer_blocks")
    for i in blocks:
        d, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        last = i == blocks[-1]
        m.fuse([d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"], x + "attn.qkv")
        m.fuse([d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"], c + "attn.qkv")
        for src, dst in (("attn.norm_q", x + "attn.ln_q"), ("attn.norm_k", x + "attn.ln_k"),
                         ("attn.norm_added_q", c + "attn.ln_q"), ("attn.norm_added_k", c + "attn.ln_k")):
            m.move_if(d + src, dst)
        m.move(d + "attn.to_out.0", x + "attn.proj")
        if m.has(d + "attn2.to_q.weight"):
            m.fuse([d + "attn2.to_q", d + "attn2.to_k", d + "attn2.to_v"], x + "attn2.qkv")
            m.move_if(d + "attn2.norm_q", x + "attn2.ln_q")
            m.move_if(d + "attn2.norm_k", x + "attn2.ln_k")
            m.move(d + "attn2.to_out.0", x + "attn2.proj")
        m.move(d + "norm1.linear", x + "adaLN_modulation.1")
        m.move(d + "ff.net.0.proj", x + "mlp.fc1")
        m.move(d + "ff.net.2", x + "mlp.fc2")
        if last:   # context_pre_only: AdaLayerNormContinuous, no proj / MLP on the context stream
            for part in ("weight", "bias"):
                m.put(c + f"adaLN_modulation.1.{part}", swap_halves(m.take(d + f"norm1_context.linear.{part}")))
        else:
            m.move(d + "norm1_context.linear", c + "adaLN_modulation.1")
            m.move(d + "attn.to_add_out", c + "attn.proj")
            m.move(d + "ff_context.net.0.proj", c + "mlp.fc1")
            m.move(d + "ff_context.net.2", c + "mlp.fc2")
    m.move("proj_out", "final_layer.linear")
    for part in ("weight", "bias"):
        m.put(f"final_layer.adaLN_modulation.1.{part}", swap_halves(m.take(f"norm_out.linear.{part}")))
    return m.finish(prefix="model.diffusion_model.")


SINGLE_FILE = registry.SingleFileRecipe(
    to_original, loader="SD3Transformer2DModel",
    where="ComfyUI: models/diffusion_models (Load Diffusion Model), with the SD3.5 text encoders and VAE "
          "loaded separately")


FAMILY = registry.FamilyDescriptor(
    name="sd3",
    label="SD3 / SD3.5",
    load=load_from_config,
    backbone_classes=("SD3Transformer2DModel",),
    pipeline_class="StableDiffusion3Pipeline",
    pipeline_prefixes=("StableDiffusion3",),
    noise=registry.NoiseRecipe("global"),   # latents AND re-noise from the global RNG
    export=registry.ExportRecipe(scheduler=flow_export_scheduler, step_kwargs=flow_step_kwargs,
                                 call_kwargs=export_call_kwargs, check=check_export,
                                 single_file=SINGLE_FILE),
    bench=registry.BenchRecipe(_bench_multiple, _bench_tokens, _bench_adapter, _bench_inputs),
    # target_modules: auto = the attention projections diffusers' LoRA training scripts target
    lora_targets=("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                  "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"),
)
