"""The teacher contract.

A :class:`ModelAdapter` knows how to *call* one family's backbone (SD3, FLUX, SDXL, SANA, the toy
model, a user's own network) and nothing about training.  It is stateless with respect to the
trainable weights, so the same adapter serves the frozen teacher, the fake score and the
generator: each of those is a :class:`Denoiser` -- a backbone module plus a reference to the
adapter -- whose ``forward`` answers the one question every method asks:

    "given ``x_t``, ``t``, a prompt batch and a guidance setting, what is the ``x0`` prediction?"

Adding a teacher family means writing one adapter file: ``predict`` (one forward of the
backbone in its native parameterisation), prompt encoding, the unconditional embedding,
latent encode/decode, and the names of blocks whose hidden features discriminators may read.
"""

from __future__ import annotations

import contextlib
import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..released import PAPER, ReleasedForms
from ..schedules import NoiseSchedule, as_time, expand_like


class SenseflowError(Exception):
    """An error caused by user input (config, paths, data); printed as one line by the CLI."""


@dataclass
class Conditioning:
    """Model-specific text conditioning for a batch (e.g. ``prompt_embeds``, ``pooled_projections``).

    Only the first dimension (batch) is interpreted here; the adapter knows what each tensor means.
    """

    tensors: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        for v in self.tensors.values():
            return int(v.shape[0])
        return 0

    def map(self, fn) -> "Conditioning":
        return Conditioning({k: fn(v) for k, v in self.tensors.items()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Conditioning":
        def move(v: Tensor) -> Tensor:
            return v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else None)
        return self.map(move)

    def __getitem__(self, idx) -> "Conditioning":
        return self.map(lambda v: v[idx])

    def detach(self) -> "Conditioning":
        return self.map(lambda v: v.detach())

    def expand(self, batch_size: int) -> "Conditioning":
        """Repeat a batch-1 conditioning (e.g. the empty prompt) to ``batch_size``."""
        return self.map(lambda v: v.expand(batch_size, *v.shape[1:]) if v.shape[0] == 1 else v)

    @staticmethod
    def cat(items: Sequence["Conditioning"]) -> "Conditioning":
        keys = items[0].tensors.keys()
        return Conditioning({k: torch.cat([c.tensors[k] for c in items], dim=0) for k in keys})


@dataclass
class Guidance:
    """A guidance setting for one forward.

    ``cfg``: classifier-free guidance scale (scalar or per-sample ``[B]``); ``None`` or 1 = no CFG.
    ``embedded``: the value fed to a guidance-distilled model's guidance embedding (FLUX.1-dev).
    Both may be set (SiD-DiT on FLUX).
    """

    cfg: Tensor | float | None = None
    embedded: Tensor | float | None = None

    @property
    def uses_cfg(self) -> bool:
        if self.cfg is None:
            return False
        if isinstance(self.cfg, Tensor):
            return not bool((self.cfg == 1).all())
        return float(self.cfg) != 1.0


NO_GUIDANCE = Guidance()


@dataclass(frozen=True)
class FeatureTap:
    """Where to read a backbone's hidden features (DMD2's GAN classifier head reads them).

    ``name``: qualified submodule name; ``index``: which element of a tuple output is the image
    stream (SD3 / FLUX joint blocks return ``(text, image)``: 1); ``channels``: feature width;
    ``size``: ``(h, w)`` of the feature map, or of the token grid for ``[B, h*w, D]`` token
    outputs (row-major, as the DiT patch embeddings lay them out).
    """

    name: str
    channels: int
    size: tuple[int, int]
    index: int = 0


def middle_block_tap(blocks: Sequence[str], layer: str | None, channels: int, size: tuple[int, int],
                     index: int) -> "FeatureTap":
    """A DiT tap: ``layer`` (one of ``blocks``) or, by default, the middle transformer block."""
    if not blocks:
        raise SenseflowError("the backbone names no transformer blocks to read features from")
    name = blocks[len(blocks) // 2] if layer is None else layer
    if name not in blocks:
        raise SenseflowError(f"method.gan_head.layer: {name!r} is not a transformer block of this teacher "
                             f"(e.g. {blocks[0]!r} .. {blocks[-1]!r})")
    return FeatureTap(name, int(channels), (int(size[0]), int(size[1])), index)


class ModelAdapter(ABC):
    """How to call one model family's backbone (see module docstring)."""

    #: the noise schedule the family was trained with
    schedule: NoiseSchedule
    #: which guidance kinds the family supports: subset of {"cfg", "embedded"}
    guidance_kinds: frozenset[str] = frozenset({"cfg"})
    #: the family's released SenseFlow trainer where it differs from the paper (``method.reference: released``)
    released: ReleasedForms = PAPER

    # -- the one required model call -----------------------------------------------------------
    @abstractmethod
    def predict(self, backbone: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning,
                embedded_guidance: Tensor | None = None) -> Tensor:
        """One backbone forward; returns the prediction in ``schedule.prediction`` form.

        ``t`` is the schedule's native time as float64 ``[B]``; converting it to what the network
        wants (``1000 t`` for SD3, ``t`` for FLUX, integer index for SDXL) is the adapter's job.
        Pass the network's timestep in float32 whatever the model dtype (bf16 would round
        ``1000 t`` to multiples of 4 near 1000).
        """

    # -- prompts -------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        raise SenseflowError(f"{type(self).__name__} has no text encoder loaded; use a prompt cache")

    @abstractmethod
    def unconditional(self, batch_size: int) -> Conditioning:
        """Conditioning for the unconditional branch of CFG (empty prompt, or zeros for SDXL)."""

    def set_unconditional(self, cond: Conditioning) -> None:
        """Use a cached unconditional embedding (prompt-cache training, text encoders not loaded)."""
        raise SenseflowError(f"{type(self).__name__} cannot take a cached unconditional embedding")

    # -- latents -------------------------------------------------------------------------------
    @abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one latent (without batch) at the configured resolution."""

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images in ``[-1, 1]``, ``[B, 3, H, W]``.  Pixel-space models return the input."""
        return latents

    def encode(self, images: Tensor) -> Tensor:
        """Images in ``[-1, 1]`` -> latents."""
        return images

    def decodes_to_images(self) -> bool:
        """Whether :meth:`decode` returns pictures ``[B, 1|3, H, W]``.

        Sample grids and ``senseflow generate --format png`` need pictures; a model whose samples
        are vectors or feature maps (a custom model with latent shape ``(D,)``) answers False and
        gets raw latents instead.  Every image family keeps this default.
        """
        return True

    # -- structure -----------------------------------------------------------------------------
    def block_names(self, backbone: nn.Module) -> list[str]:
        """Qualified names of the backbone's transformer/UNet blocks (for hooks, FSDP, checkpointing)."""
        return []

    def output_norm_name(self, backbone: nn.Module) -> str | None:
        """Qualified name of the final norm before the output projection (SiD2a's pooled features)."""
        return None

    def feature_blocks(self, backbone: nn.Module) -> list[str]:
        """The blocks, in depth order, that :meth:`feature_tap` can read (``method.gan_head.depths`` picks among
        them); every block by default, FLUX.2 only its double-stream blocks."""
        return self.block_names(backbone)

    def feature_tap(self, backbone: nn.Module, layer: str | None = None) -> FeatureTap | None:
        """The bottleneck features DMD2's GAN classifier head reads (UNet mid-block; DiTs: the middle
        block or ``layer``); ``None`` if the family names none (give ``method.gan_head.feature_*``)."""
        return None

    def make_student(self, teacher_backbone: nn.Module) -> nn.Module:
        """A trainable copy of the teacher backbone for the generator (FLUX overrides: no guidance embed)."""
        return copy.deepcopy(teacher_backbone)

    def make_fake_score(self, teacher_backbone: nn.Module) -> nn.Module:
        return copy.deepcopy(teacher_backbone)

    # -- guidance (generic) -----------------------------------------------------------------------
    def predict_native(self, backbone: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning,
                       guidance: Guidance | None = None) -> Tensor:
        """Native prediction with CFG applied (linear, so CFG on native == CFG on x0)."""
        guidance = guidance or NO_GUIDANCE
        t = as_time(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        emb = self._embedded_tensor(guidance, x_t)
        if not guidance.uses_cfg:
            return self.predict(backbone, x_t, t, cond, emb)
        if "cfg" not in self.guidance_kinds:
            raise SenseflowError(f"{type(self).__name__} has no unconditional branch: use embedded guidance, not cfg")
        n = x_t.shape[0]
        uncond = self.unconditional(n).to(x_t.device)
        both = self.predict(backbone, torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([cond, uncond]),
                            None if emb is None else torch.cat([emb, emb]))
        pred_c, pred_u = both[:n], both[n:]
        w = expand_like(as_time(guidance.cfg, device=x_t.device), pred_c).to(pred_c.dtype)
        return pred_u + w * (pred_c - pred_u)

    def predict_x0(self, backbone: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning,
                   guidance: Guidance | None = None) -> Tensor:
        pred = self.predict_native(backbone, x_t, t, cond, guidance)
        return self.schedule.to_x0(pred, x_t, as_time(t, device=x_t.device))

    def _embedded_tensor(self, guidance: Guidance, x_t: Tensor) -> Tensor | None:
        if guidance.embedded is None:
            return None
        if "embedded" not in self.guidance_kinds:
            raise SenseflowError(f"{type(self).__name__} has no guidance embedding; use cfg guidance")
        g = torch.as_tensor(guidance.embedded, dtype=torch.float32, device=x_t.device)
        return g.expand(x_t.shape[0]) if g.ndim == 0 else g


class Denoiser(nn.Module):
    """A backbone plus the adapter that knows how to call it; ``forward`` returns ``x0``.

    The adapter is held outside the module tree on purpose: it may own text encoders or a VAE
    that must not be counted as this network's parameters (optimisers, IDA, FSDP, checkpoints).
    """

    def __init__(self, backbone: nn.Module, adapter: ModelAdapter) -> None:
        super().__init__()
        self.backbone = backbone
        object.__setattr__(self, "adapter", adapter)

    @property
    def schedule(self) -> NoiseSchedule:
        return self.adapter.schedule

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning, guidance: Guidance | None = None) -> Tensor:
        with storage_autocast(self.backbone):
            return self.adapter.predict_x0(self.backbone, x_t, t, cond, guidance)

    def native(self, x_t: Tensor, t: Tensor, cond: Conditioning, guidance: Guidance | None = None) -> Tensor:
        with storage_autocast(self.backbone):
            return self.adapter.predict_native(self.backbone, x_t, t, cond, guidance)


def storage_autocast(module: nn.Module):
    """Inside an autocast region, a network STORED in another half type computes in its own dtype.

    Autocast (``train.precision: amp_bf16``) exists to run fp32 master weights in bfloat16.  A
    network whose weights are already stored in a half type chose its compute dtype with
    ``teacher.dtype`` (SDXL's recipes: a float16 teacher).  Left to a bfloat16 autocast, its float16
    inputs and parameters meet bfloat16 activations: autocast's type-promoting ops refuse the mix
    (``torch.cat`` of SDXL's ``text_embeds`` with its time embedding: "Unexpected floating ScalarType
    in at::autocast::prioritize") and CPU norms refuse float16 weights on bfloat16 inputs.  Such a
    network runs under an autocast of its own dtype instead; fp32 networks and networks stored in
    the autocast dtype are unaffected, and outside autocast this does nothing.
    """
    p = next((p for p in module.parameters() if p.is_floating_point()), None)
    if p is None or p.dtype not in (torch.float16, torch.bfloat16):
        return contextlib.nullcontext()
    device_type = p.device.type
    if device_type == "meta" or not torch.is_autocast_enabled(device_type) \
            or torch.get_autocast_dtype(device_type) == p.dtype:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=p.dtype)


def freeze(module: nn.Module) -> nn.Module:
    """Freeze a network: no parameter gradients (inputs still get gradients, as SiD needs)."""
    module.requires_grad_(False)
    module.eval()
    return module


@contextlib.contextmanager
def capture_outputs(module: nn.Module, names: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Record the outputs of named submodules during forwards inside the context (forward hooks).

    Hooks rather than a copied ``forward`` keep us independent of the diffusers release.  For
    modules that return tuples the first element is recorded.
    """
    store: dict[str, Tensor] = {}
    modules = dict(module.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise SenseflowError(f"no submodule named {missing[0]!r} in {type(module).__name__}")
    handles = []
    for name in names:
        def hook(_m, _inp, out, name=name):
            store[name] = out[0] if isinstance(out, (tuple, list)) else out
        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()
