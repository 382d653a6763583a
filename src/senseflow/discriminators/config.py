"""Typed settings of the discriminators.

* :class:`VFMDiscriminatorConfig` -- SenseFlow's vision-foundation-model discriminator
  (:mod:`senseflow.discriminators.vfm`); :func:`build_vfm_discriminator` turns it into a module.
* SiD2a's discriminator has no settings of its own (no parameters: the fake network's pooled
  features); its switches live on :class:`senseflow.methods.sid.SiDConfig` (``adversarial*``).

Checks that need the model folders (layer index vs. the DINOv2 depth, image size vs. the patch
size, CLIP projection width vs. ``text_dim``, missing folders) run when the discriminator is
built and fail with ONE line (:class:`~senseflow.teachers.base.SenseflowError`).

Built-in backbones of the toy world (:func:`resolve_builtin`): ``dinov2_path: builtin:toy-dinov2``
is the shipped toy DINOv2 (:mod:`senseflow.toy.backbone`), ``clip_path: builtin:toy-clip`` the
shipped toy teacher's ``text_encoder/`` (its tokenizer is the sibling ``tokenizer/``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, ValidationError, field_validator

from ..configbase import StrictModel
from ..teachers.base import SenseflowError
from .augment import POLICIES

if TYPE_CHECKING:  # pragma: no cover
    from ..teachers.base import ModelAdapter
    from .vfm import VFMDiscriminator

#: the released SenseFlow feature taps for DINOv2 ViT-L/14 (24 blocks), as ``hidden_states`` indices:
#: 0 = embedding output (patch embedding + CLS + position embedding), i = output of block i (1-based),
#: i.e. the released code's patch-embedding output and 0-based blocks 2, 5, 8, 10, 14, 19, 23.
VITL_LAYERS: tuple[int, ...] = (0, 3, 6, 9, 11, 15, 20, 24)
VITL_DEPTH = 24


BUILTIN_PREFIX = "builtin:"


def _builtin_folders(key: str) -> dict[str, Path]:
    from ..toy.backbone import BACKBONE_ASSET
    from ..toy.teacher import TEACHER_ASSET

    return {"dinov2_path": {"builtin:toy-dinov2": BACKBONE_ASSET},
            "clip_path": {"builtin:toy-clip": TEACHER_ASSET / "text_encoder"}}[key]


def resolve_builtin(key: str, value: str) -> str:
    """``discriminator.<key>``'s folder: a ``builtin:<name>`` becomes its shipped asset, anything else is unchanged."""
    if not value.startswith(BUILTIN_PREFIX):
        return value
    known = _builtin_folders(key)
    if value not in known:
        raise SenseflowError(f"discriminator.{key}: unknown built-in {value!r} (available: {', '.join(known)})")
    return str(known[value])


def default_layers(num_hidden_layers: int) -> list[int]:
    """``VITL_LAYERS`` for a 24-block model; otherwise the same relative depths, rounded half up."""
    out: list[int] = []
    for j in VITL_LAYERS:
        i = int(j * num_hidden_layers / VITL_DEPTH + 0.5)
        if i not in out:
            out.append(i)
    return out


