"""Image helpers without torchvision: tensors in [-1, 1] -> uint8 grids -> PNG files."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_uint8(images: Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` in [-1, 1] -> ``[B, H, W, 3]`` uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def check_images(images: Tensor, source: str = "the adapter") -> None:
    """Refuse (one line) a decoded batch that is not pictures ``[B, 1|3, H, W]`` before it is drawn."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        from .teachers.base import SenseflowError
        raise SenseflowError(f"{source}.decode returned shape {tuple(images.shape)}, not images [B, 1|3, H, W]: "
                             f"a model whose samples are not pictures must answer decodes_to_images() False "
                             f"(CallableAdapter(..., images=False))")


def make_grid(images: Tensor, nrow: int | None = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    """Tile images into one ``[H, W, 3]`` uint8 array (``scale`` enlarges small images by pixel repeat)."""
    arr = to_uint8(images)
    if scale > 1:
        arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    b, h, w, _ = arr.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = arr[i]
    return grid


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    """Write a PNG atomically (temp file + rename), so a crash never leaves a truncated image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)
