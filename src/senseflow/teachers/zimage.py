"""Z-Image (``ZImageTransformer2DModel`` + Qwen3 + ``AutoencoderKL``) teacher adapter, from a local diffusers folder.

Tongyi-MAI's Z-Image is a 6B single-stream DiT.  The model to distil is the BASE ``Z-Image`` (50
steps with CFG); ``Z-Image-Turbo`` is itself already an 8-step distilled model (Decoupled-DMD) and
is guidance-free -- a folder of either loads, but only the base is a sensible teacher.

What the stock ``ZImagePipeline`` (diffusers 0.42) does, and this adapter reproduces:

* prompts (``_encode_prompt``): each prompt is wrapped by the tokenizer's chat template
  (``apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
  enable_thinking=True)``), tokenized with ``padding="max_length"``, ``max_length=max_sequence_length``
  (512), ``truncation=True``; the text encoder (``Qwen3Model``) runs with the attention mask and the
  pipeline takes the PENULTIMATE hidden states (``hidden_states[-2]``), then keeps each prompt's
  unmasked tokens -- a list of variable-length ``[L_i, D]`` tensors.  A prompt cache needs fixed
  shapes, so the conditioning here is ``prompt_embeds`` ``[B, max_sequence_length, D]`` (zero after
  the prompt) plus the boolean ``prompt_attention_mask``; :meth:`ZImageAdapter.predict` hands the
  transformer exactly the pipeline's list (``embeds[i][mask[i]]``);
* the unconditional branch is the encoded negative prompt ``""`` (chat template included);
* latents ``[B, C, H, W]`` (``C = in_channels = 16``, ``H = W = resolution / vae_factor``) go to the
  transformer as a LIST of ``[C, 1, H, W]`` tensors (a frame axis of 1: ``unsqueeze(2)`` +
  ``unbind(0)``); the output list is stacked and squeezed back;
* time: the pipeline passes ``timestep = (1000 - 1000 sigma) / 1000 = 1 - sigma`` in float32 (the
  model multiplies by ``t_scale = 1000`` inside), and NEGATES the model output before the scheduler
  step (``noise_pred = -model_out``): the network predicts ``x0 - eps``, so senseflow's rectified-flow
  velocity is ``v = eps - x0 = -model_out`` and ``x0 = x_t - sigma v``;
* CFG: ``pred = pos + g (pos - neg)`` with ``guidance_scale = g`` (CFG on when ``g > 0``) -- senseflow's
  ``cfg = w`` is ``neg + w (pos - neg)``, i.e. ``w = g + 1`` (the pipeline's default 5.0 is ``cfg: 6``).
  ``cfg_truncation`` (``c``): no CFG at steps with ``1 - sigma > c``; ``cfg_normalization`` (``k > 0``):
  a sample's guided prediction is rescaled to at most ``k`` times the norm of its conditional one.
  Both are teacher options here (defaults = the pipeline's: off);
* schedule: the pipeline computes ``mu = calculate_shift((H/2)(W/2), ...)`` from the scheduler config
  and passes it; the scheduler uses it only with ``use_dynamic_shifting`` -- otherwise its static
  ``shift`` (Z-Image: 6.0, Z-Image-Turbo: 3.0) maps unit time to sigma;
* VAE (16 channels): ``decode(z) = vae.decode(z / scaling_factor + shift_factor)``, ``encode(x) =
  (z - shift) * scaling``; the resolution must be a multiple of ``2 x vae_factor`` (the pipeline's check);
* noise: the initial latents come from ``randn_tensor`` in float32 with the call's ``generator`` (none
  given: the global RNG) and ``scheduler.step``'s re-noise from the global RNG (the pipeline does not
  hand its generator to the step), latent-shaped: the stream is ``torch.manual_seed(seed)`` as for SD3.

Every shape is checked against the transformer config at load time, from the config files, before
any weights are read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..schedules import RectifiedFlow, as_time, expand_like
from . import loading, registry
from .base import NO_GUIDANCE, Conditioning, FeatureTap, Guidance, SenseflowError
from .common import (DiffusersFolderAdapter, ScaledShiftedVAE, SingleTextEncoder, calculate_shift_schedule,
                     flow_export_scheduler, flow_step_kwargs, max_sequence_length_kwarg)

TRANSFORMER_CLASS = "ZImageTransformer2DModel"
#: model_index.json names Qwen3Model; the released text_encoder/config.json says Qwen3ForCausalLM
TEXT_ENCODER_CLASSES: tuple[str, ...] = ("Qwen3Model", "Qwen3ForCausalLM")
VAE_CLASS = "AutoencoderKL"
#: ZImagePipeline's default max_sequence_length
DEFAULT_MAX_SEQUENCE_LENGTH = 512
#: the transformer pads every caption / image token sequence to a multiple of this (SEQ_MULTI_OF)
SEQ_MULTI_OF = 32
#: scheduler options that reshape the sigmas beyond the shift (the adapter would not reproduce them)
UNSUPPORTED_SCHEDULER_OPTIONS: tuple[str, ...] = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                                                  "use_beta_sigmas", "invert_sigmas")


@dataclass
class TextEncoder:
    """The Qwen3 text encoder with its (chat-template) tokenizer."""

    name: str
    tokenizer: Any
    model: nn.Module


def _pad32(n: int) -> int:
    return n + (-n) % SEQ_MULTI_OF


def check_dims(transformer: Mapping[str, Any], *, resolution: int, text: Mapping[str, Any] | None = None,
               max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH, vae: Mapping[str, Any] | None = None,
               where: str = "the Z-Image folder") -> None:
    """Check that text encoder, VAE, resolution and transformer fit together (config dicts); one-line errors."""
    cap = int(transformer["cap_feat_dim"])
    in_ch = int(transformer["in_channels"])
    patches = list(transformer.get("all_patch_size", (2,)))
    f_patches = list(transformer.get("all_f_patch_size", (1,)))
    if 2 not in patches or f_patches[patches.index(2)] != 1:
        raise SenseflowError(f"{where}: the Z-Image transformer has all_patch_size={patches} / all_f_patch_size="
                             f"{f_patches}, but ZImagePipeline calls it with patch_size=2, f_patch_size=1: this is "
                             f"not a Z-Image text-to-image checkpoint")
    dim, heads, axes = int(transformer["dim"]), int(transformer["n_heads"]), list(transformer["axes_dims"])
    if dim % heads or dim // heads != sum(axes):
        raise SenseflowError(f"{where}: the Z-Image transformer has dim={dim}, n_heads={heads} (head dim "
                             f"{dim / heads:g}) but axes_dims={axes} sum to {sum(axes)}: the config is broken")
    if max_sequence_length < 1:
        raise SenseflowError(f"max_sequence_length={max_sequence_length} is out of range: use 1 to 512 "
                             f"(ZImagePipeline's default: 512)")
    lens = [int(v) for v in transformer.get("axes_lens", (1024, 512, 512))]
    if _pad32(max_sequence_length) + 1 >= lens[0]:
        raise SenseflowError(f"max_sequence_length={max_sequence_length} needs {_pad32(max_sequence_length) + 2} "
                             f"rotary positions but the transformer's axes_lens[0]={lens[0]} in {where}: lower "
                             f"max_sequence_length")
    if text is not None:
        hidden = int(text["hidden_size"])
        if hidden != cap:
            raise SenseflowError(f"cap_feat_dim mismatch in {where}: the text encoder has hidden_size={hidden} but "
                                 f"the transformer's cap_feat_dim={cap}; the text encoder does not belong to this "
                                 f"transformer")
        if int(text.get("num_hidden_layers", 2)) < 2:
            raise SenseflowError(f"the text encoder in {where} has {text.get('num_hidden_layers')} layer(s), but "
                                 f"ZImagePipeline reads its penultimate hidden states (hidden_states[-2]): it needs "
                                 f"at least 2 layers")
    scale = 8
    if vae is not None:
        lat = int(vae["latent_channels"])
        if lat != in_ch:
            raise SenseflowError(f"the VAE has latent_channels={lat} but the transformer's in_channels={in_ch} in "
                                 f"{where}: the vae/ does not belong to this transformer")
        scale = 2 ** (len(vae["block_out_channels"]) - 1)
    if resolution <= 0 or resolution % (2 * scale) != 0:
        raise SenseflowError(f"resolution {resolution} is not a multiple of {2 * scale} (VAE factor {scale} x patch "
                             f"size 2, ZImagePipeline's check): pick a resolution divisible by {2 * scale}")
    side = resolution // scale // 2
    if side > min(lens[1], lens[2]):
        raise SenseflowError(f"resolution {resolution} gives {side} patches per side but the transformer's "
                             f"axes_lens={lens} allow {min(lens[1], lens[2])}: use a resolution of at most "
                             f"{min(lens[1], lens[2]) * scale * 2}")


def schedule_from_config(sched: Mapping[str, Any], image_seq_len: int, *, shift: float | None = None,
                         where: str = "the Z-Image folder") -> RectifiedFlow:
    """The teacher's schedule as ``ZImagePipeline`` + ``FlowMatchEulerDiscreteScheduler`` build it.

    ``shift`` (``teacher.shift``) replaces the scheduler's by a static shift.  Otherwise: dynamic
    shifting -> ``mu`` from ``calculate_shift`` at this resolution; else the static ``shift``.
    """
    if shift is not None:
        return RectifiedFlow(shift=float(shift))
    for key in UNSUPPORTED_SCHEDULER_OPTIONS:
        if sched.get(key):
            raise SenseflowError(f"{where}/scheduler sets {key}={sched[key]!r}, which reshapes the sigmas beyond the "
                                 f"shift and is not reproduced by the Z-Image adapter: remove it or set teacher.shift")
    if not sched.get("use_dynamic_shifting", False):          # the scheduler class's default
        return RectifiedFlow(shift=float(sched.get("shift", 1.0)))
    return calculate_shift_schedule(sched, image_seq_len, label="Z-Image", where=where, fix="set teacher.shift")


def chat_prompt(tokenizer, prompt: str) -> str:
    """The text ``ZImagePipeline._encode_prompt`` tokenizes: the user turn in the tokenizer's chat template."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True)


