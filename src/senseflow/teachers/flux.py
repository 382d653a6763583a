"""FLUX.1 (``FluxTransformer2DModel``) teacher adapter, loaded from a local diffusers folder.

What the stock ``FluxPipeline`` (diffusers 0.42) does, and this adapter reproduces:

* latents ``[B, C, H, W]`` (``C = in_channels / 4``, ``H = W = resolution / vae_factor``) are packed into
  2x2 patches, ``[B, (H/2)(W/2), 4C]`` (``_pack_latents``), with position ids ``img_ids[i*W/2 + j] =
  (0, i, j)`` and ``txt_ids = 0`` (``_prepare_latent_image_ids``, 2-D, no batch dimension); the output
  is unpacked the inverse way.  The adapter's :meth:`latent_shape` is the UNPACKED VAE latent, so
  samplers, methods and the VAE never see the packing;
* the transformer gets ``timestep = t`` itself (the pipeline divides the scheduler's ``1000 sigma``
  by 1000; the model multiplies by 1000 inside) in float32, and predicts the rectified-flow velocity
  ``v = eps - x0`` (``FlowMatchEulerDiscreteScheduler.step`` is ``x_{t'} = x_t + (t' - t) v``);
* FLUX.1-dev is guidance-distilled: there is no unconditional branch; the guidance scale ``g`` is fed
  as ``guidance=g`` (float32; the model multiplies by 1000 inside) when ``guidance_embeds`` is set,
  and not at all otherwise;
* prompts: CLIP ``pooler_output`` (``pooled_prompt_embeds``) padded to the CLIP tokenizer's length, and
  T5 last hidden states (``prompt_embeds``) padded to ``max_sequence_length`` (512 by default);
* schedule: dynamic shift with ``mu = calculate_shift(image_seq_len, base_image_seq_len,
  max_image_seq_len, base_shift, max_shift)`` read from ``scheduler/scheduler_config.json``
  (``image_seq_len = (H/2)(W/2)`` packed tokens; ``mu = 1.15`` at 1024 px for FLUX.1-dev), i.e.
  ``RectifiedFlow(mu=...)``; a scheduler with ``use_dynamic_shifting=False`` (FLUX.1-schnell) gives
  its static ``shift``;
* VAE: ``decode(z) = vae.decode(z / scaling_factor + shift_factor)``, ``encode(x) = (z - shift) * scaling``.

Student and fake score (a documented choice, following the official SenseFlow FLUX release): the
released trainer builds BOTH the generator and the fake score from a copy of the transformer with
``guidance_embeds=False`` (``exp_flux/flux-wo-guidance-embed``), calls them without ``guidance``,
and only the frozen teacher gets the guidance value (``~U(1, 8)``).  :meth:`make_student` and
:meth:`make_fake_score` therefore return a ``FluxTransformer2DModel`` with the same config but
``guidance_embeds=False``, loaded strictly with every teacher weight except
``time_text_embed.guidance_embedder.*``.  (The guidance-embedding contribution is simply dropped: the
copy equals the teacher whose guidance embedding outputs zero.)  ``student_guidance_embed=True`` /
``fake_guidance_embed=True`` keep full copies instead.  A backbone WITH a guidance embedding that
is called without a guidance value gets ``default_embedded_guidance`` (3.5, ``FluxPipeline``'s
default ``guidance_scale``; ``None`` makes a missing value an error); a backbone WITHOUT one must
not be given a value (one-line error).

True CFG on top of the guidance embedding (``true_cfg=True``, the released SiD-DiT FLUX loop,
``training/sid_dit_flux_util.py::sid_dit_denoise``): the unconditional branch is the encoded empty
prompt (T5 padded to ``max_sequence_length`` + CLIP pooled output, as the loop's
``encode_prompt([""] * batch)``), both branches get the SAME embedded guidance value, and the
prediction is ``v_u + s (v_c - v_u)``.  Off by default: FLUX.1-dev is guidance-distilled and the
stock ``FluxPipeline`` has no unconditional branch; without it ``cfg`` guidance is refused.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..released import ReleasedForms
from ..schedules import as_time
from . import loading, registry
from .base import Conditioning, FeatureTap, SenseflowError
from .common import (DiffusersFolderAdapter, ScaledShiftedVAE, exponential_shift_schedule, flow_export_scheduler,
                     flow_step_kwargs, max_sequence_length_kwarg)

TRANSFORMER_CLASS = "FluxTransformer2DModel"
CLIP_CLASS = "CLIPTextModel"
T5_CLASS = "T5EncoderModel"
VAE_CLASS = "AutoencoderKL"
CLIP_SLOT: tuple[str, str] = ("text_encoder", "tokenizer")
T5_SLOT: tuple[str, str] = ("text_encoder_2", "tokenizer_2")
#: parameters that exist only in a guidance-distilled transformer (FLUX.1-dev)
GUIDANCE_EMBEDDER_PREFIX = "time_text_embed.guidance_embedder."
#: FluxPipeline's default guidance_scale
DEFAULT_EMBEDDED_GUIDANCE = 3.5
#: the pipeline refuses longer T5 sequences
MAX_T5_TOKENS = 512


@dataclass
class TextEncoder:
    """One loaded text encoder with its tokenizer."""

    name: str
    tokenizer: Any
    model: nn.Module


# -------------------------------------------------------------------------------------------------
# packing (FluxPipeline._pack_latents / _unpack_latents / _prepare_latent_image_ids)
# -------------------------------------------------------------------------------------------------
def pack_latents(x: Tensor) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/2)(W/2), 4C]`` exactly as ``FluxPipeline._pack_latents``."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: Tensor, height: int, width: int) -> Tensor:
    """``[B, (H/2)(W/2), 4C]`` -> ``[B, C, H, W]`` (``height``/``width`` in latent pixels), as the pipeline."""
    b, _, ch = x.shape
    x = x.reshape(b, height // 2, width // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, ch // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """Position ids ``(0, i, j)`` of the packed tokens (``height``/``width`` in PACKED tokens), float32 ``[N, 3]``."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width)[None, :]
    return ids.reshape(height * width, 3).to(device=device)


