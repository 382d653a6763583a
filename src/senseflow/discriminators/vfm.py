"""SenseFlow's vision-foundation-model (VFM) discriminator: frozen DINOv2 + frozen CLIP text + trainable heads.

Pipeline for a batch of latents ``x0`` (what the method hands the adversarial slot)::

    images = adapter.decode(x0)                      # [-1, 1]; gradient flows through the VAE decoder
    judged = diff_augment(images)                    # colour / translation / cutout, judged image only
    pixels = imagenet_normalise((resize(judged) + 1) / 2)
    hidden_states = DINOv2(pixels, output_hidden_states=True)
    for each tapped layer l:                          # one head per layer
        fmap_l = (patch tokens + CLS token) reshaped to [B, D, H/p, W/p]
        h_l    = trunk_l(fmap_l)                       # [B, 64, h', w']
        cond_l = cmapper_l(clip_text(prompt)) + mean_hw trunk_l(fmap_l(reference image))
        logit_l = sum_c h_l[:, c] * cond_l[:, c] / sqrt(64)   # per location
    logits = concat_l flatten(logit_l)               # [B, L]

Layer indexing (``layers``): indices into DINOv2's ``hidden_states`` tuple -- ``0`` is the embedding
output (patch embedding + CLS + position embedding), ``i >= 1`` the output of block ``i`` (1-based,
before the final layer norm).  The released code's taps for ViT-L/14 ("patch embedding + blocks 2, 5,
8, 10, 14, 19, 23", 0-based blocks) are therefore ``(0, 3, 6, 9, 11, 15, 20, 24)``, the default.

Heads: spectral-normalised (``torch.nn.utils.parametrizations.spectral_norm``) conv trunk -- 1x1 conv,
local batch norm, LeakyReLU(0.2), then ``head_downsamples`` x (strided 3x3 conv block + residual 3x3
block), then a 1x1 conv to ``cmap_dim`` (64) channels.  The batch norm normalises over the local
(per-process) batch and spatial positions with NO running statistics (train and eval behave the
same); under DDP/FSDP it is NOT synchronised across ranks -- each rank normalises its own batch.
Real, fake and reference batches pass the heads separately, so each is normalised by its own
statistics (as in Projected GAN / StyleGAN-T).

Input-size policy:
  * ``resize`` (default): bilinear, antialiased resize to ``image_size`` x ``image_size`` (224 ->
    16 x 16 patches for /14); non-square images are squashed.  Cost is independent of the training
    resolution.
  * ``native``: the decoded resolution, rounded to a multiple of the patch size, with DINOv2's
    bicubically interpolated position embeddings (``Dinov2Embeddings.interpolate_pos_encoding``,
    applied automatically by transformers' ``Dinov2Model`` whenever the token grid differs from the
    pre-training grid).  Memory: tokens grow as ``(H/14)^2`` -- 1024 px gives 73 x 73 = 5329 tokens vs
    256 at 224 px (~21x the activations, more with attention); G's step stores DINOv2-L activations
    for the input gradient, roughly 8-10 GB per 1024-px image in fp32.  Use ``resize`` unless
    you have the memory.

Reference image (``reference``):
  * ``"other"`` (default): for sample ``i`` the reference is the real image of the next batch element
    (cyclically after ``i``) with exactly the same prompt string; when no other element has that
    prompt, the next batch element ``(i + 1) % B`` (whatever its prompt); with ``B == 1`` this is the
    image itself (= ``"self"``).  Real ``i`` and fake ``i`` use the same reference.  Pairing happens
    within a (micro-)batch.
  * ``"self"``: the released code -- real image ``i`` is its own reference (and fake ``i``'s).
  * ``"none"``: no reference path (``refmap = 0``); then G's step needs no real data.
  Why ``"other"`` is the default: with ``"self"`` the judged real image and its reference are the same
  picture (up to augmentation), so D can separate real from fake by a feature-identity test instead
  of judging realism, and G is then pushed to copy its paired dataset image.  ``"other"`` keeps the
  reference semantics (a real image for the prompt) where the data offers one and removes the
  shortcut whenever the batch holds another image; set ``"self"`` to reproduce the released code.

The frozen DINOv2, CLIP text model, tokenizer and the teacher adapter are held OUTSIDE the module
tree: ``state_dict`` / checkpoints, ``parameters()`` and FSDP see only the heads, while ``.to()``
moves the backbones too.  During G's step the heads run in eval mode, so the spectral norm's power
iteration does not advance: G's step leaves every tensor of the discriminator unchanged.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from ..rng import derive_seed
from ..teachers import loading
from ..teachers.base import SenseflowError
from .augment import diff_augment
from .base import AdversarialTerm, hinge_discriminator_loss, hinge_fake_loss, hinge_generator_loss
from .config import VFMDiscriminatorConfig

if TYPE_CHECKING:  # pragma: no cover
    from ..methods.base import Batch, LossOutput
    from ..teachers.base import ModelAdapter

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# -------------------------------------------------------------------------------------------------
# Loading the frozen backbones
# -------------------------------------------------------------------------------------------------
def _model_folder(path: str | os.PathLike, key: str, expected: Sequence[str]) -> Path:
    folder = Path(os.path.expanduser(str(path)))
    if not folder.is_dir():
        raise SenseflowError(f"discriminator.{key}: {str(path)!r} is not a directory; point it at a local "
                             f"{' / '.join(expected)} folder (nothing is downloaded)")
    config = loading.read_config(folder)
    found = loading.config_class_name(config)
    if found not in expected:
        raise SenseflowError(f"discriminator.{key}: {folder}/config.json is a {found or 'model of unknown class'}, "
                             f"expected {' or '.join(expected)}")
    loading.require_weights(folder)
    return folder


def load_dinov2(path: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """A frozen ``transformers.Dinov2Model`` from a local folder (one-line errors)."""
    from transformers import Dinov2Model

    folder = _model_folder(path, "dinov2_path", ("Dinov2Model",))
    return loading.load_model(Dinov2Model, folder, expected_class="Dinov2Model", dtype=dtype, frozen=True,
                              adapter="VFM discriminator")


def find_tokenizer_folder(path: str | os.PathLike) -> Path:
    """The CLIP tokenizer next to a text model: the folder itself, ``tokenizer/`` in it, or a sibling ``tokenizer/``."""
    folder = Path(os.path.expanduser(str(path)))
    for candidate in (folder, folder / "tokenizer", folder.parent / "tokenizer"):
        if loading.tokenizer_files_present(candidate):
            return candidate
    raise SenseflowError(f"discriminator.clip_path: no tokenizer files in {folder}, {folder}/tokenizer or "
                         f"{folder.parent}/tokenizer; copy the CLIP tokenizer (tokenizer.json or vocab.json + "
                         f"merges.txt) next to the text model")


def load_clip_text(path: str | os.PathLike, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
    """A frozen ``CLIPTextModelWithProjection`` (also from a full ``CLIPModel`` folder) and its tokenizer."""
    from transformers import CLIPTextModelWithProjection

    folder = _model_folder(path, "clip_path", ("CLIPTextModelWithProjection", "CLIPModel"))
    tokenizer = loading.load_tokenizer(find_tokenizer_folder(folder))
    extra: dict[str, Any] = {}
    config = loading.read_config(folder)
    if loading.config_class_name(config) == "CLIPModel":
        # a full CLIP folder: the text tower's projection width is the top-level projection_dim
        from transformers import CLIPTextConfig

        text_config = CLIPTextConfig.from_pretrained(str(folder), local_files_only=True)
        if "projection_dim" in config:
            text_config.projection_dim = int(config["projection_dim"])
        extra["config"] = text_config
    model = loading.load_model(CLIPTextModelWithProjection, folder,
                               expected_class=("CLIPTextModelWithProjection", "CLIPModel"), dtype=dtype,
                               frozen=True, adapter="VFM discriminator", **extra)
    return model, tokenizer


# -------------------------------------------------------------------------------------------------
# Heads
# -------------------------------------------------------------------------------------------------
class LocalBatchNorm2d(nn.Module):
    """Batch norm over the local batch and positions, no running statistics (same in train and eval).

    Equivalent to ``nn.BatchNorm2d(c, track_running_stats=False)`` except that a single value per
    channel (batch 1 with a 1x1 map) is allowed (it normalises to the bias) instead of raising.
    NOT synchronised across processes.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        mean = xf.mean(dim=(0, 2, 3), keepdim=True)
        var = xf.var(dim=(0, 2, 3), keepdim=True, unbiased=False)
        y = ((xf - mean) * torch.rsqrt(var + self.eps)).to(x.dtype)
        return y * self.weight.view(1, -1, 1, 1).to(y.dtype) + self.bias.view(1, -1, 1, 1).to(y.dtype)