class ZImageAdapter(ScaledShiftedVAE, SingleTextEncoder, DiffusersFolderAdapter):
    """Z-Image family adapter (see module docstring)."""

    guidance_kinds = frozenset({"cfg"})
    family = "zimage"
    label = "Z-Image"
    #: the refiner blocks (image ``noise_refiner``, caption ``context_refiner``), then the main ``layers``
    block_lists = ("noise_refiner", "context_refiner", "layers")

    def __init__(self, transformer_config: Mapping[str, Any] | nn.Module, *, resolution: int,
                 vae: nn.Module | Mapping[str, Any], scheduler_config: Mapping[str, Any] | None = None,
                 shift: float | None = None, text_encoder: TextEncoder | None = None,
                 max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH, negative_prompt: str = "",
                 cfg_normalization: float = 0.0, cfg_truncation: float = 1.0,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 source: str | None = None) -> None:
        self.config = loading.config_of(transformer_config)
        self.resolution = int(resolution)
        self.source = source or "the Z-Image model"
        self.vae = vae if isinstance(vae, nn.Module) else None
        self.vae_config = loading.config_of(vae)
        self.text_encoder = text_encoder
        self.max_sequence_length = int(max_sequence_length)
        self.negative_prompt = str(negative_prompt)
        if float(cfg_normalization) < 0 or float(cfg_truncation) < 0:
            raise SenseflowError(f"cfg_normalization={cfg_normalization} / cfg_truncation={cfg_truncation} must be "
                                 f">= 0 (ZImagePipeline's defaults: 0 = off, 1.0 = CFG at every step)")
        self.cfg_normalization = float(cfg_normalization)
        self.cfg_truncation = float(cfg_truncation)
        if text_encoder is not None:
            tok = text_encoder.tokenizer
            if getattr(tok, "pad_token", None) is None:
                raise SenseflowError(f"the tokenizer of {self.source} has no pad token, but ZImagePipeline pads every "
                                     f"prompt to max_sequence_length: set pad_token in its tokenizer_config.json")
            if not getattr(tok, "chat_template", None):
                raise SenseflowError(f"the tokenizer of {self.source} has no chat_template, but ZImagePipeline wraps "
                                     f"every prompt in it: copy tokenizer_config.json / chat_template.jinja from the "
                                     f"original model")
        check_dims(self.config, resolution=self.resolution,
                   text=None if text_encoder is None else loading.config_of(text_encoder.model),
                   max_sequence_length=self.max_sequence_length, vae=self.vae_config, where=self.source)
        side = self.latent_shape()[-1]
        self.image_seq_len = (side // 2) ** 2
        self.schedule = schedule_from_config(scheduler_config or {}, self.image_seq_len, shift=shift,
                                             where=self.source)
        self.device = torch.device(device)
        self.dtype = dtype
        self._uncond: Conditioning | None = None

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, resolution: int, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, load_text_encoders: bool = True,
                        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH, shift: float | None = None,
                        **options: Any) -> tuple["ZImageAdapter", nn.Module]:
        """Load ``(adapter, ZImageTransformer2DModel teacher)`` from a local Z-Image folder (nothing is downloaded).

        ``shift`` overrides the scheduler (a static shift).  ``load_text_encoders=False`` skips the
        Qwen3 encoder (prompts then come from a prompt cache).  ``options``: ``negative_prompt``,
        ``cfg_normalization``, ``cfg_truncation`` (see the module docstring).
        """
        from diffusers import AutoencoderKL, ZImageTransformer2DModel

        folder = loading.as_folder(folder, "Z-Image teacher folder")
        index = loading.read_model_index(folder)
        loading.check_pipeline_family(folder, index, "zimage")
        tdir = loading.require_subfolder(
            folder, "transformer", hint="a Z-Image diffusers folder needs transformer/ (ZImageTransformer2DModel)")
        tcfg = loading.check_model_class(tdir, TRANSFORMER_CLASS, adapter="Z-Image")
        loading.require_keys(tcfg, ("cap_feat_dim", "in_channels", "dim", "n_heads", "axes_dims"), tdir)
        sched = loading.read_scheduler_config(folder)
        vae_dir = loading.require_subfolder(folder, "vae", hint="a Z-Image diffusers folder needs vae/ (AutoencoderKL)")
        vae_cfg = loading.check_model_class(vae_dir, VAE_CLASS, adapter="Z-Image")
        text_cfg, tokenizer, text_class = None, None, TEXT_ENCODER_CLASSES[0]
        if load_text_encoders:
            if not loading.component_present(folder, index, "text_encoder"):
                raise SenseflowError(f"{folder} has no text_encoder/: Z-Image needs its Qwen3 encoder; add it, or "
                                     f"pass load_text_encoders=False and use a prompt cache")
            text_cfg = loading.check_model_class(folder / "text_encoder", TEXT_ENCODER_CLASSES, adapter="Z-Image")
            if not loading.component_present(folder, index, "tokenizer"):
                raise SenseflowError(f"{folder} has no tokenizer/: Z-Image needs the Qwen tokenizer (with its chat "
                                     f"template); copy tokenizer/ from the original model")
            tokenizer = loading.load_tokenizer(folder / "tokenizer")
            declared = (index or {}).get("text_encoder")
            if isinstance(declared, (list, tuple)) and len(declared) == 2 and declared[1] in TEXT_ENCODER_CLASSES:
                text_class = str(declared[1])          # the class the pipeline instantiates
        check_dims(tcfg, resolution=resolution, text=text_cfg, max_sequence_length=max_sequence_length,
                   vae=vae_cfg, where=str(folder))

        transformer = loading.load_model(ZImageTransformer2DModel, tdir, dtype=dtype, device=device,
                                         adapter="Z-Image")
        text_encoder = None
        if load_text_encoders:
            import transformers

            model = loading.load_model(getattr(transformers, text_class), folder / "text_encoder",
                                       expected_class=TEXT_ENCODER_CLASSES, dtype=dtype, device=device, frozen=True,
                                       adapter="Z-Image")
            text_encoder = TextEncoder("text_encoder", tokenizer, model)
        vae = loading.load_model(AutoencoderKL, vae_dir, dtype=dtype, device=device, frozen=True, adapter="Z-Image")
        adapter = cls(transformer.config, resolution=resolution, vae=vae, scheduler_config=sched, shift=shift,
                      text_encoder=text_encoder, max_sequence_length=max_sequence_length, device=device,
                      dtype=dtype, source=str(folder), **options)
        return adapter, transformer

    # -- the model call ------------------------------------------------------------------------
    def _caption_list(self, cond: Conditioning, n: int, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
        """The pipeline's variable-length prompt-embeds list from the padded embeds + mask."""
        try:
            embeds = cond.tensors["prompt_embeds"]
            mask = cond.tensors["prompt_attention_mask"]
        except KeyError:
            raise SenseflowError(f"Z-Image conditioning needs 'prompt_embeds' and 'prompt_attention_mask', got "
                                 f"{sorted(cond.tensors)}: encode prompts with the Z-Image adapter") from None
        cap = int(self.config["cap_feat_dim"])
        if embeds.ndim != 3 or embeds.shape[-1] != cap or embeds.shape[0] != n:
            raise SenseflowError(f"prompt_embeds has shape {tuple(embeds.shape)} but the Z-Image transformer needs "
                                 f"[{n}, tokens, {cap}]: the prompt cache was built for another model")
        if tuple(mask.shape) != tuple(embeds.shape[:2]):
            raise SenseflowError(f"prompt_attention_mask has shape {tuple(mask.shape)} but prompt_embeds has "
                                 f"{tuple(embeds.shape[:2])} tokens")
        mask = mask.to(device).bool()
        if not bool(mask.any(dim=1).all()):
            raise SenseflowError("a prompt has no tokens (prompt_attention_mask all false): the prompt cache is broken")
        embeds = embeds.to(device=device, dtype=dtype)
        return [embeds[i][mask[i]] for i in range(n)]

    def predict(self, backbone: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning,
                embedded_guidance: Tensor | None = None) -> Tensor:
        if embedded_guidance is not None:
            raise SenseflowError("Z-Image has no guidance embedding: use cfg guidance")
        n = x_t.shape[0]
        c_in = int(self.config["in_channels"])
        if x_t.ndim != 4 or x_t.shape[1] != c_in or x_t.shape[2] % 2 or x_t.shape[3] % 2:
            raise SenseflowError(f"Z-Image latents must be [B, {c_in}, H, W] with even H and W, got {tuple(x_t.shape)}")
        dtype = loading.module_dtype(backbone)
        caps = self._caption_list(cond, n, x_t.device, dtype)
        t = as_time(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(n)
        # the pipeline: timesteps = float32(sigma) * 1000, then timestep = (1000 - timesteps) / 1000
        ts = t.to(torch.float32) * 1000.0
        timestep = (1000.0 - ts) / 1000.0
        images = list(x_t.to(dtype).unsqueeze(2).unbind(dim=0))
        out = backbone(images, timestep, caps, return_dict=False)[0]
        model_out = torch.stack([o.float() for o in out], dim=0).squeeze(2)
        return (-model_out).to(x_t.dtype)                 # the pipeline's noise_pred = -model_out

    def predict_native(self, backbone: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning,
                       guidance: Guidance | None = None) -> Tensor:
        """CFG as ``ZImagePipeline``: plain ``u + w (c - u)``, plus its ``cfg_truncation`` / ``cfg_normalization``."""
        guidance = guidance or NO_GUIDANCE
        plain = self.cfg_normalization <= 0 and self.cfg_truncation >= 1.0
        if not guidance.uses_cfg or plain:
            return super().predict_native(backbone, x_t, t, cond, guidance)
        t = as_time(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        n = x_t.shape[0]
        uncond = self.unconditional(n).to(x_t.device)
        both = self.predict(backbone, torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([cond, uncond]))
        pos, neg = both[:n].float(), both[n:].float()
        w = as_time(guidance.cfg, device=x_t.device).to(torch.float32).expand(n).clone()
        # the pipeline's t_norm = (1000 - timestep) / 1000 with timestep = float32(sigma) * 1000
        t_norm = (1000.0 - t.to(torch.float32) * 1000.0) / 1000.0
        guided = (t_norm <= self.cfg_truncation) & (w != 1.0)
        pred = pos + expand_like(w - 1.0, pos) * (pos - neg)          # pos + g (pos - neg), g = w - 1
        if self.cfg_normalization > 0:
            dims = tuple(range(1, pos.ndim))
            pos_norm = torch.linalg.vector_norm(pos, dim=dims)
            new_norm = torch.linalg.vector_norm(pred, dim=dims)
            cap = pos_norm * self.cfg_normalization
            scale = torch.where(new_norm > cap, cap / new_norm, torch.ones_like(new_norm))
            pred = pred * expand_like(scale, pred)
        pred = torch.where(guided.view(-1, *([1] * (pred.ndim - 1))), pred, pos)
        return pred.to(both.dtype)

    # -- prompts -------------------------------------------------------------------------------
    @property
    def has_text_encoders(self) -> bool:
        return self.text_encoder is not None

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """``ZImagePipeline._encode_prompt`` for a list of prompts (no_grad), padded + masked (see module docstring)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        enc = self.text_encoder
        if enc is None:
            raise SenseflowError("the Z-Image adapter was loaded without its text encoder (load_text_encoders=False): "
                                 "use a prompt cache, or load the teacher with its text encoder")
        texts = [chat_prompt(enc.tokenizer, p) for p in prompts]
        tokens = enc.tokenizer(texts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                               return_tensors="pt")
        device = loading.module_device(enc.model)
        mask = tokens.attention_mask.to(device).bool()
        with torch.no_grad():
            hidden = enc.model(input_ids=tokens.input_ids.to(device), attention_mask=mask,
                               output_hidden_states=True).hidden_states[-2]
        hidden = hidden.masked_fill(~mask[..., None], 0.0)
        return Conditioning({"prompt_embeds": hidden.to(device=self.device, dtype=self.dtype),
                             "prompt_attention_mask": mask.to(self.device)})

    def unconditional(self, batch_size: int) -> Conditioning:
        """The encoded ``negative_prompt`` (``""``, chat template included; cached), expanded to ``batch_size``."""
        if self._uncond is None:
            if self.text_encoder is None:
                raise SenseflowError("the Z-Image adapter has no text encoder and no cached empty-prompt embedding: "
                                     "call set_unconditional() with the prompt cache's entry for \"\"")
            self._uncond = self.encode_prompts([self.negative_prompt])
        return self._uncond.expand(batch_size)

    # -- latents -------------------------------------------------------------------------------
    # -- structure -----------------------------------------------------------------------------
    def main_block_names(self, backbone: nn.Module) -> list[str]:
        """The single-stream ``layers`` (image + caption tokens), without the refiners."""
        return [n for n in self.block_names(backbone) if n.rsplit(".", 2)[-2] == "layers"]

    def output_norm_name(self, backbone: nn.Module) -> str | None:
        """The final layer's ``norm_final`` (patch 2, frame patch 1): it sees the unified [image, caption] tokens."""
        name = loading.find_module_name(backbone, "all_final_layer", (nn.ModuleDict,))
        return None if name is None else f"{name}.2-1.norm_final"

    def feature_tap(self, backbone: nn.Module, layer: str | None = None) -> FeatureTap | None:
        """None: every Z-Image block outputs image AND caption tokens in one sequence (and pads the image tokens
        to a multiple of 32), which DMD2's token-grid GAN head cannot read; give ``method.gan_head.*``."""
        return None

    # -- devices -------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (f"ZImageAdapter(source={self.source!r}, resolution={self.resolution}, schedule={self.schedule}, "
                f"text_encoder={'yes' if self.text_encoder else 'no'}, max_sequence_length={self.max_sequence_length}, "
                f"cfg_normalization={self.cfg_normalization}, cfg_truncation={self.cfg_truncation})")


# -------------------------------------------------------------------------------------------------
# the family descriptor (senseflow.teachers.registry)
# -------------------------------------------------------------------------------------------------
#: ZImagePipeline's default (the export snippet passes a value only where the student needs another one)
PIPELINE_MAX_SEQUENCE_LENGTH = DEFAULT_MAX_SEQUENCE_LENGTH


def export_call_kwargs(student, call: dict) -> None:
    """ZImagePipeline arguments beyond the common ones.

    ``guidance_scale=0``: ZImagePipeline runs CFG whenever ``guidance_scale > 0`` (``pos + g (pos - neg)``),
    so the common ``guidance_scale=1`` would double the conditional branch; the student is guidance-free.
    """
    call["guidance_scale"] = 0.0
    max_sequence_length_kwarg(student.adapter, call, PIPELINE_MAX_SEQUENCE_LENGTH)


# -- senseflow bench --------------------------------------------------------------------------------
def _bench_multiple(preset) -> int:
    return preset.vae_factor * 2


def _bench_tokens(preset, resolution: int) -> int:
    """Image tokens + caption tokens: one single-stream sequence (both padded to a multiple of 32)."""
    return _pad32((resolution // preset.vae_factor // 2) ** 2) + _pad32(preset.text_tokens)


def _bench_adapter(preset, resolution: int, device: torch.device, dtype: torch.dtype) -> "ZImageAdapter":
    from ..bench.presets import LatentSpace

    adapter = ZImageAdapter(preset.config, resolution=resolution,
                            vae=LatentSpace(preset.latent_channels, preset.vae_factor),
                            scheduler_config=preset.scheduler, max_sequence_length=preset.text_tokens,
                            device=device, dtype=dtype, source=f"preset {preset.name}")
    adapter.set_unconditional(preset.conditioning(1, device, dtype, seed=1))
    return adapter


def _bench_conditioning(preset, batch: int, generator: torch.Generator, device, dtype) -> Conditioning:
    """``text_tokens`` caption tokens per prompt (every one unmasked: the pipeline's 512-token upper bound)."""
    embeds = torch.randn(batch, preset.text_tokens, preset.text_dim, generator=generator)
    mask = torch.ones(batch, preset.text_tokens, dtype=torch.bool)
    return Conditioning({"prompt_embeds": embeds.to(device=device, dtype=dtype),
                         "prompt_attention_mask": mask.to(device)})


class _LatentList(list):
    """The transformer's per-image latent list that, like a tensor, can be made to require gradients
    (``senseflow bench --estimate-memory`` does that to the first input for SiD's teacher pass)."""

    def requires_grad_(self, requires_grad: bool = True) -> "_LatentList":
        for item in self:
            item.requires_grad_(requires_grad)
        return self


def _bench_inputs(preset, x, t, cond, resolution, device, dtype, config) -> dict:
    caps = list(cond.tensors["prompt_embeds"].unbind(dim=0))   # every token unmasked (boolean indexing fails on meta)
    images = _LatentList(xi.clone() for xi in x.unsqueeze(2).unbind(dim=0))   # leaves: [C, 1, H, W] each
    return {"x": images, "t": 1.0 - t, "cap_feats": caps, "return_dict": False}


def load_from_config(config, device: torch.device) -> tuple[ZImageAdapter, nn.Module]:
    """Z-Image: the scheduler's shift (static, or dynamic ``mu``); ``teacher.shift`` replaces it by a static one."""
    from ..build import loader_kwargs

    return ZImageAdapter.from_pretrained(config.paths.teacher,
                                         **loader_kwargs(config, device, shift=config.teacher.shift))


# -- senseflow export --format single-file ----------------------------------------------------------
#: diffusers -> Tongyi-MAI's original names: the inverse of the renames in diffusers'
#: ``convert_z_image_transformer_checkpoint_to_diffusers`` (``Z_IMAGE_KEYS_RENAME_DICT``)
_ZIMAGE_RENAMES = ((".attention.to_out.0.", ".attention.out."), (".attention.norm_q.", ".attention.q_norm."),
                   (".attention.norm_k.", ".attention.k_norm."))


def to_original(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """The student in Z-Image's original single-file layout (``layers.N.attention.qkv``, ``x_embedder``, ...).

    The inverse of diffusers' ``convert_z_image_transformer_checkpoint_to_diffusers``: q / k / v fused
    row-wise into ``attention.qkv`` (that converter splits it in three equal chunks), ``to_out.0`` ->
    ``out``, ``norm_q`` / ``norm_k`` -> ``q_norm`` / ``k_norm``, and the patch-2 / frame-patch-1
    embedder and final layer (``all_x_embedder.2-1`` / ``all_final_layer.2-1``, the only ones that
    converter names) -> ``x_embedder`` / ``final_layer``; every other key is kept.  Refused: other patch
    sizes, grouped-query attention (unequal q / k / v rows) and q / k / v biases, which that reader
    cannot split back.
    """
    from ..original_layout import KeyMap

    patches = (tuple(config.get("all_patch_size", (2,))), tuple(config.get("all_f_patch_size", (1,))))
    if patches != ((2,), (1,)):
        raise SenseflowError(f"Z-Image single-file export: patch sizes {patches[0]} / frame patch sizes {patches[1]} "
                             f"have no original single-file name diffusers reads back (only 2 / 1); use "
                             f"--format diffusers")
    if config.get("n_kv_heads", config.get("n_heads")) != config.get("n_heads"):
        raise SenseflowError("Z-Image single-file export: grouped-query attention (n_kv_heads != n_heads) cannot be "
                             "fused into the original qkv that diffusers splits in three equal parts; use "
                             "--format diffusers")
    m = KeyMap(state, "Z-Image single-file export")
    for key in list(m.state):
        if key not in m.state:
            continue
        if key.endswith(".attention.to_q.weight"):
            head = key[:-len("to_q.weight")]
            m.fuse([head + "to_q", head + "to_k", head + "to_v"], head + "qkv", bias=False)
            continue
        if key.endswith((".attention.to_q.bias", ".attention.to_k.bias", ".attention.to_v.bias")):
            continue        # left in the map: finish() refuses it (the reader fuses weights only)
        new = key
        for prefix, original in (("all_x_embedder.2-1.", "x_embedder."), ("all_final_layer.2-1.", "final_layer.")):
            if new.startswith(prefix):
                new = original + new[len(prefix):]
        for src, dst in _ZIMAGE_RENAMES:
            new = new.replace(src, dst)
        m.move(key, new)
    return m.finish()


SINGLE_FILE = registry.SingleFileRecipe(
    to_original, loader=TRANSFORMER_CLASS,
    where="ComfyUI: models/diffusion_models (Load Diffusion Model), with the Qwen3 text encoder and the FLUX.1 "
          "VAE (ae.safetensors) loaded separately")


def to_kohya(pairs: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """The adapters in kohya's Z-Image layout with diffusers' module path in ``_``
    (``lora_unet_layers_0_attention_to_q``, ``lora_unet_noise_refiner_0_attention_to_out_0``): q / k / v stay
    separate (no fused ``qkv``, which diffusers reads only in the dotted ``.lora.down`` form).  diffusers'
    ``_convert_non_diffusers_z_image_lora_to_diffusers`` (``ZImagePipeline.load_lora_weights``) reads it
    back; each name is checked against it first."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_z_image_lora_to_diffusers

    from ..original_layout import kohya_same_names

    return kohya_same_names(pairs, _convert_non_diffusers_z_image_lora_to_diffusers, "Z-Image kohya export")


KOHYA_LORA = registry.KohyaLoraRecipe(
    to_kohya, where="ComfyUI: models/loras (LoraLoaderModelOnly) on the student base; diffusers: "
                    "ZImagePipeline.load_lora_weights")


FAMILY = registry.FamilyDescriptor(
    name="zimage",
    label="Z-Image",
    load=load_from_config,
    backbone_classes=(TRANSFORMER_CLASS,),
    pipeline_class="ZImagePipeline",
    pipeline_prefixes=("ZImage",),
    noise=registry.NoiseRecipe("global"),   # float32 latents from randn_tensor (global RNG), re-noise: global RNG
    export=registry.ExportRecipe(scheduler=flow_export_scheduler, step_kwargs=flow_step_kwargs,
                                 call_kwargs=export_call_kwargs, single_file=SINGLE_FILE,
                                 kohya_lora=KOHYA_LORA),
    bench=registry.BenchRecipe(_bench_multiple, _bench_tokens, _bench_adapter, _bench_inputs,
                                conditioning=_bench_conditioning),
    # target_modules: auto = diffusers' examples/dreambooth/train_dreambooth_lora_z_image.py default
    lora_targets=("to_k", "to_q", "to_v", "to_out.0"),
)
