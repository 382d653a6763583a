"""Behaviour shared by the adapters that load diffusers folders (SD3, FLUX.1/2, SDXL, SANA, Qwen-Image, Z-Image)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import loading
from .base import Conditioning, ModelAdapter, SenseflowError


class DiffusersFolderAdapter(ModelAdapter):
    """Square latents from ``resolution`` and the VAE's scale factor, a VAE guard, a cached uncond.

    Subclasses set ``label`` (used in messages), ``resolution``, ``config`` (the backbone config),
    ``vae``, ``device`` and a ``vae_scale_factor`` property.
    """

    label: str = "diffusers"
    #: the backbone sees latents with this many times the VAE's channels (FLUX packs 2x2 patches: 4)
    packed_channels: int = 1

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
