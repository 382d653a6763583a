"""Images on disk: one folder per image source, and the content-addressed teacher reference cache.

Why on disk: a killed evaluation must restart where it stopped, and under ``torchrun`` every rank
writes its own indices while the main process scores all of them afterwards.  Each image is
``NNNNN.png`` (lossless uint8, so scoring from disk equals scoring in memory) plus ``NNNNN.json``,
its record (prompt, seed, source settings).  The JSON is written *after* the PNG and both are
atomic renames, so an index counts as done only when both exist and the record matches exactly:
a half-written image or one made with other settings is made again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False))
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_png_atomic(array: np.ndarray, path: Path) -> None:
    """``[H, W, 3]`` uint8 -> PNG via temp file + rename (a crash never leaves a truncated image)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def read_png(path: Path) -> Tensor:
    """PNG -> uint8 ``[3, H, W]``."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def to_hwc_uint8(images: Tensor) -> np.ndarray:
    """uint8 ``[N, 3, H, W]`` -> ``[N, H, W, 3]`` numpy."""
    return images.detach().cpu().permute(0, 2, 3, 1).contiguous().numpy()


class ImageStore:
    """``folder/NNNNN.png`` + ``folder/NNNNN.json`` per evaluation index (see module docstring)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def png(self, index: int) -> Path:
        return self.folder / f"{index:05d}.png"

    def meta(self, index: int) -> Path:
        return self.folder / f"{index:05d}.json"

    def done(self, index: int, record: dict[str, Any]) -> bool:
        from ..generate import record_matches

        return record_matches(self.png(index), self.meta(index), record)

    def write(self, index: int, image: np.ndarray, record: dict[str, Any]) -> None:
        write_png_atomic(image, self.png(index))
        write_json_atomic(self.meta(index), record)

    def read(self, indices: Sequence[int]) -> Tensor:
        """uint8 ``[N, 3, H, W]`` for ``indices``, in that order."""
        return torch.stack([read_png(self.png(i)) for i in indices])


def cache_key(fields: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that determines a reference image."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class TeacherCache:
    """Teacher reference images keyed by (teacher fingerprint, steps, CFG, sampler, resolution, prompt, seed).

    Content-addressed: ``root/ab/abcdef....png`` with the key fields next to it in ``.json``, so
    several evaluations (other students, other presets sharing prompts) reuse the same teacher
    images and FID-T never regenerates them.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, fields: dict[str, Any]) -> Path:
        key = cache_key(fields)
        return self.root / key[:2] / f"{key}.png"

    def get(self, fields: dict[str, Any]) -> Path | None:
        p = self.path(fields)
        return p if p.is_file() and p.with_suffix(".json").is_file() else None

    def put(self, fields: dict[str, Any], image: np.ndarray) -> Path:
        p = self.path(fields)
        write_png_atomic(image, p)
        write_json_atomic(p.with_suffix(".json"), fields)
        return p


def link_or_copy(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst`` (hard link when possible: reference images can be gigabytes)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        import shutil
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