def has_guidance_embedding(backbone: nn.Module) -> bool:
    """Whether a FLUX transformer takes a ``guidance`` value (``guidance_embeds`` / a ``guidance_embedder``)."""
    cfg = getattr(backbone, "config", None)
    if isinstance(cfg, Mapping) and "guidance_embeds" in cfg:
        return bool(cfg["guidance_embeds"])
    return loading.find_module_name(backbone, "guidance_embedder") is not None


def without_guidance_embedding(backbone: nn.Module) -> nn.Module:
    """A trainable copy of a FLUX transformer with ``guidance_embeds=False`` (the SenseFlow FLUX student).

    Built on the meta device (no random init of a 12B model), then every teacher tensor except the
    guidance embedder is CLONED in (never shared with the frozen teacher); loading is strict on
    everything else.  A backbone without a guidance embedding is simply deep-copied.
    """
    if not has_guidance_embedding(backbone):
        return copy.deepcopy(backbone)
    cfg = getattr(backbone, "config", None)
    if not isinstance(cfg, Mapping) or type(backbone).__name__ != TRANSFORMER_CLASS:
        raise SenseflowError(f"cannot remove the guidance embedding from a {type(backbone).__name__}: the FLUX "
                             f"adapter needs the FluxTransformer2DModel itself (unwrap it first)")
    config = {k: v for k, v in cfg.items() if not k.startswith("_")}
    config["guidance_embeds"] = False
    with torch.device("meta"):
        student = type(backbone).from_config(config)
    state = {k: v.detach().clone() for k, v in backbone.state_dict().items()
             if not k.startswith(GUIDANCE_EMBEDDER_PREFIX)}
    missing, unexpected = student.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise SenseflowError(f"building the guidance-free FLUX student failed: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}; the transformer does not match its config")
    leftover = [n for n, t in list(student.named_parameters()) + list(student.named_buffers()) if t.is_meta]
    if leftover:   # non-persistent buffers are not in the state dict: build the slow way
        student = type(backbone).from_config(config).to(device=loading.module_device(backbone),
                                                          dtype=loading.module_dtype(backbone))
        student.load_state_dict(state, strict=True)
    student.train(backbone.training)
    return student


