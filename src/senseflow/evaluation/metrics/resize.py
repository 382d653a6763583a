"""Image resizing exactly as the reference evaluators do it (FID is sensitive to the resize filter).

* :func:`clean_resize` -- clean-fid's ``"clean"`` mode (``cleanfid.resize.make_resizer("PIL", False,
  "bicubic", (299, 299))``): each channel as a float32 PIL image (mode ``"F"``), PIL's antialiased
  bicubic, clipped to [0, 255], NOT re-quantised to uint8.  Parmar et al. (2022) show that the
  non-antialiased resizes of TF / torch shift FID by several points.
* :func:`center_crop` -- a centred crop (DMD2's Patch FID: a 299x299 crop of the full-resolution image,
  ``main/coco_eval/coco_evaluator.py::compute_fid(patch_fid=True)``).
* :func:`square_crop` -- DMD2's ``CenterCropLongEdge``: the largest centred square.
* :func:`pil_resize_uint8` -- PIL resize of a uint8 image (DMD2's LANCZOS pre-resize to the evaluation
  resolution; CLIP-style preprocessing, which runs torchvision's PIL path in the reference code).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

_FILTERS = {"bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR}


def clean_resize(images: Tensor, size: int = 299) -> Tensor:
    """uint8 ``[N, 3, H, W]`` -> float32 ``[N, 3, size, size]`` in [0, 255], clean-fid "clean" mode."""
    out = np.empty((images.shape[0], 3, size, size), dtype=np.float32)
    arrays = images.numpy()
    for i in range(arrays.shape[0]):
        for c in range(3):
            channel = Image.fromarray(arrays[i, c].astype(np.float32), mode="F")
            out[i, c] = np.asarray(channel.resize((size, size), resample=Image.BICUBIC)).clip(0, 255)
    return torch.from_numpy(out)


def center_crop(images: Tensor, size: int) -> Tensor:
    """Centred ``size x size`` crop (torchvision's ``center_crop`` rounding); images smaller than ``size`` are refused."""
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"a {size}x{size} centre crop needs images at least that large, got {h}x{w}")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return images[..., top:top + size, left:left + size]


def square_crop(images: Tensor) -> Tensor:
    """The largest centred square (DMD2's ``CenterCropLongEdge``); square images are returned as they are."""
    h, w = images.shape[-2:]
    return images if h == w else center_crop(images, min(h, w))


def pil_resize_uint8(images: Tensor, size: int | tuple[int, int], filter: str = "bicubic") -> Tensor:
    """uint8 ``[N, 3, H, W]`` -> uint8 resized with PIL (``size`` = (width, height) or a square side)."""
    wh = (size, size) if isinstance(size, int) else size
    out = []
    for image in images:
        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        if pil.size != wh:
            pil = pil.resize(wh, resample=_FILTERS[filter])
        out.append(torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1))
    return torch.stack(out)


def resize_short_side_uint8(images: Tensor, size: int, filter: str = "bicubic") -> Tensor:
    """Resize so the short side is ``size`` (torchvision ``Resize(int)`` on PIL: the long side is floored)."""
    h, w = images.shape[-2:]
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    return pil_resize_uint8(images, (new_w, new_h), filter)
