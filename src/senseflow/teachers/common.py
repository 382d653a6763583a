"""Behaviour shared by the adapters that load diffusers folders (SD3, FLUX.1/2, SDXL, SANA, Qwen-Image, Z-Image)."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..schedules import RectifiedFlow, flux_mu
from . import loading
from .base import Conditioning, FeatureTap, ModelAdapter, SenseflowError, middle_block_tap

#: diffusers' FlowMatchEulerDiscreteScheduler defaults for the resolution-dependent (dynamic) shift,
#: which the FLUX.1 and Qwen-Image pipelines feed to ``calculate_shift``
DYNAMIC_SHIFT_DEFAULTS: dict[str, float] = {"base_image_seq_len": 256, "max_image_seq_len": 4096,
                                            "base_shift": 0.5, "max_shift": 1.15}


def calculate_shift_schedule(sched: Mapping[str, Any], image_seq_len: int, *, label: str, where: str,
                             fix: str) -> RectifiedFlow:
    """``mu`` from the image's token count on the scheduler's line, as the pipelines' ``calculate_shift``.

    Only diffusers' 'exponential' time shift is the pipelines' formula, so any other is refused
    (``fix`` says what the user can set instead).
    """
    if str(sched.get("time_shift_type", "exponential")) != "exponential":
        raise SenseflowError(f"{where}/scheduler uses time_shift_type={sched.get('time_shift_type')!r}; {label} uses "
                             f"'exponential': {fix}")
    args = {k: float(sched.get(k, v)) for k, v in DYNAMIC_SHIFT_DEFAULTS.items()}
    if args["max_image_seq_len"] == args["base_image_seq_len"]:
        raise SenseflowError(f"{where}/scheduler has base_image_seq_len == max_image_seq_len: fix the scheduler "
                             f"config or {fix}")
    return RectifiedFlow(mu=flux_mu(image_seq_len, int(args["base_image_seq_len"]), int(args["max_image_seq_len"]),
                                    args["base_shift"], args["max_shift"]))


def exponential_shift_schedule(sched: Mapping[str, Any] | None, image_seq_len: int, *, label: str,
                               where: str, mu: float | None = None, shift: float | None = None) -> RectifiedFlow:
    """The FLUX.1 / Qwen-Image teacher's schedule: explicit ``mu`` / ``shift``, else the scheduler config.

    A scheduler with dynamic shifting off (FLUX.1-schnell) gives its static ``shift``; otherwise
    ``calculate_shift_schedule`` (dynamic shifting is these schedulers' default).
    """
    if mu is not None and shift is not None:
        raise SenseflowError(f"give the {label} adapter either mu= (dynamic shift) or shift= (static shift), not both")
    if mu is not None:
        return RectifiedFlow(mu=float(mu))
    if shift is not None:
        return RectifiedFlow(shift=float(shift))
    sched = sched or {}
    if not bool(sched.get("use_dynamic_shifting", True)):
        return RectifiedFlow(shift=float(sched.get("shift", 1.0)))
    return calculate_shift_schedule(sched, image_seq_len, label=label, where=where,
                                    fix="pass an explicit mu= or shift=")


class DiffusersFolderAdapter(ModelAdapter):
    """Square latents from ``resolution`` and the VAE's scale factor, a VAE guard, a cached uncond.

    Subclasses set ``label`` (used in messages), ``resolution``, ``config`` (the backbone config),
    ``vae``, ``device`` and a ``vae_scale_factor`` property.
    """

    label: str = "diffusers"
    #: the backbone sees latents with this many times the VAE's channels (FLUX packs 2x2 patches: 4)
    packed_channels: int = 1
    #: the ModuleLists (by their last name) whose blocks make up the backbone, in depth order
    block_lists: tuple[str, ...] = ("transformer_blocks",)

    def block_names(self, backbone: nn.Module) -> list[str]:
        """Every block of each of ``block_lists`` (found through compile / DDP wrappers), in order."""
        names: list[str] = []
        for leaf in self.block_lists:
            name = loading.find_module_name(backbone, leaf, (nn.ModuleList,))
            if name is None:
                raise SenseflowError(f"{type(backbone).__name__} has no {leaf}: not a {self.label} transformer")
            names += [f"{name}.{i}" for i in range(len(backbone.get_submodule(name)))]
        return names

    def output_norm_name(self, backbone: nn.Module) -> str | None:
        """The diffusers DiTs' final ``norm_out`` (SiD2a's pooled features)."""
        return loading.find_module_name(backbone, "norm_out")

    def token_grid_tap(self, backbone: nn.Module, blocks: list[str], layer: str | None, patch: int,
                       index: int) -> FeatureTap:
        """A DiT block's image tokens for DMD2's GAN head: width heads x head_dim on the latent grid / ``patch``;
        ``index`` = which output of the block holds them (blocks that return ``(text, image)``: 1)."""
        cfg = loading.config_of(backbone)
        _, h, w = self.latent_shape()
        return middle_block_tap(blocks, layer, int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"]),
                                (h // patch, w // patch), index=index)

    def latent_shape(self) -> tuple[int, ...]:
        side = self.resolution // self.vae_scale_factor
        return (int(self.config["in_channels"]) // self.packed_channels, side, side)

    def _require_vae(self) -> nn.Module:
        if self.vae is None:
            raise SenseflowError(f"the {self.label} adapter has no VAE loaded: load the teacher folder with its vae/")
        return self.vae

    def text_encoders(self) -> list:
        """The loaded text encoders (``TextEncoder`` records with a ``.model``); none once released."""
        return []

    def to(self, device: torch.device | str) -> "DiffusersFolderAdapter":
        """Move the text encoders, the VAE and the cached empty prompt (not the backbone) to ``device``."""
        self.device = torch.device(device)
        for enc in self.text_encoders():
            enc.model.to(self.device)
        if self.vae is not None:
            self.vae.to(self.device)
        if getattr(self, "_uncond", None) is not None:
            self._uncond = self._uncond.to(self.device)
        return self

    def set_unconditional(self, cond: Conditioning) -> None:
        """Use a precomputed empty-prompt embedding (batch 1), e.g. from a prompt cache."""
        if len(cond) != 1:
            raise SenseflowError(f"the unconditional embedding must have batch size 1, got {len(cond)}")
        self._uncond = cond.detach().to(self.device)


class SingleTextEncoder:
    """For adapters with one text encoder in ``self.text_encoder`` (SANA, Qwen-Image, Z-Image, FLUX.2) and
    their unconditional embedding cached in ``self._uncond`` by ``unconditional`` (FLUX.2 keeps its own
    release: it caches the empty prompt only when it does real CFG)."""

    text_encoder: Any

    def text_encoders(self) -> list:
        return [] if self.text_encoder is None else [self.text_encoder]

    def release_text_encoders(self) -> None:
        """Drop the text encoder (after caching prompts); the unconditional (negative / empty prompt)
        embedding is encoded first and stays cached."""
        if self.text_encoder is not None and self._uncond is None:
            self.unconditional(1)
        self.text_encoder = None


class ScaledShiftedVAE:
    """``AutoencoderKL`` latents as the FLUX-style pipelines scale them: ``(z - shift_factor) * scaling_factor``.

    For adapters (FLUX.1, Z-Image) whose ``vae_config`` holds the VAE's config even when no VAE is loaded.
    """

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    def _vae_factors(self) -> tuple[float, float]:
        shift = self.vae_config.get("shift_factor")
        return float(self.vae_config["scaling_factor"]), 0.0 if shift is None else float(shift)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images in ``[-1, 1]`` (``vae.decode(z / scaling + shift)``); gradients flow."""
        vae = self._require_vae()
        scaling, shift = self._vae_factors()
        z = latents.to(loading.module_dtype(vae)) / scaling + shift
        return vae.decode(z, return_dict=False)[0].to(latents.dtype)

    def encode(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        """Images in ``[-1, 1]`` -> latents ``(z - shift) * scaling`` (``sample=False``: the posterior mode)."""
        vae = self._require_vae()
        scaling, shift = self._vae_factors()
        dist = vae.encode(images.to(loading.module_dtype(vae))).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return ((z - shift) * scaling).to(images.dtype)


# -------------------------------------------------------------------------------------------------
# export to a stock pipeline: what the rectified-flow families (SD3, FLUX, SANA) share
# -------------------------------------------------------------------------------------------------
def flow_export_scheduler(student, sampler: str, teacher_scheduler: dict):
    """``FlowMatchEulerDiscreteScheduler`` with ``shift=1`` and no dynamic shifting: the student's NATIVE
    sigmas are passed as ``sigmas=`` (moved from ``export_diffusers.make_scheduler``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    T = int(teacher_scheduler.get("num_train_timesteps", 1000))
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=1.0, use_dynamic_shifting=False,
                                           stochastic_sampling=(sampler == "stochastic"))


def flow_step_kwargs(student, sampler: str) -> dict:
    """The pipeline call's ``sigmas=``: the student's native anchors."""
    return {"sigmas": [float(a) for a in student.spec.anchors]}


def max_sequence_length_kwarg(adapter, call: dict, pipeline_default: int) -> None:
    """Pass ``max_sequence_length`` only where the adapter's differs from the pipeline's default."""
    msl = int(getattr(adapter, "max_sequence_length", pipeline_default))
    if msl != pipeline_default:
        call["max_sequence_length"] = msl