def check_dims(transformer: Mapping[str, Any], *, resolution: int, clip: Mapping[str, Any] | None = None,
               clip_max_length: int | None = None, t5: Mapping[str, Any] | None = None,
               max_sequence_length: int = MAX_T5_TOKENS, vae: Mapping[str, Any] | None = None,
               where: str = "the FLUX folder") -> None:
    """Check that encoders, VAE, resolution and transformer fit together; one-line ``SenseflowError`` if not.

    Works on plain config dicts so :meth:`FluxAdapter.from_pretrained` can check a folder before
    reading any weights.
    """
    joint = int(transformer["joint_attention_dim"])
    pooled_dim = int(transformer["pooled_projection_dim"])
    in_ch = int(transformer["in_channels"])
    patch = int(transformer.get("patch_size", 1))
    if patch != 1:
        raise SenseflowError(f"{where}: the FLUX transformer has patch_size={patch}, but FLUX packs 2x2 latent "
                             f"patches itself and needs patch_size=1; this is not a FLUX.1 checkpoint")
    if in_ch % 4:
        raise SenseflowError(f"{where}: the FLUX transformer has in_channels={in_ch}, not 4 x the VAE's latent "
                             f"channels (2x2 packing): this is not a FLUX.1 checkpoint")
    if not 1 <= max_sequence_length <= MAX_T5_TOKENS:
        raise SenseflowError(f"max_sequence_length={max_sequence_length} is out of range: use 1 to {MAX_T5_TOKENS} "
                             f"(FLUX.1-dev: 512)")
    if clip is not None:
        width = int(clip["hidden_size"])
        if width != pooled_dim:
            raise SenseflowError(f"pooled_projection_dim mismatch in {where}: the CLIP encoder's pooled output has "
                                 f"{width} features but the transformer's pooled_projection_dim={pooled_dim}; the "
                                 f"text encoders do not belong to this transformer")
        n_pos = int(clip.get("max_position_embeddings", 77))
        if clip_max_length is not None and clip_max_length > n_pos:
            raise SenseflowError(f"the CLIP tokenizer pads to {clip_max_length} tokens but the encoder has "
                                 f"max_position_embeddings={n_pos} in {where}: set the tokenizer's model_max_length "
                                 f"to {n_pos}")
    if t5 is not None:
        d_model = int(t5["d_model"])
        if d_model != joint:
            raise SenseflowError(f"joint_attention_dim mismatch in {where}: the T5 encoder has d_model={d_model} "
                                 f"but the transformer's joint_attention_dim={joint}; the text encoders do not belong "
                                 f"to this transformer")
    if vae is not None:
        lat = int(vae["latent_channels"])
        if 4 * lat != in_ch:
            raise SenseflowError(f"the VAE has latent_channels={lat} but the FLUX transformer has in_channels={in_ch} "
                                 f"(= 4 x latent channels after 2x2 packing) in {where}: the vae/ does not belong to "
                                 f"this transformer")
        scale = 2 ** (len(vae["block_out_channels"]) - 1)
        if resolution <= 0 or resolution % (2 * scale) != 0:
            raise SenseflowError(f"resolution {resolution} is not a multiple of {2 * scale} (VAE factor {scale} x "
                                 f"2x2 packing): pick a resolution divisible by {2 * scale}")


