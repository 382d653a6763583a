"""Stable Diffusion XL (``UNet2DConditionModel``, ``addition_embed_type="text_time"``) teacher adapter.

What the stock ``StableDiffusionXLPipeline`` (diffusers 0.42) does, and this adapter reproduces:

* the UNet is called as ``unet(x_t, t, encoder_hidden_states=prompt_embeds, added_cond_kwargs=
  {"text_embeds": pooled, "time_ids": time_ids}, return_dict=False)[0]`` with the INTEGER training
  index ``t in {0..999}`` (the schedulers hand the UNet their discrete timesteps; the UNet's
  sinusoidal embedding upcasts it to float, so it is passed as float32 here).  ``DDPM``'s clean
  index ``-1`` must never reach the UNet (one-line error).  The prediction is ``epsilon`` (SDXL-base)
  or ``v`` (``prediction_type="v_prediction"`` checkpoints), as the scheduler config says;
* schedule: ``DDPM`` from the scheduler config's ``beta_start``/``beta_end``/``beta_schedule``
  (``scaled_linear`` 0.00085..0.012 for SDXL: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``);
  anchors 999/749/499/249 come from ``DDPM.from_unit`` in the generator, nothing to do here;
* prompts: both CLIP encoders' penultimate hidden states (``hidden_states[-2]``, each tokenizer
  padding to its own ``model_max_length``) concatenated on the feature dim (``prompt_embeds``), the
  pooled ``text_embeds`` of ``text_encoder_2`` (``pooled_prompt_embeds``), and the micro-conditioning
  ``time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w) = (res, res, 0, 0, res, res)``;
* unconditional branch: with ``force_zeros_for_empty_prompt`` (``model_index.json``; True for
  SDXL-base and the DMD2 convention) ZERO ``prompt_embeds`` and ``pooled_prompt_embeds`` with the same
  ``time_ids``; otherwise the encoded empty prompt;
* VAE: ``decode(z) = vae.decode(z / scaling_factor)`` (or ``z * std / scaling + mean`` when the VAE
  config has ``latents_mean``/``latents_std``), no shift.  The SDXL VAE overflows in float16
  (``force_upcast``): a float16 load keeps the VAE in float32, as the pipeline upcasts it.

Only SDXL-base-style folders are supported (two text encoders, 6 time ids); the refiner (aesthetic
score, one encoder) is refused with a message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..released import ReleasedForms
from ..schedules import DDPM, as_time
from . import loading, registry
from .base import Conditioning, FeatureTap, SenseflowError
from .common import DiffusersFolderAdapter

UNET_CLASS = "UNet2DConditionModel"
CLIP_CLASSES: tuple[str, str] = ("CLIPTextModel", "CLIPTextModelWithProjection")
VAE_CLASS = "AutoencoderKL"
#: (encoder, tokenizer) subfolders in the pipeline's order
CLIP_SLOTS: tuple[tuple[str, str], ...] = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
#: scheduler prediction_type -> schedules.Prediction
PREDICTIONS: dict[str, str] = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}


@dataclass
class TextEncoder:
    """One loaded CLIP text encoder with its tokenizer."""

    name: str
    tokenizer: Any
    model: nn.Module


def schedule_from_config(sched: Mapping[str, Any], prediction: str | None = None,
                         where: str = "the SDXL folder") -> DDPM:
    """``DDPM`` from a diffusers scheduler config (SDXL's defaults where a key is missing)."""
    if sched.get("rescale_betas_zero_snr"):
        raise SenseflowError(f"{where}/scheduler uses rescale_betas_zero_snr (alpha_T = 0), which the DDPM schedule "
                             f"does not support")
    if sched.get("trained_betas") is not None:
        raise SenseflowError(f"{where}/scheduler has trained_betas, which the SDXL adapter does not support")
    kind = str(sched.get("beta_schedule", "scaled_linear"))
    start, end = float(sched.get("beta_start", 0.00085)), float(sched.get("beta_end", 0.012))
    T = int(sched.get("num_train_timesteps", 1000))
    if prediction is None:
        ptype = str(sched.get("prediction_type", "epsilon"))
        if ptype not in PREDICTIONS:
            raise SenseflowError(f"{where}/scheduler has prediction_type={ptype!r}; SDXL models predict "
                                 f"{' or '.join(PREDICTIONS)}")
        prediction = PREDICTIONS[ptype]
    if kind == "scaled_linear":
        return DDPM.scaled_linear(start, end, T, prediction=prediction)
    if kind == "linear":
        betas = torch.linspace(start, end, T, dtype=torch.float64)
        return DDPM(torch.cumprod(1.0 - betas, dim=0), prediction=prediction)
    raise SenseflowError(f"{where}/scheduler has beta_schedule={kind!r}; the SDXL adapter supports scaled_linear "
                         f"and linear")


def check_dims(unet: Mapping[str, Any], *, resolution: int, clip: Sequence[Mapping[str, Any]] = (),
               clip_max_lengths: Sequence[int | None] = (), vae: Mapping[str, Any] | None = None,
               where: str = "the SDXL folder") -> None:
    """Check that encoders, VAE, resolution and UNet fit together (config dicts); one-line ``SenseflowError``."""
    if unet.get("addition_embed_type") != "text_time":
        raise SenseflowError(f"{where}: the UNet has addition_embed_type={unet.get('addition_embed_type')!r}, not "
                             f"'text_time': this is not an SDXL UNet (SD 1.x/2.x are not supported)")
    cross = unet.get("cross_attention_dim")
    cross = int(cross[0] if isinstance(cross, (list, tuple)) else cross)
    time_dim = int(unet.get("addition_time_embed_dim") or 256)
    proj_in = unet.get("projection_class_embeddings_input_dim")
    if clip:
        widths = [int(c["hidden_size"]) for c in clip]
        if sum(widths) != cross:
            raise SenseflowError(f"cross_attention_dim mismatch in {where}: the CLIP encoders' hidden sizes "
                                 f"{'+'.join(map(str, widths))}={sum(widths)} do not match the UNet's "
                                 f"cross_attention_dim={cross}; the text encoders do not belong to this UNet")
        pooled = int(clip[-1].get("projection_dim", clip[-1]["hidden_size"]))
        if proj_in is not None and int(proj_in) != 6 * time_dim + pooled:
            hint = (" (5 time ids + a 1280-d pooled embedding: this is the SDXL refiner, which is not supported)"
                    if int(proj_in) == 5 * time_dim + pooled else "")
            raise SenseflowError(f"projection_class_embeddings_input_dim mismatch in {where}: the UNet expects "
                                 f"{proj_in} but 6 time ids x {time_dim} + the pooled {pooled} = "
                                 f"{6 * time_dim + pooled}{hint}")
        for c, n in zip(clip, clip_max_lengths):
            n_pos = int(c.get("max_position_embeddings", 77))
            if n is not None and n > n_pos:
                raise SenseflowError(f"a CLIP tokenizer pads to {n} tokens but its encoder has "
                                     f"max_position_embeddings={n_pos} in {where}: set the tokenizer's "
                                     f"model_max_length to {n_pos}")
    in_ch = int(unet["in_channels"])
    scale = 8          # the pipeline's default VAE factor when there is no vae/
    if vae is not None:
        lat = int(vae["latent_channels"])
        if lat != in_ch:
            raise SenseflowError(f"the VAE has latent_channels={lat} but the UNet's in_channels={in_ch} in {where}: "
                                 f"the vae/ does not belong to this UNet")
        scale = 2 ** (len(vae["block_out_channels"]) - 1)
    down = 2 ** max(0, len(unet.get("down_block_types", ())) - 1)
    if resolution <= 0 or resolution % (scale * down) != 0:
        raise SenseflowError(f"resolution {resolution} is not a multiple of {scale * down} (VAE factor {scale} x UNet "
                             f"downsampling {down}): pick a resolution divisible by {scale * down}")


class SDXLAdapter(DiffusersFolderAdapter):
    """SDXL family adapter (see module docstring)."""

    guidance_kinds = frozenset({"cfg"})
    family = "sdxl"
    label = "SDXL"
    #: released trainer_sdxl_senseflow.py: omega = sqrt(abar_t); ISG reduces to an x0 regression onto the
    #: CFG teacher (get_isg_guidance rebuilds x0 at x_mid from the teacher's eps); t_mid an integer index
    released = ReleasedForms(omega="alpha", isg_form="x0_regression", isg_grid="unit_index")

    def __init__(self, unet_config: Mapping[str, Any] | nn.Module, *, resolution: int,
                 schedule: DDPM | None = None, clip_encoders: Sequence[TextEncoder] = (),
                 vae: nn.Module | Mapping[str, Any] | None = None, zero_unconditional: bool = True,
                 uncond_tokens: int = 77, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 source: str | None = None) -> None:
        self.config = loading.config_of(unet_config)
        self.resolution = int(resolution)
        self.schedule = schedule if schedule is not None else DDPM.scaled_linear()
        self.source = source or "the SDXL model"
        self.clip_encoders = list(clip_encoders)
        if self.clip_encoders and len(self.clip_encoders) != len(CLIP_SLOTS):
            raise SenseflowError("SDXL needs both CLIP text encoders (text_encoder/ and text_encoder_2/)")
        self.vae = vae if isinstance(vae, nn.Module) else None
        self.vae_config = None if vae is None else loading.config_of(vae)
        self.clip_max_lengths = [
            loading.tokenizer_max_length(e.tokenizer, fallback=int(loading.config_of(e.model).get(
                "max_position_embeddings", 77))) for e in self.clip_encoders]
        for enc in self.clip_encoders:
            if getattr(enc.tokenizer, "pad_token", None) is None:
                raise SenseflowError(f"the {enc.name} tokenizer of {self.source} has no pad token, but SDXL pads every "
                                     f"prompt to a fixed length: set pad_token in its tokenizer_config.json")
        check_dims(self.config, resolution=self.resolution, clip=[loading.config_of(e.model) for e in self.clip_encoders],
                   clip_max_lengths=self.clip_max_lengths, vae=self.vae_config, where=self.source)
        self.zero_unconditional = bool(zero_unconditional)
        self.uncond_tokens = int(self.clip_max_lengths[0]) if self.clip_max_lengths else int(uncond_tokens)
        self.device = torch.device(device)
        self.dtype = dtype
        self._uncond: Conditioning | None = None

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, resolution: int, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, load_text_encoders: bool = True,
                        prediction: str | None = None, zero_unconditional: bool | None = None,
                        ) -> tuple["SDXLAdapter", nn.Module]:
        """Load ``(adapter, UNet2DConditionModel teacher)`` from a local SDXL diffusers folder (nothing is downloaded).

        ``prediction`` overrides the scheduler's ``prediction_type`` (``"epsilon"`` / ``"v"``);
        ``zero_unconditional`` overrides ``model_index.json``'s ``force_zeros_for_empty_prompt``
        (default True).  ``load_text_encoders=False`` skips the encoders (prompt cache; the zero
        unconditional needs none).
        """
        from diffusers import AutoencoderKL, UNet2DConditionModel

        folder = loading.as_folder(folder, "SDXL teacher folder")
        index = loading.read_model_index(folder)
        loading.check_pipeline_family(folder, index, "sdxl")
        udir = loading.require_subfolder(
            folder, "unet", hint="an SDXL diffusers folder needs unet/ (UNet2DConditionModel)")
        ucfg = loading.check_model_class(udir, UNET_CLASS, adapter="SDXL")
        loading.require_keys(ucfg, ("in_channels", "cross_attention_dim"), udir)
        if prediction is not None and prediction not in ("epsilon", "v", "x0"):
            raise SenseflowError(f"prediction={prediction!r}: SDXL models predict 'epsilon' or 'v'")
        schedule = schedule_from_config(loading.read_scheduler_config(folder), prediction, where=str(folder))
        if zero_unconditional is None:
            zero_unconditional = bool((index or {}).get("force_zeros_for_empty_prompt", True))

        vae_dir = folder / "vae"
        vae_cfg = loading.check_model_class(vae_dir, VAE_CLASS, adapter="SDXL") \
            if loading.component_present(folder, index, "vae") else None
        clip_cfgs: list[dict[str, Any]] = []
        tokenizers: dict[str, Any] = {}
        if load_text_encoders:
            for (enc, tok), klass in zip(CLIP_SLOTS, CLIP_CLASSES):
                if not loading.component_present(folder, index, enc):
                    raise SenseflowError(f"{folder} has no {enc}/: SDXL needs both CLIP encoders (text_encoder/ and "
                                         f"text_encoder_2/); add it, or pass load_text_encoders=False and use a "
                                         f"prompt cache")
                clip_cfgs.append(loading.check_model_class(folder / enc, klass, adapter="SDXL"))
                tokenizers[tok] = loading.load_tokenizer(folder / tok)
        clip_max = [loading.tokenizer_max_length(tokenizers[tok], fallback=int(c.get("max_position_embeddings", 77)))
                    for (_, tok), c in zip(CLIP_SLOTS, clip_cfgs)]
        check_dims(ucfg, resolution=resolution, clip=clip_cfgs, clip_max_lengths=clip_max, vae=vae_cfg,
                   where=str(folder))

        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        unet = loading.load_model(UNet2DConditionModel, udir, dtype=dtype, device=device, adapter="SDXL")
        encoders = []
        if load_text_encoders:
            for (enc, tok), klass in zip(CLIP_SLOTS, (CLIPTextModel, CLIPTextModelWithProjection)):
                encoders.append(TextEncoder(enc, tokenizers[tok], loading.load_model(
                    klass, folder / enc, dtype=dtype, device=device, frozen=True, adapter="SDXL")))
        vae = None
        if vae_cfg is not None:
            vae_dtype = torch.float32 if (dtype == torch.float16 and vae_cfg.get("force_upcast", True)) else dtype
            vae = loading.load_model(AutoencoderKL, vae_dir, dtype=vae_dtype, device=device, frozen=True,
                                     adapter="SDXL")
        adapter = cls(unet.config, resolution=resolution, schedule=schedule, clip_encoders=encoders, vae=vae,
                      zero_unconditional=zero_unconditional, device=device, dtype=dtype, source=str(folder))
        return adapter, unet

    # -- the model call ------------------------------------------------------------------------
    def predict(self, backbone: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning,
                embedded_guidance: Tensor | None = None) -> Tensor:
        if embedded_guidance is not None:
            raise SenseflowError("SDXL has no guidance embedding: use cfg guidance")
        try:
            prompt_embeds = cond.tensors["prompt_embeds"]
            pooled = cond.tensors["pooled_prompt_embeds"]
        except KeyError:
            raise SenseflowError(f"SDXL conditioning needs 'prompt_embeds' and 'pooled_prompt_embeds' (+ 'time_ids'), "
                                 f"got {sorted(cond.tensors)}: encode prompts with the SDXL adapter") from None
        n = x_t.shape[0]
        cross = self.config["cross_attention_dim"]
        cross = int(cross[0] if isinstance(cross, (list, tuple)) else cross)
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != cross or prompt_embeds.shape[0] != n:
            raise SenseflowError(f"prompt_embeds has shape {tuple(prompt_embeds.shape)} but the UNet needs "
                                 f"[{n}, tokens, {cross}]: the prompt cache was built for another model")
        if pooled.ndim != 2 or pooled.shape[0] != n:
            raise SenseflowError(f"pooled_prompt_embeds has shape {tuple(pooled.shape)} but the UNet needs [{n}, D]: "
                                 f"the prompt cache was built for another model")
        time_ids = cond.tensors.get("time_ids")
        if time_ids is None:
            time_ids = self.time_ids(n)
        if time_ids.shape != (n, 6):
            raise SenseflowError(f"time_ids has shape {tuple(time_ids.shape)} but SDXL needs [{n}, 6]")
        t = as_time(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(n)
        idx = torch.round(t)
        T = self.schedule.num_train_timesteps
        if bool((idx < 0).any()) or bool((idx > T - 1).any()):
            raise SenseflowError(f"SDXL timestep {float(idx.min()) if bool((idx < 0).any()) else float(idx.max()):g} "
                                 f"is outside 0..{T - 1}: the clean state (-1) has no network call")
        dtype = loading.module_dtype(backbone)
        out = backbone(
            x_t.to(dtype),
            idx.to(torch.float32),
            encoder_hidden_states=prompt_embeds.to(device=x_t.device, dtype=dtype),
            added_cond_kwargs={"text_embeds": pooled.to(device=x_t.device, dtype=dtype),
                               "time_ids": time_ids.to(device=x_t.device, dtype=dtype)},
            return_dict=False,
        )[0]
        return out.to(x_t.dtype)

    # -- prompts -------------------------------------------------------------------------------
    @property
    def has_text_encoders(self) -> bool:
        return bool(self.clip_encoders)

    def time_ids(self, batch_size: int) -> Tensor:
        """``_get_add_time_ids(original=(res, res), crops=(0, 0), target=(res, res))`` repeated over the batch."""
        r = float(self.resolution)
        return torch.tensor([[r, r, 0.0, 0.0, r, r]], device=self.device, dtype=self.dtype).repeat(batch_size, 1)

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """``StableDiffusionXLPipeline.encode_prompt`` for a list of prompts (no_grad), plus ``time_ids``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not self.clip_encoders:
            raise SenseflowError("the SDXL adapter was loaded without text encoders (load_text_encoders=False): use a "
                                 "prompt cache, or load the teacher with its text encoders")
        feats, pooled = [], None
        with torch.no_grad():
            for enc, max_len in zip(self.clip_encoders, self.clip_max_lengths):
                ids = enc.tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True,
                                    return_tensors="pt").input_ids.to(loading.module_device(enc.model))
                out = enc.model(ids, output_hidden_states=True)
                if out[0].ndim == 2:        # CLIPTextModelWithProjection: text_embeds (the pipeline's rule)
                    pooled = out[0]
                feats.append(out.hidden_states[-2])
            seq = {f.shape[1] for f in feats}
            if len(seq) != 1:
                raise SenseflowError(f"the CLIP encoders returned different sequence lengths {sorted(seq)}: give both "
                                     f"tokenizers the same model_max_length")
            prompt_embeds = torch.cat(feats, dim=-1)
        if pooled is None:
            raise SenseflowError(f"{self.source}: text_encoder_2 gave no pooled projection: it must be a "
                                 f"CLIPTextModelWithProjection")
        return Conditioning({"prompt_embeds": prompt_embeds.to(device=self.device, dtype=self.dtype),
                             "pooled_prompt_embeds": pooled.to(device=self.device, dtype=self.dtype),
                             "time_ids": self.time_ids(len(prompts))})

    def unconditional(self, batch_size: int) -> Conditioning:
        """Zeros (``force_zeros_for_empty_prompt``, DMD2) or the encoded empty prompt, expanded to ``batch_size``."""
        if self._uncond is None:
            if self.zero_unconditional:
                cross = self.config["cross_attention_dim"]
                cross = int(cross[0] if isinstance(cross, (list, tuple)) else cross)
                time_dim = int(self.config.get("addition_time_embed_dim") or 256)
                proj_in = self.config.get("projection_class_embeddings_input_dim")
                pooled_dim = int(proj_in) - 6 * time_dim if proj_in is not None else 1280
                self._uncond = Conditioning({
                    "prompt_embeds": torch.zeros(1, self.uncond_tokens, cross, device=self.device, dtype=self.dtype),
                    "pooled_prompt_embeds": torch.zeros(1, pooled_dim, device=self.device, dtype=self.dtype),
                    "time_ids": self.time_ids(1)})
            elif not self.clip_encoders:
                raise SenseflowError("the SDXL adapter has no text encoders and no cached empty-prompt embedding: "
                                     "call set_unconditional() with the prompt cache's entry for \"\"")
            else:
                self._uncond = self.encode_prompts([""])
        return self._uncond.expand(batch_size)

    def set_unconditional(self, cond: Conditioning) -> None:
        """Use a precomputed unconditional embedding (batch 1), e.g. from a prompt cache."""
        if len(cond) != 1:
            raise SenseflowError(f"the unconditional embedding must have batch size 1, got {len(cond)}")
        cond = cond.detach().to(self.device)
        if "time_ids" not in cond.tensors:
            cond = Conditioning({**cond.tensors, "time_ids": self.time_ids(1)})
        self._uncond = cond

    def release_text_encoders(self) -> None:
        """Drop the text encoders (after caching prompts); a non-zero empty prompt is cached first."""
        if self.clip_encoders and self._uncond is None and not self.zero_unconditional:
            self._uncond = self.encode_prompts([""])
        self.clip_encoders, self.clip_max_lengths = [], []

    # -- latents -------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        if self.vae_config is None:
            return 8
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    def _latent_stats(self, like: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """(mean, std) of the latents per channel when the VAE config has them, else (0, 1)."""
        cfg = self.vae_config or {}
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        if mean is None or std is None:
            return 0.0, 1.0
        shape = (1, len(mean), 1, 1)
        return (torch.tensor(mean, device=like.device, dtype=like.dtype).view(shape),
                torch.tensor(std, device=like.device, dtype=like.dtype).view(shape))

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images in ``[-1, 1]`` (``vae.decode(z * std / scaling + mean)``); gradients flow."""
        vae = self._require_vae()
        z = latents.to(loading.module_dtype(vae))
        mean, std = self._latent_stats(z)
        z = z * std / float(self.vae_config["scaling_factor"]) + mean
        return vae.decode(z, return_dict=False)[0].to(latents.dtype)

    def encode(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        """Images in ``[-1, 1]`` -> latents ``(z - mean) * scaling / std`` (``sample=False``: the posterior mode)."""
        vae = self._require_vae()
        dist = vae.encode(images.to(loading.module_dtype(vae))).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        mean, std = self._latent_stats(z)
        return ((z - mean) * float(self.vae_config["scaling_factor"]) / std).to(images.dtype)

    # -- structure -----------------------------------------------------------------------------
    def block_names(self, backbone: nn.Module) -> list[str]:
        down = loading.find_module_name(backbone, "down_blocks", (nn.ModuleList,))
        up = loading.find_module_name(backbone, "up_blocks", (nn.ModuleList,))
        mid = loading.find_module_name(backbone, "mid_block")
        if down is None or up is None:
            raise SenseflowError(f"{type(backbone).__name__} has no down_blocks/up_blocks: not an SDXL UNet")
        names = [f"{down}.{i}" for i in range(len(backbone.get_submodule(down)))]
        if mid is not None and backbone.get_submodule(mid) is not None:
            names.append(mid)
        return names + [f"{up}.{i}" for i in range(len(backbone.get_submodule(up)))]

    def output_norm_name(self, backbone: nn.Module) -> str | None:
        return loading.find_module_name(backbone, "conv_norm_out")

    def feature_tap(self, backbone: nn.Module, layer: str | None = None) -> FeatureTap | None:
        """The UNet mid-block output (DMD2 ``classify_forward``'s bottleneck): ``[B, C_last, H/2^(n-1), W/2^(n-1)]``."""
        mid = loading.find_module_name(backbone, "mid_block")
        if mid is None or backbone.get_submodule(mid) is None:
            raise SenseflowError(f"{type(backbone).__name__} has no mid_block for DMD2's GAN head")
        if layer is not None and layer != mid:
            raise SenseflowError(f"method.gan_head.layer: the SDXL adapter reads {mid!r} only; give "
                                 f"method.gan_head.feature_channels / feature_size to tap {layer!r}")
        widths = [int(c) for c in loading.config_of(backbone)["block_out_channels"]]
        _, h, w = self.latent_shape()
        down = 2 ** (len(widths) - 1)
        return FeatureTap(mid, widths[-1], (h // down, w // down), 0)

    # -- devices -------------------------------------------------------------------------------
    def text_encoders(self) -> list:
        return list(self.clip_encoders)

    def __repr__(self) -> str:
        return (f"SDXLAdapter(source={self.source!r}, resolution={self.resolution}, schedule={self.schedule}, "
                f"text_encoders={'yes' if self.clip_encoders else 'no'}, zero_unconditional={self.zero_unconditional})")


# -------------------------------------------------------------------------------------------------
# the family descriptor (senseflow.teachers.registry)
# -------------------------------------------------------------------------------------------------
def trailing_timesteps(k: int, num_train_timesteps: int = 1000) -> list[int]:
    """``DDIMScheduler(timestep_spacing="trailing")``'s ``k`` timesteps (moved from ``export_diffusers``)."""
    import numpy as np

    return [int(t) for t in (np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / k)) - 1)]


def export_scheduler(student, sampler: str, teacher_sched: dict):
    """SDXL stochastic: ``LCMScheduler`` with explicit timesteps; euler: ``DDIMScheduler`` (trailing), which
    reproduces uniformly spaced anchors only (moved from ``export_diffusers.make_scheduler``)."""
    from diffusers import DDIMScheduler, LCMScheduler

    T = int(teacher_sched.get("num_train_timesteps", 1000))
    ptype = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}[student.adapter.schedule.prediction]
    common = {"num_train_timesteps": T, "beta_start": float(teacher_sched.get("beta_start", 0.00085)),
              "beta_end": float(teacher_sched.get("beta_end", 0.012)),
              "beta_schedule": str(teacher_sched.get("beta_schedule", "scaled_linear")), "prediction_type": ptype,
              "clip_sample": False, "set_alpha_to_one": True, "thresholding": False}
    if sampler == "stochastic":
        # original_inference_steps = T: every integer timestep is on LCM's grid (no warning for 999/749/...)
        return LCMScheduler(original_inference_steps=T, timestep_spacing="trailing", **common)
    anchors = [int(round(a)) for a in student.spec.anchors]
    if anchors != trailing_timesteps(len(anchors), T):
        raise SenseflowError(f"SDXL students with the euler sampler export only with uniformly spaced anchors "
                             f"({trailing_timesteps(len(anchors), T)} for {len(anchors)} steps; this one has "
                             f"{anchors}): no stock diffusers scheduler takes DDIM steps between custom timesteps; "
                             f"export with --sampler stochastic (LCMScheduler) or use senseflow generate")
    return DDIMScheduler(timestep_spacing="trailing", steps_offset=0, **common)


def export_step_kwargs(student, sampler: str) -> dict:
    """LCM takes the student's timesteps; DDIM (euler) spaces its own."""
    if sampler == "stochastic":
        return {"timesteps": [int(round(a)) for a in student.spec.anchors]}
    return {}


# -- senseflow bench (moved from bench/presets.py Preset methods) ---------------------------------------
def _bench_multiple(preset) -> int:
    return preset.vae_factor * 2 ** (len(preset.config["down_block_types"]) - 1)


def _bench_tokens(preset, resolution: int) -> int:
    side = resolution // preset.vae_factor
    return side * side


def _bench_adapter(preset, resolution: int, device: torch.device, dtype: torch.dtype) -> "SDXLAdapter":
    vae = {"latent_channels": preset.latent_channels, "block_out_channels": [1] * preset.vae_factor.bit_length(),
           "scaling_factor": 0.13025}
    return SDXLAdapter(preset.config, resolution=resolution, vae=vae, zero_unconditional=True,
                       uncond_tokens=preset.text_tokens, device=device, dtype=dtype, source=f"preset {preset.name}")


def _bench_inputs(preset, x, t, cond, resolution, device, dtype, config) -> dict:
    r = float(resolution)
    return {"sample": x, "timestep": t * 999.0, "encoder_hidden_states": cond.tensors["prompt_embeds"],
            "added_cond_kwargs": {"text_embeds": cond.tensors["pooled_prompt_embeds"],
                                  "time_ids": torch.tensor([[r, r, 0, 0, r, r]], device=device,
                                                           dtype=dtype).repeat(x.shape[0], 1)},
            "return_dict": False}


def load_from_config(config, device: torch.device) -> tuple[SDXLAdapter, nn.Module]:
    """SDXL: DDPM schedule from the scheduler config (``teacher.shift`` does not apply and is refused)."""
    from ..build import loader_kwargs

    if config.teacher.shift is not None:
        raise SenseflowError("teacher.shift is a rectified-flow setting; SDXL (DDPM) has no shift: remove it")
    return SDXLAdapter.from_pretrained(config.paths.teacher, **loader_kwargs(config, device))


# -------------------------------------------------------------------------------------------------
# the original layouts (``senseflow export --format single-file / kohya-lora``)
# -------------------------------------------------------------------------------------------------
#: top-level UNet modules, diffusers -> Stability's sgm/LDM ``UNetModel``
_LDM_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
#: ResnetBlock2D -> ResBlock sub-modules
_LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def _layers_per_block(config: Mapping[str, Any]) -> int:
    per = config.get("layers_per_block", 2)
    if not isinstance(per, int):
        raise SenseflowError(f"SDXL single-file export: layers_per_block {per!r} varies per block; the LDM layout "
                             f"diffusers reads back needs one number")
    return per


def ldm_module(name: str, config: Mapping[str, Any]) -> str | None:
    """A diffusers ``UNet2DConditionModel`` module path in the LDM layout (``input_blocks.4.1.proj_in``), or None.

    The inverse of diffusers' ``convert_ldm_unet_checkpoint`` (and of kohya's sgm block numbering,
    ``_maybe_map_sgm_blocks_to_diffusers``): down block ``b``'s layer ``j`` is ``input_blocks.1+b(L+1)+j``
    (``.0`` resnet, ``.1`` attention), its downsampler ``input_blocks.(b+1)(L+1).0.op``; the middle
    block is resnet / attention / resnet; up block ``b``'s layer ``j`` is ``output_blocks.b(L+1)+j``, its
    upsampler the last layer's ``.2.conv`` after an attention, ``.1.conv`` otherwise.  Inside the
    attention (``Transformer2DModel`` = ``SpatialTransformer``) the names are the same.
    """
    per = _layers_per_block(config) + 1
    parts = name.split(".")
    for src, dst in _LDM_TOP.items():
        if name == src or name.startswith(src + "."):
            return dst + name[len(src):]

    def resnet(rest: list[str]) -> str | None:
        sub = _LDM_RESNET.get(rest[0]) if rest else None
        return None if sub is None else ".".join([sub, *rest[1:]])

    if parts[0] in ("down_blocks", "up_blocks") and len(parts) >= 4:
        b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        down = parts[0] == "down_blocks"
        if kind == "downsamplers" and down and rest[:1] == ["conv"]:
            return ".".join([f"input_blocks.{(b + 1) * per}.0.op", *rest[1:]])
        if kind == "upsamplers" and not down and rest[:1] == ["conv"]:
            types = config.get("up_block_types") or ()
            with_attn = b < len(types) and "CrossAttn" in types[b]
            return ".".join([f"output_blocks.{b * per + per - 1}.{2 if with_attn else 1}.conv", *rest[1:]])
        layer = f"input_blocks.{1 + b * per + j}" if down else f"output_blocks.{b * per + j}"
        if kind == "resnets":
            sub = resnet(rest)
            return None if sub is None else f"{layer}.0.{sub}"
        if kind == "attentions":
            return ".".join([f"{layer}.1", *rest])
        return None
    if parts[0] == "mid_block" and len(parts) >= 3:
        kind, k, rest = parts[1], int(parts[2]), parts[3:]
        if kind == "resnets" and k in (0, 1):
            sub = resnet(rest)
            return None if sub is None else f"middle_block.{2 * k}.{sub}"
        if kind == "attentions" and k == 0:
            return ".".join(["middle_block.1", *rest])
    return None


def to_original(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """The UNet in the LDM layout (``model.diffusion_model.input_blocks...``): SDXL base checkpoints' UNet part.

    Every weight is renamed by :func:`ldm_module` (no tensor changes: ``use_linear_projection`` UNets
    keep linear ``proj_in`` / ``proj_out`` in both layouts).
    """
    from ..original_layout import KeyMap

    if config.get("addition_embed_type") not in (None, "text_time") or config.get("class_embed_type"):
        raise SenseflowError("SDXL single-file export: this UNet's class / addition embedding has no place in the "
                             "SDXL LDM layout (use --format diffusers)")
    m = KeyMap(state, "SDXL single-file export")
    for key in list(state):
        module, _, param = key.rpartition(".")
        target = ldm_module(module, config)
        if target is not None:
            m.move(key, f"{target}.{param}")
    return m.finish(prefix="model.diffusion_model.")


def _vae_to_ldm(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """``AutoencoderKL`` in the LDM layout (inverse of diffusers' ``convert_ldm_vae_checkpoint``): the
    decoder's up blocks in reverse order, mid-attention projections as 1x1 convs."""
    from ..original_layout import KeyMap, block_ids

    m = KeyMap(state, "SDXL checkpoint export (VAE)")
    for side in ("encoder", "decoder"):
        for name in ("conv_in", "conv_out"):
            m.move(f"{side}.{name}", f"{side}.{name}")
        m.move(f"{side}.conv_norm_out", f"{side}.norm_out")
        for k in (0, 1):
            for key in [x for x in list(m.state) if x.startswith(f"{side}.mid_block.resnets.{k}.")]:
                m.move(key, key.replace(f"{side}.mid_block.resnets.{k}.", f"{side}.mid.block_{k + 1}.")
                       .replace("conv_shortcut", "nin_shortcut"))
        a = f"{side}.mid_block.attentions.0."
        for src, dst in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            weight = m.take(a + src + ".weight")
            m.put(f"{side}.mid.attn_1.{dst}.weight", weight if src == "group_norm" else weight[:, :, None, None])
            m.move(a + src + ".bias", f"{side}.mid.attn_1.{dst}.bias")
    ups = block_ids(state, "decoder.up_blocks")
    for kind, blocks in (("down", block_ids(state, "encoder.down_blocks")), ("up", ups)):
        side = "encoder" if kind == "down" else "decoder"
        for i in blocks:
            o = i if kind == "down" else len(ups) - 1 - i
            head = f"{side}.{kind}_blocks.{i}."
            for key in [x for x in list(m.state) if x.startswith(head)]:
                rest = key[len(head):]
                if rest.startswith("resnets."):
                    m.move(key, f"{side}.{kind}.{o}.block." + rest[len("resnets."):].replace("conv_shortcut",
                                                                                           "nin_shortcut"))
                elif rest.startswith(("downsamplers.0.conv.", "upsamplers.0.conv.")):
                    m.move(key, f"{side}.{kind}.{o}.{kind}sample.conv.{rest.rsplit('.', 1)[1]}")
    for name in ("quant_conv", "post_quant_conv"):
        m.move_if(name, name)
    return m.finish(prefix="first_stage_model.")


def _clip_to_ldm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CLIP-L (``text_encoder``) as ``conditioner.embedders.0.transformer.text_model.*`` (HF names kept)."""
    return {"conditioner.embedders.0.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in state.items() if not k.endswith("position_ids")}


def _open_clip_to_ldm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """OpenCLIP bigG (``text_encoder_2``) in open_clip's layout (inverse of ``convert_open_clip_checkpoint``):
    fused ``attn.in_proj``, ``ln_1`` / ``mlp.c_fc`` names, ``text_projection`` transposed."""
    from ..original_layout import KeyMap, block_ids

    m = KeyMap({k: v for k, v in state.items() if not k.endswith("position_ids")}, "SDXL checkpoint export (CLIP-G)")
    m.move("text_model.embeddings.position_embedding.weight", "positional_embedding")
    m.move("text_model.embeddings.token_embedding.weight", "token_embedding.weight")
    m.move("text_model.final_layer_norm", "ln_final")
    m.put("text_projection", m.take("text_projection.weight").T.contiguous())
    for i in block_ids(state, "text_model.encoder.layers"):
        d, o = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        qkv = [d + f"self_attn.{x}_proj" for x in "qkv"]
        m.put(o + "attn.in_proj_weight", torch.cat([m.take(x + ".weight") for x in qkv]))
        m.put(o + "attn.in_proj_bias", torch.cat([m.take(x + ".bias") for x in qkv]))
        m.move(d + "self_attn.out_proj", o + "attn.out_proj")
        m.move(d + "layer_norm1", o + "ln_1")
        m.move(d + "layer_norm2", o + "ln_2")
        m.move(d + "mlp.fc1", o + "mlp.c_fc")
        m.move(d + "mlp.fc2", o + "mlp.c_proj")
    return m.finish(prefix="conditioner.embedders.1.model.")


def to_checkpoint(unet: Mapping[str, Tensor], components: Mapping[str, nn.Module]) -> dict[str, Tensor]:
    """The full SDXL checkpoint A1111 / Forge / ComfyUI "Load Checkpoint" take (``sd_xl_base_1.0`` layout): the
    UNet (:func:`to_original`) + both CLIPs (``conditioner.embedders.0/1``) + the VAE (``first_stage_model``)."""
    vae = components["vae"]
    out = dict(unet)
    out.update(_clip_to_ldm(components["text_encoder"].state_dict()))
    out.update(_open_clip_to_ldm(components["text_encoder_2"].state_dict()))
    out.update(_vae_to_ldm(vae.state_dict(), dict(vae.config)))
    return out


def to_kohya(pairs: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """kohya-ss sd-scripts' SDXL layout: ``lora_unet_`` + the LDM module path with ``_`` (sd-scripts trains
    SDXL on the sgm UNet), e.g. ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``."""
    from ..original_layout import rename_pairs

    return rename_pairs(pairs, lambda module: ldm_module(module, config), "SDXL kohya export")


SINGLE_FILE = registry.SingleFileRecipe(
    to_original, loader="UNet2DConditionModel", checkpoint=to_checkpoint,
    checkpoint_components=("text_encoder", "text_encoder_2", "vae"), checkpoint_loader="StableDiffusionXLPipeline",
    checkpoint_where="A1111 / Forge: models/Stable-diffusion; ComfyUI: models/checkpoints (Load Checkpoint)",
    where="ComfyUI: models/diffusion_models (Load Diffusion Model / UNETLoader), with the SDXL CLIPs and VAE "
          "loaded separately")
KOHYA_LORA = registry.KohyaLoraRecipe(
    to_kohya, where="ComfyUI: models/loras (LoraLoaderModelOnly); A1111 / Forge: models/Lora (<lora:NAME:1>); "
                    "diffusers: StableDiffusionXLPipeline.load_lora_weights")


FAMILY = registry.FamilyDescriptor(
    name="sdxl",
    label="SDXL",
    load=load_from_config,
    backbone_classes=("UNet2DConditionModel",),
    pipeline_class="StableDiffusionXLPipeline",
    pipeline_prefixes=("StableDiffusionXL",),
    backbone_folder="unet",
    noise=registry.NoiseRecipe("generator", renoise_float32=False),   # LCM draws in the model dtype
    export=registry.ExportRecipe(scheduler=export_scheduler, step_kwargs=export_step_kwargs,
                                 single_file=SINGLE_FILE, kohya_lora=KOHYA_LORA),
    bench=registry.BenchRecipe(_bench_multiple, _bench_tokens, _bench_adapter, _bench_inputs),
    # target_modules: auto = the attention projections diffusers' LoRA training scripts target
    lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
)