def sn_conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Module:
    return spectral_norm(nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2))


class ConvBlock(nn.Sequential):
    """Spectral-normalised conv -> local batch norm -> LeakyReLU(0.2)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1) -> None:
        super().__init__(sn_conv(cin, cout, kernel, stride), LocalBatchNorm2d(cout), nn.LeakyReLU(0.2))


class ResidualBlock(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return (x + self.fn(x)) / math.sqrt(2.0)


class VFMHead(nn.Module):
    """One discriminator head on one DINOv2 layer's feature map."""

    def __init__(self, in_dim: int, channels: int, cmap_dim: int, text_dim: int, downsamples: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBlock(in_dim, channels, 1)]
        for _ in range(downsamples):
            layers += [ConvBlock(channels, channels, 3, stride=2), ResidualBlock(ConvBlock(channels, channels, 3))]
        layers.append(sn_conv(channels, cmap_dim, 1))
        self.trunk = nn.Sequential(*layers)
        self.cmapper = nn.Linear(text_dim, cmap_dim)
        self.cmap_dim = cmap_dim

    def condition(self, text: Tensor, ref_fmap: Tensor | None) -> Tensor:
        """``cmap + refmap``: ``[B, cmap_dim]``."""
        cond = self.cmapper(text.to(self.cmapper.weight.dtype))
        if ref_fmap is not None:
            cond = cond + self.trunk(ref_fmap).mean(dim=(2, 3))
        return cond

    def forward(self, fmap: Tensor, text: Tensor, ref_fmap: Tensor | None = None) -> Tensor:
        """Logits ``[B, h' * w']``: ``sum_c h_c * (cmap_c + refmap_c) / sqrt(cmap_dim)`` per location."""
        h = self.trunk(fmap)
        cond = self.condition(text, ref_fmap)
        return (h * cond[:, :, None, None].to(h.dtype)).sum(dim=1).flatten(1) / math.sqrt(self.cmap_dim)