class FluxAdapter(ScaledShiftedVAE, DiffusersFolderAdapter):
    """FLUX.1 family adapter (see module docstring)."""

    guidance_kinds = frozenset({"embedded"})
    family = "flux"
    label = "FLUX"
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    #: released trainer_flux_senseflow.py: omega = (1 - sigma)^2; ISG t_mid an integer in 1000 * sigma (shifted)
    released = ReleasedForms(omega="alpha_sq", isg_form="two_step", isg_grid="native_1000")
    packed_channels = 4  # the transformer sees 2x2-packed latents

    def __init__(self, transformer_config: Mapping[str, Any] | nn.Module, *, resolution: int, vae: nn.Module | Mapping,
                 mu: float | None = None, shift: float | None = None, scheduler_config: Mapping[str, Any] | None = None,
                 clip_encoder: TextEncoder | None = None, t5_encoder: TextEncoder | None = None,
                 max_sequence_length: int = MAX_T5_TOKENS, clip_max_length: int | None = None,
                 student_guidance_embed: bool = False, fake_guidance_embed: bool = False,
                 default_embedded_guidance: float | None = DEFAULT_EMBEDDED_GUIDANCE,
                 true_cfg: bool = False,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 source: str | None = None) -> None:
        self.config = loading.config_of(transformer_config)
        self.resolution = int(resolution)
        self.source = source or "the FLUX model"
        self.vae = vae if isinstance(vae, nn.Module) else None
        self.vae_config = loading.config_of(vae)
        if (clip_encoder is None) != (t5_encoder is None):
            raise SenseflowError("FLUX needs both text encoders (CLIP for the pooled projection, T5 for the tokens) "
                                 "or neither (prompt cache)")
        self.clip_encoder, self.t5_encoder = clip_encoder, t5_encoder
        self.max_sequence_length = int(max_sequence_length)
        if clip_encoder is not None and clip_max_length is None:
            clip_max_length = loading.tokenizer_max_length(
                clip_encoder.tokenizer, fallback=int(loading.config_of(clip_encoder.model).get("max_position_embeddings", 77)))
        self.clip_max_length = clip_max_length
        for enc in (clip_encoder, t5_encoder):
            if enc is not None and getattr(enc.tokenizer, "pad_token", None) is None:
                raise SenseflowError(f"the {enc.name} tokenizer of {self.source} has no pad token, but FLUX pads every "
                                     f"prompt to a fixed length: set pad_token in its tokenizer_config.json")
        check_dims(self.config, resolution=self.resolution,
                   clip=None if clip_encoder is None else loading.config_of(clip_encoder.model),
                   clip_max_length=clip_max_length,
                   t5=None if t5_encoder is None else loading.config_of(t5_encoder.model),
                   max_sequence_length=self.max_sequence_length, vae=self.vae_config, where=self.source)
        side = self.latent_shape()[-1]
        self.image_seq_len = (side // 2) ** 2
        self.schedule = exponential_shift_schedule(scheduler_config, self.image_seq_len, label=self.label,
                                                   where=self.source, mu=mu, shift=shift)
        self.student_guidance_embed = bool(student_guidance_embed)
        self.fake_guidance_embed = bool(fake_guidance_embed)
        self.default_embedded_guidance = None if default_embedded_guidance is None else float(default_embedded_guidance)
        self.true_cfg = bool(true_cfg)
        if self.true_cfg:  # an unconditional branch exists: cfg and embedded guidance may be combined
            self.guidance_kinds = frozenset({"embedded", "cfg"})
        self._uncond: Conditioning | None = None
        self.device = torch.device(device)
        self.dtype = dtype

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, resolution: int, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, load_text_encoders: bool = True,
                        max_sequence_length: int = MAX_T5_TOKENS, mu: float | None = None, shift: float | None = None,
                        **options: Any) -> tuple["FluxAdapter", nn.Module]:
        """Load ``(adapter, FluxTransformer2DModel teacher)`` from a local FLUX.1 diffusers folder (nothing is downloaded).

        ``mu`` / ``shift`` override the scheduler (default: dynamic ``mu`` from the scheduler config at
        this resolution).  ``load_text_encoders=False`` skips CLIP and T5 (prompts then come from a
        prompt cache).  ``options``: ``student_guidance_embed``, ``fake_guidance_embed``,
        ``default_embedded_guidance``, ``true_cfg`` (see the module docstring).
        """
        from diffusers import AutoencoderKL, FluxTransformer2DModel

        folder = loading.as_folder(folder, "FLUX teacher folder")
        index = loading.read_model_index(folder)
        loading.check_pipeline_family(folder, index, "flux")
        tdir = loading.require_subfolder(
            folder, "transformer", hint="a FLUX.1 diffusers folder needs transformer/ (FluxTransformer2DModel)")
        tcfg = loading.check_model_class(tdir, TRANSFORMER_CLASS, adapter="FLUX")
        loading.require_keys(tcfg, ("joint_attention_dim", "pooled_projection_dim", "in_channels"), tdir)
        sched = loading.read_scheduler_config(folder)

        vae_dir = loading.require_subfolder(folder, "vae", hint="a FLUX.1 diffusers folder needs vae/ (AutoencoderKL)")
        vae_cfg = loading.check_model_class(vae_dir, VAE_CLASS, adapter="FLUX")
        clip_cfg = t5_cfg = None
        tokenizers: dict[str, Any] = {}
        clip_max = None
        if load_text_encoders:
            for enc, tok in (CLIP_SLOT, T5_SLOT):
                if not loading.component_present(folder, index, enc):
                    raise SenseflowError(f"{folder} has no {enc}/: FLUX needs CLIP (text_encoder/) and T5 "
                                         f"(text_encoder_2/); add it, or pass load_text_encoders=False and use a "
                                         f"prompt cache")
            clip_cfg = loading.check_model_class(folder / CLIP_SLOT[0], CLIP_CLASS, adapter="FLUX")
            t5_cfg = loading.check_model_class(folder / T5_SLOT[0], T5_CLASS, adapter="FLUX")
            tokenizers = {tok: loading.load_tokenizer(folder / tok) for _, tok in (CLIP_SLOT, T5_SLOT)}
            clip_max = loading.tokenizer_max_length(tokenizers[CLIP_SLOT[1]],
                                                    fallback=int(clip_cfg.get("max_position_embeddings", 77)))
        check_dims(tcfg, resolution=resolution, clip=clip_cfg, clip_max_length=clip_max, t5=t5_cfg,
                   max_sequence_length=max_sequence_length, vae=vae_cfg, where=str(folder))

        from transformers import CLIPTextModel, T5EncoderModel

        transformer = loading.load_model(FluxTransformer2DModel, tdir, dtype=dtype, device=device, adapter="FLUX")
        clip_encoder = t5_encoder = None
        if load_text_encoders:
            clip_encoder = TextEncoder(CLIP_SLOT[0], tokenizers[CLIP_SLOT[1]], loading.load_model(
                CLIPTextModel, folder / CLIP_SLOT[0], dtype=dtype, device=device, frozen=True, adapter="FLUX"))
            t5_encoder = TextEncoder(T5_SLOT[0], tokenizers[T5_SLOT[1]], loading.load_model(
                T5EncoderModel, folder / T5_SLOT[0], dtype=dtype, device=device, frozen=True, adapter="FLUX"))
        vae = loading.load_model(AutoencoderKL, vae_dir, dtype=dtype, device=device, frozen=True, adapter="FLUX")
        adapter = cls(transformer.config, resolution=resolution, vae=vae, mu=mu, shift=shift, scheduler_config=sched,
                      clip_encoder=clip_encoder, t5_encoder=t5_encoder, max_sequence_length=max_sequence_length,
                      clip_max_length=clip_max, device=device, dtype=dtype, source=str(folder), **options)
        return adapter, transformer

    # -- the model call ------------------------------------------------------------------------
    def predict(self, backbone: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning,
                embedded_guidance: Tensor | None = None) -> Tensor:
        try:
            prompt_embeds = cond.tensors["prompt_embeds"]
            pooled = cond.tensors["pooled_prompt_embeds"]
        except KeyError:
            raise SenseflowError(f"FLUX conditioning needs 'prompt_embeds' and 'pooled_prompt_embeds', got "
                                 f"{sorted(cond.tensors)}: encode prompts with the FLUX adapter") from None
        n = x_t.shape[0]
        joint, pooled_dim = int(self.config["joint_attention_dim"]), int(self.config["pooled_projection_dim"])
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != joint or prompt_embeds.shape[0] != n:
            raise SenseflowError(f"prompt_embeds has shape {tuple(prompt_embeds.shape)} but the FLUX transformer needs "
                                 f"[{n}, tokens, {joint}]: the prompt cache was built for another model")
        if pooled.ndim != 2 or pooled.shape[-1] != pooled_dim or pooled.shape[0] != n:
            raise SenseflowError(f"pooled_prompt_embeds has shape {tuple(pooled.shape)} but the FLUX transformer "
                                 f"needs [{n}, {pooled_dim}]: the prompt cache was built for another model")
        c_in = int(self.config["in_channels"]) // 4
        if x_t.ndim != 4 or x_t.shape[1] != c_in or x_t.shape[2] % 2 or x_t.shape[3] % 2:
            raise SenseflowError(f"FLUX latents must be [B, {c_in}, H, W] with even H and W (unpacked VAE latents), "
                                 f"got {tuple(x_t.shape)}")
        guidance = self._guidance_for(backbone, embedded_guidance, n, x_t.device)
        t = as_time(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(n)
        dtype = loading.module_dtype(backbone)
        h, w = x_t.shape[-2:]
        kwargs: dict[str, Any] = {}
        if guidance is not None:
            kwargs["guidance"] = guidance
        out = backbone(
            hidden_states=pack_latents(x_t.to(dtype)),
            timestep=t.to(torch.float32),
            pooled_projections=pooled.to(device=x_t.device, dtype=dtype),
            encoder_hidden_states=prompt_embeds.to(device=x_t.device, dtype=dtype),
            txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=x_t.device),
            img_ids=latent_image_ids(h // 2, w // 2, device=x_t.device),
            return_dict=False,
            **kwargs,
        )[0]
        return unpack_latents(out, h, w).to(x_t.dtype)

    def _guidance_for(self, backbone: nn.Module, embedded: Tensor | None, n: int, device: torch.device) -> Tensor | None:
        """The ``guidance`` argument: the given value, the default, or ``None`` for a guidance-free backbone."""
        if not has_guidance_embedding(backbone):
            if embedded is not None:
                raise SenseflowError("this FLUX transformer has no guidance embedding (guidance_embeds=False: the "
                                     "guidance-free student / fake score), so it takes no embedded guidance: give "
                                     "guidance only to the teacher")
            return None
        if embedded is None:
            if self.default_embedded_guidance is None:
                raise SenseflowError("this FLUX transformer is guidance-distilled and needs an embedded guidance value "
                                     "(e.g. 3.5): set the method's guidance 'embedded' for it")
            embedded = torch.tensor(self.default_embedded_guidance)
        g = torch.as_tensor(embedded, dtype=torch.float32, device=device)
        return g.expand(n) if g.ndim == 0 else g.reshape(n)

    # -- prompts -------------------------------------------------------------------------------
    @property
    def has_text_encoders(self) -> bool:
        return self.clip_encoder is not None

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """``FluxPipeline.encode_prompt`` for a list of prompts (no_grad): T5 states + CLIP pooled output."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if self.clip_encoder is None or self.t5_encoder is None:
            raise SenseflowError("the FLUX adapter was loaded without text encoders (load_text_encoders=False): use a "
                                 "prompt cache, or load the teacher with its text encoders")
        with torch.no_grad():
            clip, t5 = self.clip_encoder, self.t5_encoder
            ids = clip.tokenizer(prompts, padding="max_length", max_length=self.clip_max_length, truncation=True,
                                 return_tensors="pt").input_ids.to(loading.module_device(clip.model))
            pooled = clip.model(ids, output_hidden_states=False).pooler_output
            ids = t5.tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                               return_tensors="pt").input_ids.to(loading.module_device(t5.model))
            prompt_embeds = t5.model(ids, output_hidden_states=False)[0]
        return Conditioning({"prompt_embeds": prompt_embeds.to(device=self.device, dtype=self.dtype),
                             "pooled_prompt_embeds": pooled.to(device=self.device, dtype=self.dtype)})

    def unconditional(self, batch_size: int) -> Conditioning:
        """The encoded empty prompt (``true_cfg`` only; cached after the first call), expanded to ``batch_size``."""
        if not self.true_cfg:
            raise SenseflowError("FLUX.1 is guidance-distilled and has no unconditional branch: guide the teacher with "
                                 "embedded guidance (guidance 'embedded': e.g. [1, 8]), not cfg, or set "
                                 "teacher.options.true_cfg: true (SiD-DiT's CFG on top of the guidance embedding)")
        if self._uncond is None:
            if not self.has_text_encoders:
                raise SenseflowError("FLUX true CFG needs the empty-prompt embedding but the text encoders are not "
                                     "loaded and none was cached: rebuild the prompt cache with "
                                     "teacher.options.true_cfg: true (`senseflow cache`), or load the text encoders")
            self._uncond = self.encode_prompts([""])
        return self._uncond.expand(batch_size)

    def release_text_encoders(self) -> None:
        """Drop the text encoders (after caching prompts) to free memory; with ``true_cfg`` the empty prompt stays."""
        if self.true_cfg and self.has_text_encoders and self._uncond is None:
            self._uncond = self.encode_prompts([""])
        self.clip_encoder = self.t5_encoder = None

    # -- latents -------------------------------------------------------------------------------
    # -- structure -----------------------------------------------------------------------------
    def feature_tap(self, backbone: nn.Module, layer: str | None = None) -> FeatureTap | None:
        """DMD2's GAN head reads the image stream of the middle double-stream block (or ``layer``).

        Both FLUX block kinds return ``(text, image)``; the image tokens are the 2x2-packed latent grid."""
        double = [n for n in self.block_names(backbone) if ".single_transformer_blocks." not in f".{n}"]
        blocks = double if layer is None else self.block_names(backbone)
        return self.token_grid_tap(backbone, blocks, layer, patch=2, index=1)

    def make_student(self, teacher_backbone: nn.Module) -> nn.Module:
        """The generator: a copy WITHOUT the guidance embedding (SenseFlow FLUX), unless ``student_guidance_embed``."""
        if self.student_guidance_embed:
            return copy.deepcopy(teacher_backbone)
        return without_guidance_embedding(teacher_backbone)

    def make_fake_score(self, teacher_backbone: nn.Module) -> nn.Module:
        """The fake score: like the student (official code: no guidance embedding), unless ``fake_guidance_embed``."""
        if self.fake_guidance_embed:
            return copy.deepcopy(teacher_backbone)
        return without_guidance_embedding(teacher_backbone)

    # -- devices -------------------------------------------------------------------------------
    def text_encoders(self) -> list:
        return [enc for enc in (self.clip_encoder, self.t5_encoder) if enc is not None]

    def __repr__(self) -> str:
        return (f"FluxAdapter(source={self.source!r}, resolution={self.resolution}, schedule={self.schedule}, "
                f"text_encoders={'yes' if self.has_text_encoders else 'no'}, "
                f"max_sequence_length={self.max_sequence_length}, "
                f"student_guidance_embed={self.student_guidance_embed}, fake_guidance_embed={self.fake_guidance_embed}, "
                f"true_cfg={self.true_cfg})")


# -------------------------------------------------------------------------------------------------
# the family descriptor (senseflow.teachers.registry)
# -------------------------------------------------------------------------------------------------
def draw_packed_renoise(draw, shape, dtype: torch.dtype) -> Tensor:
    """FluxPipeline's re-noise: drawn in the packed token layout ``[1, HW/4, 4C]``, unpacked to ``[1, C, H, W]``
    (moved from ``generate.ImageNoise.renoise``)."""
    c, h, w = shape
    return unpack_latents(draw((1, (h // 2) * (w // 2), 4 * c), dtype), h, w)


#: FluxPipeline's default (the export snippet passes a value only where the student needs another one)
PIPELINE_MAX_SEQUENCE_LENGTH = 512


def export_call_kwargs(student, call: dict) -> None:
    """FluxPipeline arguments beyond the common ones (moved from ``export_diffusers.pipeline_call``)."""
    if has_guidance_embedding(student.backbone):     # student_guidance_embed: the adapter's default value
        call["guidance_scale"] = float(student.adapter.default_embedded_guidance)
    max_sequence_length_kwarg(student.adapter, call, PIPELINE_MAX_SEQUENCE_LENGTH)


# -- senseflow bench (moved from bench/presets.py Preset methods) ---------------------------------------
def _bench_multiple(preset) -> int:
    return preset.vae_factor * 2


def _bench_tokens(preset, resolution: int) -> int:
    return (resolution // preset.vae_factor // 2) ** 2


def _bench_adapter(preset, resolution: int, device: torch.device, dtype: torch.dtype) -> "FluxAdapter":
    vae = {"latent_channels": preset.latent_channels, "block_out_channels": [1] * preset.vae_factor.bit_length(),
           "scaling_factor": 1.0, "shift_factor": 0.0}
    return FluxAdapter(preset.config, resolution=resolution, vae=vae, scheduler_config=preset.scheduler,
                       max_sequence_length=preset.text_tokens, device=device, dtype=dtype,
                       source=f"preset {preset.name}")


def _bench_inputs(preset, x, t, cond, resolution, device, dtype, config) -> dict:
    h, w = x.shape[-2:]
    kwargs = {"hidden_states": pack_latents(x), "timestep": t,
              "pooled_projections": cond.tensors["pooled_prompt_embeds"],
              "encoder_hidden_states": cond.tensors["prompt_embeds"],
              "txt_ids": torch.zeros(preset.text_tokens, 3, device=device),
              "img_ids": latent_image_ids(h // 2, w // 2, device=device), "return_dict": False}
    if config.get("guidance_embeds"):
        kwargs["guidance"] = torch.full((x.shape[0],), 3.5, device=device, dtype=torch.float32)
    return kwargs


#: FLUX.1-dev is guidance-distilled (no unconditional branch): the teacher gets an embedded guidance
#: value, the guidance-free student / fake score get none.  The value does not change the cost.
#: (moved from bench/presets.py FLUX_METHOD_DEFAULTS)
BENCH_METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "dmd2": {"real_guidance": {"embedded": 3.5}, "fake_guidance": {}},
    "senseflow": {"real_guidance": {"embedded": 3.5}, "fake_guidance": {}, "isg_guidance": {"embedded": 3.5}},
    "sid": {"teacher_guidance": {"embedded": 3.5}, "fake_guidance": {}, "fake_train_guidance": {}},
}


def _bench_student_config(preset) -> dict:
    """No guidance embedder in the trainable copies, as the adapter builds them."""
    return {**preset.config, "guidance_embeds": False}


def load_from_config(config, device: torch.device) -> tuple[FluxAdapter, nn.Module]:
    """FLUX.1: dynamic ``mu`` from the scheduler config; ``teacher.shift`` (if set) replaces it by a static shift."""
    from ..build import loader_kwargs

    return FluxAdapter.from_pretrained(config.paths.teacher, **loader_kwargs(config, device, shift=config.teacher.shift))


# -------------------------------------------------------------------------------------------------
# the original layouts (``senseflow export --format single-file / kohya-lora``)
# -------------------------------------------------------------------------------------------------
def _bfl_modules(config: Mapping[str, Any]) -> tuple[int, int]:
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    return inner, 4 * inner          # FluxSingleTransformerBlock's mlp_ratio is 4


def to_original(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """The transformer in Black Forest Labs' layout (``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1``).

    The inverse of diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``: fused q/k/v (and
    q/k/v/MLP-in in the single blocks' ``linear1``), RMSNorm ``scale`` keys, the final layer's
    (shift, scale) modulation.  A student (``guidance_embeds=False``) has no ``guidance_in``, as
    FLUX.1-schnell's file; ComfyUI's "Load Diffusion Model" reads it (models/diffusion_models).
    """
    from ..original_layout import KeyMap, block_ids, swap_halves

    m = KeyMap(state, "FLUX single-file export")
    for emb, dst in (("timestep_embedder", "time_in"), ("text_embedder", "vector_in"),
                     ("guidance_embedder", "guidance_in")):
        src = f"time_text_embed.{emb}."
        if emb != "guidance_embedder" or m.has(src + "linear_1.weight"):
            m.move(src + "linear_1", dst + ".in_layer")
            m.move(src + "linear_2", dst + ".out_layer")
    m.move("context_embedder", "txt_in")
    m.move("x_embedder", "img_in")
    for i in block_ids(state, "transformer_blocks"):
        d, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        m.move(d + "norm1.linear", o + "img_mod.lin")
        m.move(d + "norm1_context.linear", o + "txt_mod.lin")
        m.fuse([d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"], o + "img_attn.qkv")
        m.fuse([d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"], o + "txt_attn.qkv")
        m.move(d + "attn.norm_q.weight", o + "img_attn.norm.query_norm.scale")
        m.move(d + "attn.norm_k.weight", o + "img_attn.norm.key_norm.scale")
        m.move(d + "attn.norm_added_q.weight", o + "txt_attn.norm.query_norm.scale")
        m.move(d + "attn.norm_added_k.weight", o + "txt_attn.norm.key_norm.scale")
        m.move(d + "ff.net.0.proj", o + "img_mlp.0")
        m.move(d + "ff.net.2", o + "img_mlp.2")
        m.move(d + "ff_context.net.0.proj", o + "txt_mlp.0")
        m.move(d + "ff_context.net.2", o + "txt_mlp.2")
        m.move(d + "attn.to_out.0", o + "img_attn.proj")
        m.move(d + "attn.to_add_out", o + "txt_attn.proj")
    for i in block_ids(state, "single_transformer_blocks"):
        d, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        m.move(d + "norm.linear", o + "modulation.lin")
        m.fuse([d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"], o + "linear1")
        m.move(d + "attn.norm_q.weight", o + "norm.query_norm.scale")
        m.move(d + "attn.norm_k.weight", o + "norm.key_norm.scale")
        m.move(d + "proj_out", o + "linear2")
    m.move("proj_out", "final_layer.linear")
    for part in ("weight", "bias"):
        m.put(f"final_layer.adaLN_modulation.1.{part}", swap_halves(m.take(f"norm_out.linear.{part}")))
    return m.finish()


#: diffusers module (in a double / single block) -> BFL module, for the adapters that map one-to-one
_KOHYA_DOUBLE = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
                 "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0",
                 "ff_context.net.2": "txt_mlp.2", "norm1.linear": "img_mod.lin",
                 "norm1_context.linear": "txt_mod.lin"}
_KOHYA_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
_KOHYA_FUSED = {("transformer_blocks", "img_attn.qkv"): ("attn.to_q", "attn.to_k", "attn.to_v"),
                ("transformer_blocks", "txt_attn.qkv"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                ("single_transformer_blocks", "linear1"): ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}


def to_kohya(pairs: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """The adapters in kohya-ss sd-scripts' FLUX layout (``lora_unet_double_blocks_0_img_attn_qkv``, ...).

    BFL fuses q/k/v (and the single blocks' MLP-in) into one linear, so adapters on those parts
    become one block-sparse adapter of the summed rank (:func:`~senseflow.original_layout.fuse_lora`),
    which diffusers' ``_convert_kohya_flux_lora_to_diffusers`` splits back exactly.  Adapters outside
    the blocks (embedders, final layer) are refused: that converter does not file them under the
    transformer, so they could not be checked.
    """
    from ..original_layout import fuse_lora, kohya_name, put_kohya

    inner, mlp = _bfl_modules(config)
    out: dict[str, Tensor] = {}
    left = dict(pairs)
    for (blocks, fused), parts in _KOHYA_FUSED.items():
        ids = sorted({int(k.split(".")[1]) for k in pairs if k.startswith(blocks + ".")
                      and k.split(".", 2)[2] in parts})
        for i in ids:
            names = [f"{blocks}.{i}.{p}" for p in parts]
            dims = [inner, inner, inner, mlp][:len(parts)]
            down, up, scale = fuse_lora([left.pop(n, None) for n in names], dims, inner,
                                        f"FLUX kohya export, {blocks}.{i}")
            prefix = "double_blocks" if blocks == "transformer_blocks" else "single_blocks"
            put_kohya(out, kohya_name(f"{prefix}.{i}.{fused}"), down, up, scale)
    for name, (down, up, scale) in list(left.items()):
        head, _, rest = name.partition(".")
        index, _, sub = rest.partition(".")
        table = {"transformer_blocks": (_KOHYA_DOUBLE, "double_blocks"),
                 "single_transformer_blocks": (_KOHYA_SINGLE, "single_blocks")}.get(head)
        if table is None or sub not in table[0]:
            raise SenseflowError(f"FLUX kohya export: no kohya module diffusers reads back for the adapter on "
                                 f"{name!r} (kohya FLUX LoRAs cover the double / single blocks; retrain with "
                                 f"generator.lora.target_modules inside the blocks or use --format diffusers)")
        put_kohya(out, kohya_name(f"{table[1]}.{index}.{table[0][sub]}"), down, up, scale)
    return out


SINGLE_FILE = registry.SingleFileRecipe(
    to_original, loader="FluxTransformer2DModel",
    where="ComfyUI: models/diffusion_models (Load Diffusion Model), with the FLUX.1 CLIP-L / T5 and VAE loaded "
          "separately; it is guidance-free, like FLUX.1-schnell")
KOHYA_LORA = registry.KohyaLoraRecipe(
    to_kohya, where="ComfyUI: models/loras (LoraLoaderModelOnly) on the student base; diffusers: "
                    "FluxPipeline.load_lora_weights")


FAMILY = registry.FamilyDescriptor(
    name="flux",
    label="FLUX.1",
    load=load_from_config,
    backbone_classes=("FluxTransformer2DModel",),
    pipeline_class="FluxPipeline",
    pipeline_prefixes=("Flux",),
    noise=registry.NoiseRecipe("global", renoise=draw_packed_renoise),   # global RNG, packed re-noise
    export=registry.ExportRecipe(scheduler=flow_export_scheduler, step_kwargs=flow_step_kwargs,
                                 call_kwargs=export_call_kwargs, single_file=SINGLE_FILE,
                                 kohya_lora=KOHYA_LORA),
    bench=registry.BenchRecipe(_bench_multiple, _bench_tokens, _bench_adapter, _bench_inputs,
                                student_config=_bench_student_config, method_defaults=BENCH_METHOD_DEFAULTS),
    # target_modules: auto = the attention projections diffusers' LoRA training scripts target
    lora_targets=("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                  "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"),
)