class VFMDiscriminatorConfig(StrictModel):
    """SenseFlow's VFM discriminator: frozen DINOv2 + frozen CLIP text encoder + trainable heads."""

    dinov2_path: str = Field(description="local folder of a transformers Dinov2Model (config.json + weights), or "
                                         "builtin:toy-dinov2 (the toy world's shipped DINOv2, docs/toy.md)")
    clip_path: str = Field(
        description="local folder of a CLIPTextModelWithProjection (or CLIPModel); the tokenizer is read from "
                    "this folder, its tokenizer/ subfolder, or a sibling tokenizer/ folder (diffusers layout); "
                    "builtin:toy-clip = the shipped toy teacher's text encoder")
    layers: list[int] | None = Field(
        None, description="DINOv2 hidden_states indices (0 = embedding output, i = after block i, 1-based); "
                          "None = 0,3,6,9,11,15,20,24 for 24 blocks (released code), scaled for other depths")
    input_policy: Literal["resize", "native"] = Field(
        "resize", description="resize: bilinear (antialiased) to image_size; native: keep the resolution "
                              "(rounded to a multiple of the patch size) with interpolated position embeddings")
    image_size: int = Field(224, ge=1, le=4096, description="side of the resized input (multiple of the patch size)")
    augment: list[Literal["color", "translation", "cutout"]] = Field(
        default_factory=lambda: list(POLICIES), description="differentiable augmentation of the judged image")
    translation_ratio: float = Field(0.125, ge=0.0, lt=1.0)
    cutout_ratio: float = Field(0.5, ge=0.0, lt=1.0)
    reference: Literal["self", "other", "none"] = Field(
        "other", description="reference image: self (released code), other (another real image of the same "
                             "prompt, else the next batch element), none")
    mismatch_weight: float = Field(
        0.0, ge=0.0, le=1.0, description="matching-aware term (GAN-CLS / GigaGAN): the share w of D's fake side given "
                                         "to real images with another element's prompt, (1 - w) to G samples "
                                         "(0 = off, the released discriminator; 0.5 = Reed et al. 2016)")
    head_channels: int = Field(256, ge=1, le=8192, description="width of each head's conv trunk")
    head_downsamples: int = Field(2, ge=0, description="strided 3x3 conv + residual block stages per head")
    cmap_dim: int = Field(64, ge=1, le=8192, description="channels of each head's output map / text and reference maps")
    text_dim: int | None = Field(None, ge=1, description="expected CLIP projection width (None = the model's)")
    normalize_text: bool = Field(True, description="L2-normalise the CLIP text embedding before the projection")
    decode_checkpointing: bool = Field(False, description="recompute the VAE decode in backward (saves memory)")
    backbone_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int | None = Field(None, description="seed of the heads' initialisation and of the augmentation draws "
                                               "(None: torch's global CPU RNG; training sets it to train.seed)")

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("layers must list at least one DINOv2 hidden_states index")
        if any(i < 0 for i in v):
            raise ValueError(f"layers must be >= 0 (0 = embedding output), got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"layers has duplicates: {v}")
        return v

    # -- checks that need the folders ------------------------------------------------------------
    def check_paths(self) -> None:
        """One-line errors for missing backbone folders (cheap; no model is loaded)."""
        for key in ("dinov2_path", "clip_path"):
            value = getattr(self, key)
            path = Path(os.path.expanduser(resolve_builtin(key, value)))
            if not path.is_dir() and value.startswith(BUILTIN_PREFIX):
                raise SenseflowError(f"discriminator.{key}: the shipped {value!r} ({path}) is missing from this "
                                     f"installation; reinstall senseflow (or, for builtin:toy-dinov2, train one with "
                                     f"`senseflow toy train-backbone --out DIR` and give DIR)")
            if not path.is_dir():
                raise SenseflowError(f"discriminator.{key}: {value!r} is not a directory; point it at a local "
                                     f"{'Dinov2Model' if key == 'dinov2_path' else 'CLIP text model'} folder "
                                     f"(nothing is downloaded)")

    def folder(self, key: Literal["dinov2_path", "clip_path"]) -> str:
        """The local folder behind ``dinov2_path`` / ``clip_path`` (built-in names resolved)."""
        return resolve_builtin(key, getattr(self, key))

    def resolve_layers(self, num_hidden_layers: int) -> list[int]:
        """The hidden_states indices to tap, checked against the model's depth."""
        layers = list(self.layers) if self.layers is not None else default_layers(num_hidden_layers)
        bad = [i for i in layers if i > num_hidden_layers]
        if bad:
            raise SenseflowError(f"discriminator.layers: index {bad[0]} is out of range for a DINOv2 with "
                                 f"{num_hidden_layers} blocks (valid: 0..{num_hidden_layers}, 0 = embedding output)")
        return layers

    def check_text_width(self, projection_dim: int) -> int:
        if self.text_dim is not None and self.text_dim != projection_dim:
            raise SenseflowError(f"discriminator.text_dim is {self.text_dim} but the CLIP text model in "
                                 f"{self.clip_path!r} projects to {projection_dim}: fix text_dim or clip_path")
        return projection_dim

    def check_image_size(self, patch_size: int) -> None:
        if self.input_policy == "resize" and self.image_size % patch_size:
            nearest = max(1, round(self.image_size / patch_size)) * patch_size
            raise SenseflowError(f"discriminator.image_size ({self.image_size}) must be a multiple of the DINOv2 "
                                 f"patch size ({patch_size}), e.g. {nearest}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.backbone_dtype]


def parse_vfm_config(data: dict[str, Any]) -> VFMDiscriminatorConfig:
    """Validate a ``discriminator`` section; problems become one-line :class:`SenseflowError`."""
    try:
        return VFMDiscriminatorConfig.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
        raise SenseflowError(f"config error: discriminator.{loc}: {msg}{more}") from None


def build_vfm_discriminator(cfg: VFMDiscriminatorConfig, adapter: "ModelAdapter",
                            device: torch.device | str = "cpu", rank: int | None = None) -> "VFMDiscriminator":
    """Load the frozen backbones from their local folders and build the discriminator on ``device``.

    ``adapter`` is the teacher's adapter: its ``decode`` turns the method's latents into images.
    ``rank`` (default: the torch.distributed rank, else 0) decorrelates augmentation draws across
    ranks when ``cfg.seed`` is set.
    """
    from .vfm import VFMDiscriminator, load_clip_text, load_dinov2

    cfg.check_paths()
    dinov2 = load_dinov2(cfg.folder("dinov2_path"), dtype=cfg.torch_dtype)
    clip, tokenizer = load_clip_text(cfg.folder("clip_path"), dtype=cfg.torch_dtype)
    if rank is None:
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return VFMDiscriminator(cfg, adapter, dinov2, clip, tokenizer, rank=rank).to(device)
