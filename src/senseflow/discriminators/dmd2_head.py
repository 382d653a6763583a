"""DMD2's own GAN term: a small classifier head on the fake score's bottleneck features.

DMD2 (Yin et al. 2024; released code tianweiy/DMD2, ``main/sd_guidance.py``) adds no second
backbone for its adversarial term: the fake score network *is* the discriminator's trunk.  Its
bottleneck features (the UNet mid-block, ``classify_forward``) go through a conv head to ONE
real/fake logit per sample (``SDGuidance.cls_pred_branch``).  As released:

* **inputs** -- real latents and (detached) generator samples, each noised with its OWN fresh
  noise at its OWN time ``t ~ U{0..diffusion_gan_max_timestep-1}`` (``compute_cls_logits`` with
  ``--diffusion_gan --diffusion_gan_max_timestep 1000``: the teacher's training law on SDXL),
  through the fake score without guidance, conditioned on the sample's prompt;
* **classifier loss** (fake-score phase) -- ``softplus(D(fake)).mean() + softplus(-D(real)).mean()``
  (``compute_guidance_clean_cls_loss``), added to the fake-score loss with weight
  ``guidance_cls_loss_weight`` (1e-2 in the SDXL recipe); the head's parameters sit in the fake
  score's optimiser (``optimizer_guidance`` owns ``guidance_model.parameters()``) and the loss also
  trains the fake score's trunk;
* **generator loss** -- ``softplus(-D(G(z))).mean()`` (``compute_generator_clean_cls_loss``), weight
  ``gen_cls_loss_weight`` (5e-3), its gradient reaching G through the frozen fake score and head.
* **head** (SDXL, 1024 px: mid-block ``[B, 1280, 32, 32]``) -- three ``Conv(4, stride 2, pad 1)``
  + ``GroupNorm(32)`` + SiLU stages (32 -> 4), ``Conv(4, stride 4)`` + GN + SiLU (4 -> 1), ``Conv(1x1)``
  to one channel.  :class:`ClassifierHead` builds exactly this from the feature size: stride-2
  stages while the map is larger than 4, then one conv whose kernel covers what is left.

senseflow keeps this and generalises the trunk read-out: the adapter names a
:class:`~senseflow.teachers.base.FeatureTap` (SDXL: ``mid_block``; SD3 / FLUX / SANA / the toy
teacher: the middle transformer block's image tokens, reshaped to their ``h x w`` grid; a custom
model: ``CallableAdapter(feature_tap=...)`` or ``method.gan_head.feature_*``), read with a forward
hook during a normal fake-score forward.  The released code stops the UNet after the mid-block;
we run the whole forward (same features and gradients, more compute).

The head lives on the fake-score :class:`~senseflow.teachers.base.Denoiser` as its submodule
``gan_head``: the trainer puts it in the fake score's optimiser, freezes it in G's phase (the
trainer's "only the current phase's network is trainable" rule: G's GAN gradient never reaches
the head or the fake score), and checkpoints / resumes it inside ``fake_score.safetensors``.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from ..configbase import StrictModel, TimeSamplerConfig
from ..teachers.base import Conditioning, Denoiser, FeatureTap, Guidance, SenseflowError
from .dit_pool import tie_unused_output

if TYPE_CHECKING:  # pragma: no cover
    from ..rng import RandomStreams
    from ..schedules import TimeSampler

#: DMD2's head keeps the trunk's width (1280 for SDXL); wider trunks (FLUX 3072) are capped here
DEFAULT_MAX_WIDTH = 1280
#: the released head downsamples until the map is 4 x 4, then one conv covers it
FINAL_SIDE = 4
HEAD_ATTRIBUTE = "gan_head"


class GANHeadConfig(StrictModel):
    """DMD2's classifier head on the fake score (``method.gan_head``); off unless ``enabled``."""

    enabled: bool = Field(False, description="DMD2's GAN term: a classifier head on the fake score's bottleneck "
                                             "features, trained in the fake-score phase (needs real latents)")
    generator_weight: float = Field(5e-3, ge=0.0, description="weight of softplus(-D(G)) in G's loss "
                                                             "(released SDXL recipe: gen_cls_loss_weight 5e-3)")
    classifier_weight: float = Field(1e-2, ge=0.0, description="weight of softplus(D(fake)) + softplus(-D(real)) in "
                                                              "the fake-score loss (guidance_cls_loss_weight 1e-2)")
    lr: float | None = Field(None, gt=0.0, description="learning rate of the head's own parameters (None = the "
                                                        "fake score's, as released: the head is in optimizer_guidance)")
    time: TimeSamplerConfig = Field(
        TimeSamplerConfig(kind="teacher"),
        description="noise level of the classified latents, drawn per sample (teacher = the teacher's training law: "
                    "U{0..999} on SDXL, the released --diffusion_gan_max_timestep 1000)")
    layer: str | None = Field(None, description="qualified submodule to read (None = the adapter's bottleneck: "
                                                "SDXL mid_block, DiTs the middle transformer block)")
    feature_channels: int | None = Field(None, ge=1, description="width of the tapped features (custom models "
                                                                 "whose adapter names no tap; with feature_size)")
    feature_size: tuple[int, int] | None = Field(None, description="(h, w) of the tapped map or token grid")
    feature_index: int = Field(0, ge=0, description="element of a tuple output holding the image features")
    width: int | None = Field(None, ge=1, description="channels of the head's convs (None = the feature width, "
                                                      "capped at 1280; released SDXL: 1280)")
    seed: int = Field(0, description="initialisation seed of the head (equal on every rank)")
    depths: list[float] | None = Field(
        None, description="read several blocks, one head each, at these fractions of the adapter's tappable blocks "
                          "(block floor(d * n), clipped to n - 1, repeats dropped; e.g. [0.5, 0.75, 0.99] as NVIDIA "
                          "FastGen's feature_indices); None = the single layer")

    @field_validator("depths")
    @classmethod
    def _depths(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or any(not 0.0 < d <= 1.0 for d in v)):
            raise ValueError(f"depths must be a non-empty list of fractions in (0, 1], got {v}")
        return v

    @field_validator("feature_size")
    @classmethod
    def _size(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and min(v) < 1:
            raise ValueError(f"feature_size must be positive, got {list(v)}")
        return v


def gan_classifier_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """The released classifier loss: ``softplus(D(fake)).mean() + softplus(-D(real)).mean()``."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def gan_generator_loss(fake_logits: Tensor) -> Tensor:
    """The released generator loss: ``softplus(-D(G(z))).mean()`` (non-saturating)."""
    return F.softplus(-fake_logits).mean()


#: GroupNorm groups of the released head (1280 channels: 40 per group)
GROUPS = 32
#: at least this many channels per group: the head's last GroupNorm sees a 1 x 1 map, where a group
#: of one channel normalises to a constant and the logit would ignore its input
MIN_GROUP_CHANNELS = 8


def _groups(channels: int) -> int:
    """32 groups as released when they fit, else the most that keep >= 8 channels per group."""
    for g in range(min(GROUPS, max(1, channels // MIN_GROUP_CHANNELS)), 0, -1):
        if channels % g == 0:
            return g
    return 1


class ClassifierHead(nn.Module):
    """``[B, C, h, w]`` features -> ``[B]`` logits, DMD2's ``cls_pred_branch`` for any map size."""

    def __init__(self, in_channels: int, size: tuple[int, int], width: int) -> None:
        super().__init__()
        h, w = int(size[0]), int(size[1])
        self.size = (h, w)
        layers: list[nn.Module] = []
        c = in_channels
        while min(h, w) > FINAL_SIDE:
            layers += [nn.Conv2d(c, width, kernel_size=4, stride=2, padding=1), nn.GroupNorm(_groups(width), width),
                       nn.SiLU()]
            c, h, w = width, h // 2, w // 2
        layers += [nn.Conv2d(c, width, kernel_size=(h, w), stride=(h, w)), nn.GroupNorm(_groups(width), width),
                   nn.SiLU(), nn.Conv2d(width, 1, kernel_size=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features).flatten(1).squeeze(1)


def as_map(features: Tensor, size: tuple[int, int]) -> Tensor:
    """``[B, C, h, w]`` as is; ``[B, h*w, D]`` tokens (row-major) -> ``[B, D, h, w]``; ``[B, C]`` vectors
    (an MLP's hidden state, size ``(1, 1)``) -> ``[B, C, 1, 1]``."""
    h, w = size
    if features.ndim == 2:
        if (h, w) != (1, 1):
            raise SenseflowError(f"GAN head: the tapped layer outputs [B, C] vectors; feature_size must be (1, 1), "
                                 f"got {(h, w)}")
        return features[:, :, None, None]
    if features.ndim == 4:
        if tuple(features.shape[-2:]) != (h, w):
            raise SenseflowError(f"GAN head: the tapped map is {tuple(features.shape[-2:])}, expected {(h, w)}; "
                                 f"fix method.gan_head.feature_size")
        return features
    if features.ndim == 3:
        if features.shape[1] != h * w:
            raise SenseflowError(f"GAN head: the tapped layer gives {features.shape[1]} tokens, expected {h}x{w}; "
                                 f"fix method.gan_head.feature_size (or feature_index)")
        return features.reshape(features.shape[0], h, w, features.shape[2]).permute(0, 3, 1, 2)
    raise SenseflowError(f"GAN head: the tapped layer outputs a {features.ndim}-D tensor; tap a layer with "
                         f"[B, C, H, W] maps or [B, N, D] tokens")


@contextlib.contextmanager
def record_feature(backbone: nn.Module, tap: FeatureTap) -> Iterator[list[Tensor]]:
    """The tapped output of every forward of ``tap.name`` inside the context, in call order."""
    calls: list[Tensor] = []

    def hook(_m, _inp, out):
        if isinstance(out, (tuple, list)):
            if tap.index >= len(out):
                raise SenseflowError(f"GAN head: {tap.name!r} returns {len(out)} outputs; feature_index "
                                     f"{tap.index} is out of range")
            out = out[tap.index]
        calls.append(out)

    handle = backbone.get_submodule(tap.name).register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def resolve_tap(denoiser: Denoiser, cfg: GANHeadConfig) -> FeatureTap:
    """The tap from ``method.gan_head.feature_*`` if given, else from the adapter; a one-line error otherwise."""
    backbone = denoiser.backbone
    if cfg.feature_channels is not None or cfg.feature_size is not None:
        if cfg.layer is None or cfg.feature_channels is None or cfg.feature_size is None:
            raise SenseflowError("method.gan_head: give layer, feature_channels and feature_size together "
                                 "(or none of them to use the adapter's bottleneck)")
        tap = FeatureTap(cfg.layer, cfg.feature_channels, tuple(cfg.feature_size), cfg.feature_index)
    else:
        tap = denoiser.adapter.feature_tap(backbone, cfg.layer)
        if tap is None:
            raise SenseflowError(f"method.gan_head: {type(denoiser.adapter).__name__} names no bottleneck features; "
                                 f"give method.gan_head.layer, feature_channels and feature_size (or "
                                 f"CallableAdapter(feature_tap=...))")
    if tap.name not in dict(backbone.named_modules()):
        raise SenseflowError(f"method.gan_head.layer: no submodule {tap.name!r} in {type(backbone).__name__}")
    return tap


def depth_blocks(blocks: list[str], depths: list[float]) -> list[str]:
    """``blocks[min(floor(d * n), n - 1)]`` for each depth, repeats dropped, in the order given.

    ``floor(0.5 * n)`` is :func:`~senseflow.teachers.base.middle_block_tap`'s default block, so
    ``depths: [0.5]`` reads what ``layer: null`` reads on a DiT."""
    if not blocks:
        raise SenseflowError("method.gan_head.depths: the backbone names no blocks to read features from")
    n, names = len(blocks), []
    for d in depths:
        name = blocks[min(int(math.floor(d * n)), n - 1)]
        if name not in names:
            names.append(name)
    return names


def resolve_taps(denoiser: Denoiser, cfg: GANHeadConfig) -> list[FeatureTap]:
    """One tap per depth (``method.gan_head.depths``), each through the adapter's ``feature_tap`` at that block
    (or ``feature_*`` when given); a one-line error when the family names no tap."""
    if cfg.layer is not None:
        raise SenseflowError("method.gan_head: give layer or depths, not both (depths picks the layers)")
    blocks = depth_blocks(denoiser.adapter.feature_blocks(denoiser.backbone), cfg.depths)
    if cfg.feature_channels is None and cfg.feature_size is None:
        if denoiser.adapter.feature_tap(denoiser.backbone, None) is None:
            raise SenseflowError(f"method.gan_head.depths: {type(denoiser.adapter).__name__} names no block features "
                                 f"to tap; give method.gan_head.layer, feature_channels and feature_size instead")
    return [resolve_tap(denoiser, cfg.model_copy(update={"layer": name, "depths": None})) for name in blocks]


class GANHead(nn.Module):
    """The classifier head plus where it reads: ``logits(fake_score, x_t, t, cond)`` -> ``[B]``."""

    def __init__(self, tap: FeatureTap, width: int | None = None, seed: int = 0) -> None:
        super().__init__()
        self.tap = tap
        width = width or min(tap.channels, DEFAULT_MAX_WIDTH)
        with torch.random.fork_rng(devices=[]):  # same init on every rank, global RNG untouched
            torch.manual_seed(seed)
            self.head = ClassifierHead(tap.channels, tap.size, width)

    def logits(self, fake_score: Denoiser, x_t: Tensor, t: Tensor, cond: Conditioning,
               guidance: Guidance | None = None) -> Tensor:
        """One fake-score forward; the head classifies the tapped features of its (conditional) rows."""
        n = x_t.shape[0]
        with record_feature(fake_score.backbone, self.tap) as calls:
            out = fake_score.native(x_t, t, cond, guidance)
        if not calls:
            raise SenseflowError(f"GAN head: {self.tap.name!r} did not run in the fake score's forward")
        return tie_unused_output(self(as_map(calls[0][:n], self.tap.size)), out, fake_score.backbone)

    def forward(self, features: Tensor) -> Tensor:
        """Features ``[B, C, h, w]`` -> logits ``[B]`` (fp32); called through the module so FSDP's hooks run."""
        param = next(self.head.parameters())
        return self.head(features.to(param.dtype)).float()

    def noisy_logits(self, fake_score: Denoiser, x0: Tensor, cond: Conditioning, time: "TimeSampler",
                     rng: "RandomStreams", guidance: Guidance | None = None) -> Tensor:
        """Logits of ``x0`` noised with fresh noise at a fresh per-sample time (``compute_cls_logits``)."""
        schedule = fake_score.schedule
        t = time.sample(x0.shape[0], schedule, rng.local, rng.device).to(x0.device)
        x_t = schedule.add_noise(x0, rng.randn_like(x0), t)
        return self.logits(fake_score, x_t, t, cond, guidance)


class MultiGANHead(nn.Module):
    """Several :class:`GANHead` s on blocks at different depths, read in ONE fake-score forward.

    ``logits`` concatenates the heads' ``[B]`` logits to ``[K * B]`` (head-major), so the released
    softplus losses, means over that vector, are the MEAN of the K per-head losses (equal B per
    head).  NVIDIA FastGen does the same: ``Discriminator_ImageDiT.forward``
    (``fastgen/networks/discriminators.py``) returns ``torch.cat`` of its per-index heads' logits,
    ``[B, K]``, and ``gan_loss_generator`` / ``gan_loss_discriminator``
    (``fastgen/methods/common_loss.py``) take ``softplus(...).mean()`` over all of them."""

    def __init__(self, taps: list[FeatureTap], width: int | None = None, seed: int = 0) -> None:
        super().__init__()
        self.heads = nn.ModuleList(GANHead(tap, width, seed + k) for k, tap in enumerate(taps))

    def logits(self, fake_score: Denoiser, x_t: Tensor, t: Tensor, cond: Conditioning,
               guidance: Guidance | None = None) -> Tensor:
        """``[K * B]``: every head's logits of the same forward, head after head."""
        n = x_t.shape[0]
        with contextlib.ExitStack() as stack:
            calls = [stack.enter_context(record_feature(fake_score.backbone, h.tap)) for h in self.heads]
            out = fake_score.native(x_t, t, cond, guidance)
        for head, got in zip(self.heads, calls):
            if not got:
                raise SenseflowError(f"GAN head: {head.tap.name!r} did not run in the fake score's forward")
        maps = [as_map(got[0][:n], head.tap.size) for head, got in zip(self.heads, calls)]
        return tie_unused_output(self(maps), out, fake_score.backbone)

    def forward(self, maps: list[Tensor]) -> Tensor:
        """Per-head feature maps -> concatenated logits; through the root module so FSDP's hooks run."""
        return torch.cat([head(m) for head, m in zip(self.heads, maps)])

    def noisy_logits(self, fake_score: Denoiser, x0: Tensor, cond: Conditioning, time: "TimeSampler",
                     rng: "RandomStreams", guidance: Guidance | None = None) -> Tensor:
        """As :meth:`GANHead.noisy_logits`: one fresh noise and time per sample, shared by the heads."""
        schedule = fake_score.schedule
        t = time.sample(x0.shape[0], schedule, rng.local, rng.device).to(x0.device)
        x_t = schedule.add_noise(x0, rng.randn_like(x0), t)
        return self.logits(fake_score, x_t, t, cond, guidance)


def gan_head_of(fake_score: Denoiser | None) -> "GANHead | MultiGANHead | None":
    return getattr(fake_score, HEAD_ATTRIBUTE, None) if fake_score is not None else None


def attach_gan_head(fake_score: Denoiser, cfg: GANHeadConfig,
                    device: torch.device | str | None = None) -> GANHead | MultiGANHead:
    """Build the (fp32) head for ``fake_score`` and register it as its submodule ``gan_head`` (idempotent).

    ``device`` defaults to the backbone's (CPU when the backbone waits on the meta device).
    """
    existing = gan_head_of(fake_score)
    if existing is not None:
        return existing
    taps = resolve_taps(fake_score, cfg) if cfg.depths is not None else [resolve_tap(fake_score, cfg)]
    if device is None:
        param = next(fake_score.backbone.parameters(), None)
        device = param.device if param is not None and not param.is_meta else "cpu"
    head = (GANHead(taps[0], cfg.width, cfg.seed) if cfg.depths is None
            else MultiGANHead(taps, cfg.width, cfg.seed)).to(device)
    fake_score.add_module(HEAD_ATTRIBUTE, head)
    return head


def check_gan_data(config) -> None:
    """Fail before anything is written when the run's data has no real latents (a plain prompt file)."""
    from ..config import TOY_WORLDS

    paths = config.paths
    if paths.prompts is not None and paths.prompts not in TOY_WORLDS and paths.cache is None:
        raise SenseflowError(f"method.gan_head needs real latents but paths.prompts {paths.prompts!r} gives prompts "
                             f"only: use paths.image_text / paths.lmdb / a latent cache or a toy world, or set "
                             f"method.gan_head.enabled: false")


def require_real_latents(batch_latents: Tensor | None, x: Tensor) -> Tensor:
    """Real latents shaped like G's samples, or a one-line error (DMD2's GAN term needs data)."""
    if batch_latents is None:
        raise SenseflowError("method.gan_head needs real latents: train on image-text / LMDB / latent-cache data or "
                             "a toy world (the batch has none), or set method.gan_head.enabled: false")
    real = batch_latents.to(device=x.device, dtype=x.dtype)
    if real.shape != x.shape:
        raise SenseflowError(f"method.gan_head: real latents have shape {tuple(real.shape)} but generator samples "
                             f"{tuple(x.shape)}: encode the data at the training resolution")
    return real
