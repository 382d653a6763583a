"""Differentiable augmentation (DiffAugment-style: colour, translation, cutout), pure PyTorch.

Every op is differentiable w.r.t. the image (the random parameters are constants), so it can sit
between the generator and the discriminator in G's step.  The VFM discriminator applies it to the
*judged* image only (real or fake), never to the reference image.

Conventions
  * images are ``[B, C, H, W]`` in ``[-1, 1]`` (the DiffAugment convention; the brightness shift
    ``U(-0.5, 0.5)`` is in those units);
  * parameters are drawn per sample on the CPU -- from ``generator`` when given, otherwise from
    torch's global CPU generator, whose state is part of every senseflow checkpoint
    (:meth:`senseflow.rng.RandomStreams.state_dict`) -- and then moved to the image's device, so
    the draws do not depend on the device and a resumed run repeats them;
  * ops: ``color`` = brightness (add ``U(-.5, .5)``), saturation (scale the deviation from the
    per-pixel channel mean by ``U(0, 2)``), contrast (scale the deviation from the per-image mean
    by ``U(.5, 1.5)``); ``translation`` = integer shift of up to ``ratio * size`` pixels per axis
    with zero fill; ``cutout`` = one zeroed square of side ``ratio * size`` (clipped at the border).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor

POLICIES: tuple[str, ...] = ("color", "translation", "cutout")


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None, like: Tensor) -> Tensor:
    u = torch.rand(n, generator=generator, dtype=torch.float32)
    return (low + (high - low) * u).to(device=like.device, dtype=like.dtype).view(n, 1, 1, 1)


def _randint(n: int, low: int, high: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Integers in ``[low, high]`` (inclusive), drawn on the CPU."""
    return torch.randint(low, high + 1, (n,), generator=generator).to(device)


def color(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Brightness, saturation and contrast jitter (in that order)."""
    n = x.shape[0]
    x = x + _uniform(n, -0.5, 0.5, generator, x)
    mean_c = x.mean(dim=1, keepdim=True)
    x = (x - mean_c) * _uniform(n, 0.0, 2.0, generator, x) + mean_c
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _uniform(n, 0.5, 1.5, generator, x) + mean


def translation(x: Tensor, ratio: float = 0.125, generator: torch.Generator | None = None) -> Tensor:
    """Shift each sample by an integer offset in ``[-ratio*H, ratio*H] x [-ratio*W, ratio*W]``, zero fill."""
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    if sh == 0 and sw == 0:
        return x
    dy = _randint(n, -sh, sh, generator, x.device).view(n, 1, 1)
    dx = _randint(n, -sw, sw, generator, x.device).view(n, 1, 1)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    # output[y, x] = input[y - dy, x - dx], zero outside: index into a zero-padded copy
    src_y = (ys - dy + 1).clamp(0, h + 1)
    src_x = (xs - dx + 1).clamp(0, w + 1)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    b = torch.arange(n, device=x.device).view(n, 1, 1)
    return padded.permute(0, 2, 3, 1)[b, src_y, src_x].permute(0, 3, 1, 2).contiguous()


def cutout(x: Tensor, ratio: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Zero one square of ``ratio * (H, W)`` per sample, centred uniformly in the image."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    if ch == 0 or cw == 0:
        return x
    cy = _randint(n, 0, h + (1 - ch % 2) - 1, generator, x.device).view(n, 1, 1)
    cx = _randint(n, 0, w + (1 - cw % 2) - 1, generator, x.device).view(n, 1, 1)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((ys - cy + ch // 2) >= 0) & ((ys - cy + ch // 2) < ch) & ((xs - cx + cw // 2) >= 0) & \
             ((xs - cx + cw // 2) < cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def check_policy(policy: Iterable[str]) -> list[str]:
    policy = list(policy)
    unknown = [p for p in policy if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown[0]!r} (available: {', '.join(POLICIES)})")
    return policy


def diff_augment(x: Tensor, policy: Sequence[str] = POLICIES, *, translation_ratio: float = 0.125,
                 cutout_ratio: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Apply the ops of ``policy`` in the order colour, translation, cutout (whatever the list order)."""
    policy = check_policy(policy)
    if "color" in policy:
        x = color(x, generator)
    if "translation" in policy:
        x = translation(x, translation_ratio, generator)
    if "cutout" in policy:
        x = cutout(x, cutout_ratio, generator)
    return x