# -------------------------------------------------------------------------------------------------
# The discriminator
# -------------------------------------------------------------------------------------------------
def reference_indices(prompts: Sequence[str], mode: str) -> list[int] | None:
    """Which batch element's real image is sample ``i``'s reference (``None`` for mode ``"none"``)."""
    n = len(prompts)
    if mode == "none":
        return None
    if mode == "self":
        return list(range(n))
    if mode != "other":
        raise ValueError(f"unknown reference mode {mode!r}")
    out = []
    for i, p in enumerate(prompts):
        same = [(j - i) % n for j in range(n) if j != i and prompts[j] == p]
        out.append((i + min(same)) % n if same else (i + 1) % n)
    return out


class VFMDiscriminator(AdversarialTerm):
    """See the module docstring.  Build with :func:`senseflow.discriminators.config.build_vfm_discriminator`."""

    def __init__(self, config: VFMDiscriminatorConfig, adapter: "ModelAdapter", dinov2: nn.Module,
                 clip_text: nn.Module, tokenizer: Any, rank: int = 0) -> None:
        super().__init__()
        self.config = config
        # frozen parts live outside the module tree (not in state_dict / parameters / FSDP)
        object.__setattr__(self, "adapter", adapter)
        object.__setattr__(self, "dinov2", dinov2.requires_grad_(False).eval())
        object.__setattr__(self, "clip_text", clip_text.requires_grad_(False).eval())
        object.__setattr__(self, "tokenizer", tokenizer)
        dcfg = dinov2.config
        self.layers = config.resolve_layers(int(dcfg.num_hidden_layers))
        patch = dcfg.patch_size
        self.patch_size = int(patch if isinstance(patch, int) else patch[0])
        config.check_image_size(self.patch_size)
        self.text_dim = config.check_text_width(int(clip_text.config.projection_dim))
        with torch.random.fork_rng(devices=[], enabled=config.seed is not None):
            if config.seed is not None:  # the heads' init (weights, spectral-norm vectors): same run for the same seed
                torch.manual_seed(derive_seed(config.seed, "vfm-heads"))
            self.heads = nn.ModuleList(
                VFMHead(int(dcfg.hidden_size), config.head_channels, config.cmap_dim, self.text_dim,
                        config.head_downsamples) for _ in self.layers)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.aug_generator: torch.Generator | None = None
        if config.seed is not None:
            self.aug_generator = torch.Generator().manual_seed(derive_seed(config.seed, "vfm-augment", rank))
        self.max_text_length = loading.tokenizer_max_length(tokenizer, 77) or 77

    # -- module plumbing -------------------------------------------------------------------------
    def _apply(self, fn, recurse: bool = True):  # noqa: D401 - torch hook
        """``.to()`` / ``.cuda()`` / ``.float()`` also reach the frozen backbones (outside the tree)."""
        super()._apply(fn, recurse)
        for m in (self.dinov2, self.clip_text):
            m._apply(fn)
        return self

    def trainable_parameters(self):
        return self.heads.parameters()

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # -- images ----------------------------------------------------------------------------------
    def decode(self, x0: Tensor) -> Tensor:
        """Latents -> images in ``[-1, 1]`` with the teacher adapter (gradient flows when enabled)."""
        if self.config.decode_checkpointing and torch.is_grad_enabled() and x0.requires_grad:
            from torch.utils.checkpoint import checkpoint

            images = checkpoint(self.adapter.decode, x0, use_reentrant=False)
        else:
            images = self.adapter.decode(x0)
        return images.float()

    def real_images(self, batch: "Batch") -> Tensor:
        """Real images of a batch: ``batch.images`` when the data provides them, else decoded ``batch.latents``."""
        images = getattr(batch, "images", None)
        if images is not None:
            return images.float()
        if batch is None or batch.latents is None:
            raise SenseflowError("the VFM discriminator needs real images, but the batch has no latents "
                                 "(data-free prompts): train on image-text data, or drop the discriminator")
        with torch.no_grad():
            return self.decode(batch.latents.detach())

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        if self.config.input_policy == "resize":
            return self.config.image_size, self.config.image_size
        p = self.patch_size
        return max(p, int(round(height / p)) * p), max(p, int(round(width / p)) * p)

    def preprocess(self, images: Tensor) -> Tensor:
        """``[-1, 1]`` images -> DINOv2 pixel values (size policy, ``[0, 1]``, ImageNet normalisation)."""
        size = self.input_size(images.shape[-2], images.shape[-1])
        if tuple(images.shape[-2:]) != size:
            down = size[0] < images.shape[-2] or size[1] < images.shape[-1]
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=down)
        x = (images + 1.0) / 2.0
        return (x - self.pixel_mean.to(x.dtype)) / self.pixel_std.to(x.dtype)

    def augment(self, images: Tensor) -> Tensor:
        if not self.config.augment:
            return images
        return diff_augment(images, self.config.augment, translation_ratio=self.config.translation_ratio,
                            cutout_ratio=self.config.cutout_ratio, generator=self.aug_generator)

    # -- features --------------------------------------------------------------------------------
    def feature_maps(self, pixels: Tensor) -> list[Tensor]:
        """One ``[B, D, H/p, W/p]`` map per tapped layer (patch tokens + CLS token), float32."""
        dtype = loading.module_dtype(self.dinov2)
        out = self.dinov2(pixel_values=pixels.to(dtype), output_hidden_states=True)
        hidden = out.hidden_states
        b = pixels.shape[0]
        h, w = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        maps = []
        for i in self.layers:
            tokens = hidden[i]
            fmap = tokens[:, 1:1 + h * w] + tokens[:, :1]
            maps.append(fmap.float().reshape(b, h, w, -1).permute(0, 3, 1, 2))
        return maps

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> Tensor:
        """Projected CLIP text embeddings ``[B, text_dim]`` (L2-normalised unless ``normalize_text=False``)."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_text_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        emb = self.clip_text(input_ids=ids).text_embeds.float()
        return F.normalize(emb, dim=-1) if self.config.normalize_text else emb

    def head_logits(self, fmaps: list[Tensor], text: Tensor, ref_fmaps: list[Tensor] | None) -> Tensor:
        parts = [head(f, text, None if ref_fmaps is None else ref_fmaps[k])
                 for k, (head, f) in enumerate(zip(self.heads, fmaps))]
        return torch.cat(parts, dim=1)

    def reference_maps(self, real: Tensor | None, prompts: Sequence[str]) -> list[Tensor] | None:
        """DINOv2 maps of each sample's (un-augmented) reference image, no gradient."""
        idx = reference_indices(prompts, self.config.reference)
        if idx is None:
            return None
        if real is None:
            raise SenseflowError("the VFM discriminator's reference image needs real images in the batch; "
                                 "set discriminator.reference: none for data-free training")
        with torch.no_grad():
            maps = self.feature_maps(self.preprocess(real))
        index = torch.tensor(idx, device=maps[0].device)
        return [m.index_select(0, index) for m in maps]

    def forward(self, images: Tensor, prompts: Sequence[str], reference: Tensor | None = None) -> Tensor:
        """Logits ``[B, L]`` for judged images in ``[-1, 1]``; ``reference`` = the real batch to pair from."""
        fmaps = self.feature_maps(self.preprocess(self.augment(images)))
        return self.head_logits(fmaps, self.text_embeddings(prompts), self.reference_maps(reference, prompts))

    # -- the adversarial slot ------------------------------------------------------------------
    def generator_loss(self, x0: Tensor, batch: "Batch") -> Tensor:
        """Per-sample ``-mean(D(decode(x0)))``; heads in eval mode (no spectral-norm state update)."""
        reference = self.real_images(batch) if self.config.reference != "none" else None
        was_training = self.training
        self.eval()
        try:
            logits = self(self.decode(x0), batch.prompts, reference)
        finally:
            self.train(was_training)
        return hinge_generator_loss(logits)

    def discriminator_loss(self, x0_fake: Tensor, batch: "Batch") -> "LossOutput":
        """Hinge loss on real images vs ``sg(decoded G samples)``; real and fake share text and references."""
        from ..methods.base import LossOutput

        real = self.real_images(batch)
        with torch.no_grad():
            fake = self.decode(x0_fake.detach())
            both = self.preprocess(self.augment(torch.cat([real, fake])))
            fmaps = self.feature_maps(both)
        n = real.shape[0]
        text = self.text_embeddings(batch.prompts)
        refs = self.reference_maps(real, batch.prompts)
        logits_real = self.head_logits([m[:n] for m in fmaps], text, refs)
        logits_fake = self.head_logits([m[n:] for m in fmaps], text, refs)
        w = self.config.mismatch_weight
        mismatch = self.mismatch_logits([m[:n] for m in fmaps], text, refs, batch.prompts) if w > 0 else None
        loss = hinge_discriminator_loss(logits_real, logits_fake, mismatch, mismatch_share=w)
        logs = {"loss_d": loss.detach(), "d_real": logits_real.detach().mean(), "d_fake": logits_fake.detach().mean(),
                "d_accuracy": 0.5 * ((logits_real > 0).float().mean() + (logits_fake < 0).float().mean()).detach()}
        if mismatch is not None:
            logs.update({"loss_d_mismatch": hinge_fake_loss(mismatch).detach(), "d_mismatch": mismatch.detach().mean()})
        return LossOutput(loss, logs)

    def mismatch_logits(self, real_fmaps: list[Tensor], text: Tensor, refs: list[Tensor] | None,
                        prompts: list[str]) -> Tensor | None:
        """D's logits on real images paired with the next element's prompt, for the elements whose next prompt
        differs (None when none does): the inputs of GAN-CLS's / GigaGAN's matching-aware term.

        Why: a projection discriminator can score realism alone and ignore the text; calling real images with the
        wrong prompt fake is what makes it judge whether an image shows its prompt (and G's gradient with it).
        """
        n = len(prompts)
        shifted = [(i + 1) % n for i in range(n)]
        keep = torch.tensor([prompts[i] != prompts[j] for i, j in enumerate(shifted)], device=text.device)
        if not bool(keep.any()):
            return None
        idx = torch.tensor(shifted, device=text.device)
        return self.head_logits(real_fmaps, text[idx], refs)[keep]
