"""Qwen-Image (``QwenImageTransformer2DModel``) teacher adapter, loaded from a local diffusers folder.

What the stock ``QwenImagePipeline`` (diffusers 0.42) does, and this adapter reproduces:

* prompts (``_get_qwen_prompt_embeds`` / ``encode_prompt``): each prompt is put into the chat
  template :data:`PROMPT_TEMPLATE`, the batch is tokenized together (``padding=True``, at most
  ``1024 + 34`` tokens), the Qwen2.5-VL text model's LAST hidden state is taken, each prompt's valid
  (mask = 1) tokens are extracted, the first :data:`DROP_IDX` = 34 of them (the template's system
  prompt and ``<|im_start|>user\\n``) are dropped, and the rest is cut to ``max_sequence_length``.
  The pipeline pads a batch to its longest prompt; a prompt cache needs one shape per item, so this
  adapter pads every prompt to ``max_sequence_length`` (zeros, mask 0).  :meth:`predict` cuts the
  batch back to its longest valid prompt and passes no mask when none is left (as ``encode_prompt``
  does for an all-ones mask): the transformer masks padded KEYS and gives text tokens RoPE positions
  0.. in order, so the image output is the pipeline's whatever the padding;
* latents: the VAE (``AutoencoderKLQwenImage``) works on 5-D video latents ``[B, C, 1, H, W]``; the
  adapter's latent is the frame-squeezed ``[B, C, H, W]`` (``C = z_dim``), normalised per channel
  with the VAE config's ``latents_mean`` / ``latents_std`` (``z = (vae_latent - mean) / std``;
  decode: ``vae_latent = z / (1 / std) + mean`` as the pipeline writes it), and packed into 2x2
  patches ``[B, (H/2)(W/2), 4C]`` for the transformer (``_pack_latents``), which also gets
  ``img_shapes = [[(1, H/2, W/2)]] * B`` for its RoPE;
* time: the transformer gets ``timestep = t`` (the pipeline divides the scheduler's ``1000 sigma``
  by 1000; the model scales by 1000 inside) and predicts the velocity ``v = eps - x0``;
* schedule: dynamic shift ``mu = calculate_shift(image_seq_len, base_image_seq_len,
  max_image_seq_len, base_shift, max_shift)`` from ``scheduler/scheduler_config.json``
  (``image_seq_len = (H/2)(W/2)``; Qwen-Image: 256 / 8192 / 0.5 / 0.9, so ``mu = 0.694`` at 1024 px),
  i.e. ``RectifiedFlow(mu=...)``; ``shift=`` gives a static shift instead (Qwen-Image-Lightning
  distils with shift 3).  The scheduler's ``shift_terminal`` (0.02) stretches only the stock
  pipeline's own inference sigmas and is not part of the time law (docs/deviations.md);
* guidance: no guidance embedding (``guidance_embeds=False``); true CFG with a negative prompt, as
  the pipeline's ``true_cfg_scale`` with ``negative_prompt``: ``comb = v_neg + s (v_cond - v_neg)``,
  then ``comb * ||v_cond|| / ||comb||`` with the norms over the packed channels of each token
  (``cfg_renorm=False`` leaves plain CFG).  The unconditional branch is the encoded
  ``negative_prompt`` (" ", the model card's).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..schedules import as_time, expand_like
from . import loading, registry
from .flux import pack_latents, unpack_latents  # noqa: F401  (QwenImagePipeline packs 2x2 as FluxPipeline)
from .base import NO_GUIDANCE, Conditioning, FeatureTap, Guidance, SenseflowError
from .common import (DiffusersFolderAdapter, SingleTextEncoder, exponential_shift_schedule, flow_export_scheduler,
                     flow_step_kwargs, max_sequence_length_kwarg)

TRANSFORMER_CLASS = "QwenImageTransformer2DModel"
TEXT_ENCODER_CLASS = "Qwen2_5_VLForConditionalGeneration"
VAE_CLASS = "AutoencoderKLQwenImage"
#: QwenImagePipeline.prompt_template_encode / prompt_template_encode_start_idx / tokenizer_max_length
PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                   "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                   "<|im_end|>\n<|im_start|>assistant\n")
DROP_IDX = 34
TOKENIZER_MAX_LENGTH = 1024
#: QwenImagePipeline.__call__'s max_sequence_length default (check_inputs refuses more than 1024)
PIPELINE_MAX_SEQUENCE_LENGTH = 512
#: the Qwen-Image model card's negative prompt ("using an empty string if you do not have specific concept to remove")
DEFAULT_NEGATIVE_PROMPT = " "
#: transformer options of the edit / layered variants, which QwenImagePipeline (text-to-image) cannot drive
UNSUPPORTED_FLAGS: tuple[str, ...] = ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")


@dataclass
class TextEncoder:
    """The loaded Qwen2.5-VL encoder with its tokenizer."""

    name: str
    tokenizer: Any
    model: nn.Module


# -------------------------------------------------------------------------------------------------
# packing (QwenImagePipeline._pack_latents / _unpack_latents, frame axis squeezed)
# -------------------------------------------------------------------------------------------------
# QwenImagePipeline._pack_latents / _unpack_latents are FluxPipeline's line for line: imported from flux.py


def text_width(text: Mapping[str, Any]) -> int:
    """Hidden size of a Qwen2.5-VL config (nested ``text_config`` in transformers 5, flat in older saves)."""
    inner = text.get("text_config")
    return int((inner if isinstance(inner, Mapping) and "hidden_size" in inner else text)["hidden_size"])


def vae_factor(vae: Mapping[str, Any]) -> int:
    """Pixels per latent pixel: ``2 ** len(temperal_downsample)`` (the pipeline's vae_scale_factor)."""
    return 2 ** len(vae.get("temperal_downsample", [False, True, True]))


def check_dims(transformer: Mapping[str, Any], *, resolution: int, text: Mapping[str, Any] | None = None,
               vae: Mapping[str, Any] | None = None, max_sequence_length: int = PIPELINE_MAX_SEQUENCE_LENGTH,
               where: str = "the Qwen-Image folder") -> None:
    """Encoder, VAE, resolution and transformer fit together, or a one-line ``SenseflowError`` (config dicts only)."""
    in_ch, patch = int(transformer["in_channels"]), int(transformer.get("patch_size", 2))
    out_ch = int(transformer.get("out_channels") or in_ch)
    for flag in UNSUPPORTED_FLAGS:
        if transformer.get(flag):
            raise SenseflowError(f"{where}: the transformer has {flag}=True (an edit / layered / guidance-distilled "
                                 f"variant); the qwenimage family drives the text-to-image QwenImagePipeline only")
    if patch != 2 or in_ch != 4 * out_ch:
        raise SenseflowError(f"{where}: the transformer has patch_size={patch}, in_channels={in_ch}, "
                             f"out_channels={out_ch}, but Qwen-Image packs 2x2 latent patches (patch_size=2, "
                             f"in_channels = 4 x out_channels): this is not a Qwen-Image checkpoint")
    if not 1 <= max_sequence_length <= TOKENIZER_MAX_LENGTH:
        raise SenseflowError(f"max_sequence_length={max_sequence_length} is out of range: use 1 to "
                             f"{TOKENIZER_MAX_LENGTH} (QwenImagePipeline's default: {PIPELINE_MAX_SEQUENCE_LENGTH})")
    if text is not None:
        joint, width = int(transformer["joint_attention_dim"]), text_width(text)
        if width != joint:
            raise SenseflowError(f"joint_attention_dim mismatch in {where}: the Qwen2.5-VL encoder has hidden_size="
                                 f"{width} but the transformer's joint_attention_dim={joint}; the text encoder does "
                                 f"not belong to this transformer")
    if vae is not None:
        z = int(vae["z_dim"])
        if 4 * z != in_ch:
            raise SenseflowError(f"the VAE has z_dim={z} but the transformer has in_channels={in_ch} (= 4 x z_dim "
                                 f"after 2x2 packing) in {where}: the vae/ does not belong to this transformer")
        for key in ("latents_mean", "latents_std"):
            if len(vae.get(key) or []) != z:
                raise SenseflowError(f"{where}/vae/config.json: {key} has {len(vae.get(key) or [])} values, not "
                                     f"z_dim={z}; re-save the VAE with save_pretrained")
        mult = 2 * vae_factor(vae)
        if resolution <= 0 or resolution % mult:
            raise SenseflowError(f"resolution {resolution} is not a multiple of {mult} (VAE factor {mult // 2} x "
                                 f"2x2 packing): pick a resolution divisible by {mult}")


def trim_text(prompt_embeds: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Cut a padded batch back to its longest valid prompt; ``None`` for an all-valid mask (``encode_prompt``)."""
    if mask is None:
        return prompt_embeds, None
    valid = mask.bool().any(dim=0)
    n = int(valid.nonzero().max()) + 1 if bool(valid.any()) else 1
    prompt_embeds, mask = prompt_embeds[:, :n], mask[:, :n]
    return prompt_embeds, (None if bool(mask.bool().all()) else mask)


def _refuse_embedded() -> None:
    raise SenseflowError("Qwen-Image has no guidance embedding: guide the teacher with cfg (true CFG with the "
                         "negative prompt), not embedded guidance")


class QwenImageAdapter(SingleTextEncoder, DiffusersFolderAdapter):
    """Qwen-Image family adapter (see module docstring)."""

    guidance_kinds = frozenset({"cfg"})
    family = "qwenimage"
    label = "Qwen-Image"
    packed_channels = 4

    def __init__(self, transformer_config: Mapping[str, Any] | nn.Module, *, resolution: int, vae: nn.Module | Mapping,
                 mu: float | None = None, shift: float | None = None, scheduler_config: Mapping[str, Any] | None = None,
                 text_encoder: TextEncoder | None = None, max_sequence_length: int = PIPELINE_MAX_SEQUENCE_LENGTH,
                 negative_prompt: str = DEFAULT_NEGATIVE_PROMPT, cfg_renorm: bool = True,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 source: str | None = None) -> None:
        self.config = loading.config_of(transformer_config)
        self.resolution = int(resolution)
        self.source = source or "the Qwen-Image model"
        self.vae = vae if isinstance(vae, nn.Module) else None
        self.vae_config = loading.config_of(vae)
        self.text_encoder = text_encoder
        self.max_sequence_length = int(max_sequence_length)
        if text_encoder is not None and getattr(text_encoder.tokenizer, "pad_token", None) is None:
            raise SenseflowError(f"the tokenizer of {self.source} has no pad token, but QwenImagePipeline pads the "
                                 f"prompt batch: set pad_token (<|endoftext|>) in its tokenizer_config.json")
        check_dims(self.config, resolution=self.resolution,
                   text=None if text_encoder is None else loading.config_of(text_encoder.model),
                   vae=self.vae_config, max_sequence_length=self.max_sequence_length, where=self.source)
        side = self.latent_shape()[-1]
        self.image_seq_len = (side // 2) ** 2
        self.schedule = exponential_shift_schedule(scheduler_config, self.image_seq_len, label=self.label,
                                                   where=self.source, mu=mu, shift=shift)
        self.negative_prompt = str(negative_prompt)
        self.cfg_renorm = bool(cfg_renorm)
        self._uncond: Conditioning | None = None
        self.device = torch.device(device)
        self.dtype = dtype

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, resolution: int, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, load_text_encoders: bool = True,
                        max_sequence_length: int = PIPELINE_MAX_SEQUENCE_LENGTH, mu: float | None = None,
                        shift: float | None = None, **options: Any) -> tuple["QwenImageAdapter", nn.Module]:
        """Load ``(adapter, QwenImageTransformer2DModel teacher)`` from a local Qwen-Image folder (nothing is downloaded).

        ``mu`` / ``shift`` override the scheduler (default: dynamic ``mu`` at this resolution);
        ``load_text_encoders=False`` skips Qwen2.5-VL (prompts from a prompt cache); ``options``:
        ``negative_prompt``, ``cfg_renorm``.  Every config is checked before any weight is read.
        """
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

        folder = loading.as_folder(folder, "Qwen-Image teacher folder")
        index = loading.read_model_index(folder)
        loading.check_pipeline_family(folder, index, "qwenimage")
        tdir = loading.require_subfolder(
            folder, "transformer", hint="a Qwen-Image diffusers folder needs transformer/ (QwenImageTransformer2DModel)")
        tcfg = loading.check_model_class(tdir, TRANSFORMER_CLASS, adapter="Qwen-Image")
        loading.require_keys(tcfg, ("joint_attention_dim", "in_channels"), tdir)
        sched = loading.read_scheduler_config(folder)
        vae_dir = loading.require_subfolder(folder, "vae", hint="a Qwen-Image folder needs vae/ (AutoencoderKLQwenImage)")
        vae_cfg = loading.check_model_class(vae_dir, VAE_CLASS, adapter="Qwen-Image")
        loading.require_keys(vae_cfg, ("z_dim",), vae_dir)
        text_cfg, tokenizer = None, None
        if load_text_encoders:
            if not loading.component_present(folder, index, "text_encoder"):
                raise SenseflowError(f"{folder} has no text_encoder/: Qwen-Image needs its Qwen2.5-VL encoder; add it, "
                                     f"or pass load_text_encoders=False and use a prompt cache")
            text_cfg = loading.check_model_class(folder / "text_encoder", TEXT_ENCODER_CLASS, adapter="Qwen-Image")
            tokenizer = loading.load_tokenizer(folder / "tokenizer")
        check_dims(tcfg, resolution=resolution, text=text_cfg, vae=vae_cfg, max_sequence_length=max_sequence_length,
                   where=str(folder))

        transformer = loading.load_model(QwenImageTransformer2DModel, tdir, dtype=dtype, device=device,
                                         adapter="Qwen-Image")
        text_encoder = None
        if load_text_encoders:
            from transformers import Qwen2_5_VLForConditionalGeneration

            text_encoder = TextEncoder("text_encoder", tokenizer, loading.load_model(
                Qwen2_5_VLForConditionalGeneration, folder / "text_encoder", dtype=dtype, device=device, frozen=True,
                adapter="Qwen-Image"))
        vae = loading.load_model(AutoencoderKLQwenImage, vae_dir, dtype=dtype, device=device, frozen=True,
                                 adapter="Qwen-Image")
        adapter = cls(transformer.config, resolution=resolution, vae=vae, mu=mu, shift=shift, scheduler_config=sched,
                      text_encoder=text_encoder, max_sequence_length=max_sequence_length, device=device, dtype=dtype,
                      source=str(folder), **options)
        return adapter, transformer

    # -- the model call ------------------------------------------------------------------------
    def predict(self, backbone: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning,
                embedded_guidance: Tensor | None = None) -> Tensor:
        if embedded_guidance is not None:
            _refuse_embedded()
        try:
            prompt_embeds = cond.tensors["prompt_embeds"]
        except KeyError:
            raise SenseflowError(f"Qwen-Image conditioning needs 'prompt_embeds' (+ 'prompt_embeds_mask'), got "
                                 f"{sorted(cond.tensors)}: encode prompts with the Qwen-Image adapter") from None
        mask = cond.tensors.get("prompt_embeds_mask")
        n, joint = x_t.shape[0], int(self.config["joint_attention_dim"])
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != n or prompt_embeds.shape[-1] != joint:
            raise SenseflowError(f"prompt_embeds has shape {tuple(prompt_embeds.shape)} but the Qwen-Image transformer "
                                 f"needs [{n}, tokens, {joint}]: the prompt cache was built for another model")
        if mask is not None and tuple(mask.shape) != tuple(prompt_embeds.shape[:2]):
            raise SenseflowError(f"prompt_embeds_mask has shape {tuple(mask.shape)} but prompt_embeds has "
                                 f"{tuple(prompt_embeds.shape)}: rebuild the prompt cache")
        c_in = int(self.config["in_channels"]) // 4
        if x_t.ndim != 4 or x_t.shape[1] != c_in or x_t.shape[2] % 2 or x_t.shape[3] % 2:
            raise SenseflowError(f"Qwen-Image latents must be [B, {c_in}, H, W] with even H and W (unpacked, frame "
                                 f"axis squeezed), got {tuple(x_t.shape)}")
        t = as_time(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(n)
        dtype = loading.module_dtype(backbone)
        prompt_embeds, mask = trim_text(prompt_embeds, mask)
        h, w = x_t.shape[-2:]
        out = backbone(
            hidden_states=pack_latents(x_t.to(dtype)),
            timestep=t.to(torch.float32),
            encoder_hidden_states=prompt_embeds.to(device=x_t.device, dtype=dtype),
            encoder_hidden_states_mask=None if mask is None else mask.to(x_t.device),
            img_shapes=[[(1, h // 2, w // 2)]] * n,
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w).to(x_t.dtype)

    def predict_native(self, backbone: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning,
                       guidance: Guidance | None = None) -> Tensor:
        """The velocity with the pipeline's true CFG: ``v_n + s (v_c - v_n)``, rescaled per token to ``||v_c||``."""
        guidance = guidance or NO_GUIDANCE
        if guidance.embedded is not None:
            _refuse_embedded()
        if not guidance.uses_cfg:
            return self.predict(backbone, x_t, t, cond)
        t = as_time(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        n = x_t.shape[0]
        uncond = self.unconditional(n).to(x_t.device)
        both = self.predict(backbone, torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([cond, uncond]))
        v_c, v_n = both[:n], both[n:]
        s = expand_like(as_time(guidance.cfg, device=x_t.device), v_c).to(v_c.dtype)
        comb = v_n + s * (v_c - v_n)
        if not self.cfg_renorm:
            return comb
        h, w = x_t.shape[-2:]
        pc, pcomb = pack_latents(v_c), pack_latents(comb)
        rescaled = pcomb * (torch.norm(pc, dim=-1, keepdim=True) / torch.norm(pcomb, dim=-1, keepdim=True))
        return unpack_latents(rescaled, h, w)

    # -- prompts -------------------------------------------------------------------------------
    @property
    def has_text_encoders(self) -> bool:
        return self.text_encoder is not None

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """``QwenImagePipeline.encode_prompt`` (no_grad), padded to ``max_sequence_length`` with a 0/1 mask."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if self.text_encoder is None:
            raise SenseflowError("the Qwen-Image adapter was loaded without its text encoder "
                                 "(load_text_encoders=False): use a prompt cache, or load the teacher with it")
        enc, length = self.text_encoder, self.max_sequence_length
        device = loading.module_device(enc.model)
        with torch.no_grad():
            tokens = enc.tokenizer([PROMPT_TEMPLATE.format(p) for p in prompts], max_length=TOKENIZER_MAX_LENGTH + DROP_IDX,
                                   padding=True, truncation=True, return_tensors="pt").to(device)
            hidden = enc.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                               output_hidden_states=True).hidden_states[-1]
            valid = tokens.attention_mask.bool()
            embeds = hidden.new_zeros(len(prompts), length, hidden.shape[-1])
            mask = torch.zeros(len(prompts), length, dtype=torch.long, device=hidden.device)
            for i in range(len(prompts)):
                kept = hidden[i][valid[i]][DROP_IDX:][:length]
                embeds[i, :kept.shape[0]] = kept
                mask[i, :kept.shape[0]] = 1
        return Conditioning({"prompt_embeds": embeds.to(device=self.device, dtype=self.dtype),
                             "prompt_embeds_mask": mask.to(self.device)})

    def unconditional(self, batch_size: int) -> Conditioning:
        """The encoded ``negative_prompt`` (cached after the first call), expanded to ``batch_size``."""
        if self._uncond is None:
            if self.text_encoder is None:
                raise SenseflowError("Qwen-Image's CFG needs the negative-prompt embedding but the text encoder is not "
                                     "loaded and none was cached: rebuild the prompt cache (`senseflow cache`), or "
                                     "load the text encoder")
            self._uncond = self.encode_prompts([self.negative_prompt])
        return self._uncond.expand(batch_size)

    # -- latents -------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return vae_factor(self.vae_config)

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """``latents_mean`` and ``1 / latents_std`` shaped ``[1, C, 1, 1, 1]`` (the pipeline's tensors)."""
        z = int(self.vae_config["z_dim"])
        mean = torch.tensor(self.vae_config["latents_mean"]).view(1, z, 1, 1, 1).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(self.vae_config["latents_std"]).view(1, z, 1, 1, 1).to(like.device, like.dtype)
        return mean, inv_std

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images in ``[-1, 1]`` (``vae.decode(z / (1 / std) + mean)`` on one frame); gradients flow."""
        vae = self._require_vae()
        z = latents.to(loading.module_dtype(vae)).unsqueeze(2)
        mean, inv_std = self._stats(z)
        return vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0].to(latents.dtype)

    def encode(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        """Images in ``[-1, 1]`` -> latents ``(z - mean) / std`` (``sample=False``: the posterior mode)."""
        vae = self._require_vae()
        dist = vae.encode(images.to(loading.module_dtype(vae)).unsqueeze(2)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        mean, inv_std = self._stats(z)
        return ((z - mean) * inv_std)[:, :, 0].to(images.dtype)

    # -- structure -----------------------------------------------------------------------------
    def feature_tap(self, backbone: nn.Module, layer: str | None = None) -> FeatureTap | None:
        """DMD2's GAN head reads the image stream of the middle block (or ``layer``); blocks return (text, image)."""
        return self.token_grid_tap(backbone, self.block_names(backbone), layer, patch=2, index=1)

    # -- devices -------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (f"QwenImageAdapter(source={self.source!r}, resolution={self.resolution}, schedule={self.schedule}, "
                f"text_encoder={'yes' if self.text_encoder else 'no'}, max_sequence_length={self.max_sequence_length}, "
                f"negative_prompt={self.negative_prompt!r}, cfg_renorm={self.cfg_renorm})")


# -------------------------------------------------------------------------------------------------
# the family descriptor (senseflow.teachers.registry)
# -------------------------------------------------------------------------------------------------
def draw_packed_renoise(draw, shape, dtype: torch.dtype) -> Tensor:
    """The scheduler's stochastic re-noise: drawn like the packed model output ``[1, HW/4, 4C]``, unpacked."""
    c, h, w = shape
    return unpack_latents(draw((1, (h // 2) * (w // 2), 4 * c), dtype), h, w)


def export_call_kwargs(student, call: dict) -> None:
    """QwenImagePipeline arguments: no ``guidance_scale`` (no guidance embedding: the pipeline warns and ignores
    it), ``true_cfg_scale=1`` (its default 4.0 without a negative prompt only warns), ``max_sequence_length``."""
    call.pop("guidance_scale", None)
    call["true_cfg_scale"] = 1.0
    max_sequence_length_kwarg(student.adapter, call, PIPELINE_MAX_SEQUENCE_LENGTH)


# -- senseflow bench ---------------------------------------------------------------------------------
def _bench_multiple(preset) -> int:
    return preset.vae_factor * 2


def _bench_tokens(preset, resolution: int) -> int:
    return (resolution // preset.vae_factor // 2) ** 2


def _bench_vae(preset) -> dict:
    z = preset.latent_channels
    return {"z_dim": z, "temperal_downsample": [False] * (preset.vae_factor.bit_length() - 1),
            "latents_mean": [0.0] * z, "latents_std": [1.0] * z}


def _bench_adapter(preset, resolution: int, device: torch.device, dtype: torch.dtype) -> QwenImageAdapter:
    adapter = QwenImageAdapter(preset.config, resolution=resolution, vae=_bench_vae(preset),
                               scheduler_config=preset.scheduler, max_sequence_length=preset.text_tokens,
                               device=device, dtype=dtype, source=f"preset {preset.name}")
    adapter.set_unconditional(preset.conditioning(1, device, dtype, seed=1))   # the cached negative prompt
    return adapter


def _bench_conditioning(preset, batch: int, generator: torch.Generator, device, dtype) -> Conditioning:
    """A cached prompt batch: ``text_tokens`` valid tokens each (mask all ones)."""
    embeds = torch.randn(batch, preset.text_tokens, preset.text_dim, generator=generator)
    return Conditioning({"prompt_embeds": embeds.to(device=device, dtype=dtype),
                         "prompt_embeds_mask": torch.ones(batch, preset.text_tokens, dtype=torch.long, device=device)})


def _bench_inputs(preset, x, t, cond, resolution, device, dtype, config) -> dict:
    h, w = x.shape[-2:]
    # the bench prompts are all-valid: trim_text would give the full length and no mask (and cannot run on meta)
    return {"hidden_states": pack_latents(x), "timestep": t, "encoder_hidden_states": cond.tensors["prompt_embeds"],
            "encoder_hidden_states_mask": None, "img_shapes": [[(1, h // 2, w // 2)]] * x.shape[0],
            "return_dict": False}


def load_from_config(config, device: torch.device) -> tuple[QwenImageAdapter, nn.Module]:
    """Qwen-Image: dynamic ``mu`` from the scheduler config; ``teacher.shift`` (if set) replaces it by a static shift."""
    from ..build import loader_kwargs

    return QwenImageAdapter.from_pretrained(config.paths.teacher,
                                            **loader_kwargs(config, device, shift=config.teacher.shift))


# -- senseflow export --format single-file ----------------------------------------------------------
def to_original(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """The student in Qwen-Image's single-file layout: the diffusers keys themselves, unprefixed.

    Alibaba's ComfyUI files (``qwen_image_bf16.safetensors``: ``img_in``, ``txt_norm``,
    ``transformer_blocks.0.img_mod.1``, ...) already use diffusers' module names, and diffusers'
    ``QwenImageTransformer2DModel.from_single_file`` maps them with the identity
    (``SINGLE_FILE_LOADABLE_CLASSES``), so the inverse is the identity too; a ``model.diffusion_model.``
    prefix would NOT be stripped by that reader, so none is written.
    """
    from ..original_layout import KeyMap

    m = KeyMap(state, "Qwen-Image single-file export")
    for key in list(m.state):
        m.move(key, key)
    return m.finish()


SINGLE_FILE = registry.SingleFileRecipe(
    to_original, loader=TRANSFORMER_CLASS,
    where="ComfyUI: models/diffusion_models (Load Diffusion Model), with the Qwen2.5-VL text encoder and the "
          "Qwen-Image VAE loaded separately")


def to_kohya(pairs: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """The adapters in kohya's Qwen-Image layout (musubi-tuner, ComfyUI's ``lora_unet_`` keys):
    ``lora_unet_transformer_blocks_0_attn_to_q`` -- diffusers' module path with ``_``, since the original
    checkpoint already uses diffusers' names.  diffusers' ``_convert_non_diffusers_qwen_lora_to_diffusers``
    (``QwenImagePipeline.load_lora_weights``) reads it back; each name is checked against it first."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_qwen_lora_to_diffusers

    from ..original_layout import kohya_same_names

    return kohya_same_names(pairs, _convert_non_diffusers_qwen_lora_to_diffusers, "Qwen-Image kohya export")


KOHYA_LORA = registry.KohyaLoraRecipe(
    to_kohya, where="ComfyUI: models/loras (LoraLoaderModelOnly) on the student base; diffusers: "
                    "QwenImagePipeline.load_lora_weights")


FAMILY = registry.FamilyDescriptor(
    name="qwenimage",
    label="Qwen-Image",
    load=load_from_config,
    backbone_classes=(TRANSFORMER_CLASS,),
    pipeline_class="QwenImagePipeline",
    pipeline_prefixes=("QwenImagePipeline",),
    noise=registry.NoiseRecipe("global", renoise=draw_packed_renoise),   # generator=None: global RNG, packed re-noise
    export=registry.ExportRecipe(scheduler=flow_export_scheduler, step_kwargs=flow_step_kwargs,
                                 call_kwargs=export_call_kwargs, single_file=SINGLE_FILE,
                                 kohya_lora=KOHYA_LORA),
    bench=registry.BenchRecipe(_bench_multiple, _bench_tokens, _bench_adapter, _bench_inputs,
                                conditioning=_bench_conditioning),
    # target_modules: auto = diffusers' examples/dreambooth/train_dreambooth_lora_qwen_image.py default
    lora_targets=("to_k", "to_q", "to_v", "to_out.0"),
)
