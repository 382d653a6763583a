"""Image-text data: the official SenseFlow JSON, image loading with resize + centre-crop, VAE encoding.

The official SenseFlow training code reads a JSON file

.. code-block:: json

    {"keys": ["000001", ...], "image_paths": ["images/000001.jpg", ...], "prompts": ["a cat ...", ...]}

and silently assumes every image is already 1024 x 1024.  Here every image is resized (short side
to the training resolution, Lanczos) and centre-cropped to a square, so any aspect ratio works.

Validation happens when the file is loaded, before anything is written or trained:

* the three lists (``keys`` is optional) must have equal, non-zero lengths; prompts are strings;
* every image file must exist and PIL must recognise it from its header (``check="header"``, the
  default: one ``Image.open`` per file, no decoding).  ``check="full"`` decodes every image up
  front; ``check="none"`` only checks existence.  An image that passes the header check but cannot
  be decoded later is reported (one line, naming the file) when it is first loaded.

Relative image paths are relative to the JSON file's directory.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from ..teachers.base import ModelAdapter, SenseflowError

Check = Literal["none", "header", "full"]


@dataclass
class ImageTextSet:
    """Parallel lists of keys, absolute image paths and prompts (see module docstring)."""

    path: Path
    keys: list[str]
    image_paths: list[Path]
    prompts: list[str]

    def __len__(self) -> int:
        return len(self.prompts)


#: 16-bit integer modes PIL opens 16-bit grayscale PNG / TIFF as (``convert("RGB")`` would clip them to white)
_MODES_16BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def _check_mode(img, path: Path) -> None:
    """Refuse the pixel formats whose real bit depth is unknown (32-bit integer or float images)."""
    if img.mode == "F" or (img.mode == "I" and img.format != "PNG"):
        raise SenseflowError(f"image {str(path)!r} has {'float' if img.mode == 'F' else '32-bit integer'} pixels "
                             f"(PIL mode {img.mode}), whose range is unknown: convert it to 8- or 16-bit PNG/JPEG")


def _open_image(path: Path, decode: bool):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
        _check_mode(img, path)
        if decode:
            img.load()
        return img
    except FileNotFoundError:
        raise SenseflowError(f"image {str(path)!r} not found") from None
    except IsADirectoryError:
        raise SenseflowError(f"image {str(path)!r} is a directory; image_paths must name files") from None
    except Image.DecompressionBombError as exc:
        raise SenseflowError(f"image {str(path)!r} is over PIL's decompression-bomb limit ({exc}); downscale it, "
                             "or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        what = "is not a readable image" if isinstance(exc, UnidentifiedImageError) else \
            f"cannot be decoded ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        raise SenseflowError(f"image {str(path)!r} {what}") from None


def load_image_text(path: str | Path, check: Check = "header") -> ImageTextSet:
    """Read and validate a SenseFlow image-text JSON (``{"keys", "image_paths", "prompts"}``)."""
    p = Path(path)
    if p.is_dir():
        raise SenseflowError(f"image-text file {str(p)!r} is a directory; give the JSON file")
    if not p.is_file():
        raise SenseflowError(f"image-text file {str(p)!r} not found")
    try:
        data = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SenseflowError(f"image-text file {str(p)!r} is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(data, dict) or "image_paths" not in data or "prompts" not in data:
        raise SenseflowError(f"image-text file {str(p)!r}: expected a JSON object with lists \"image_paths\" and "
                             f"\"prompts\" (and optionally \"keys\")")
    lists = {k: data[k] for k in ("keys", "image_paths", "prompts") if k in data}
    for name, value in lists.items():
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise SenseflowError(f"image-text file {str(p)!r}: \"{name}\" must be a list of strings")
    lengths = {name: len(value) for name, value in lists.items()}
    if len(set(lengths.values())) != 1:
        desc = ", ".join(f"{k}={v}" for k, v in lengths.items())
        raise SenseflowError(f"image-text file {str(p)!r}: the lists have different lengths ({desc})")
    if lengths["prompts"] == 0:
        raise SenseflowError(f"image-text file {str(p)!r} contains no items")
    keys = lists.get("keys") or [str(i) for i in range(lengths["prompts"])]
    root = p.resolve().parent
    images = [(root / x) if not Path(x).is_absolute() else Path(x) for x in lists["image_paths"]]
    for img in images:
        if img.is_dir():
            raise SenseflowError(f"image-text file {str(p)!r}: image {str(img)!r} is a directory")
        if not img.is_file():
            raise SenseflowError(f"image-text file {str(p)!r}: image {str(img)!r} not found")
    if check != "none":
        for img in images:
            _open_image(img, decode=check == "full").close()
    return ImageTextSet(p, list(keys), images, list(lists["prompts"]))


def resize_center_crop(img, resolution: int):
    """Resize so the SHORT side equals ``resolution`` (Lanczos), then crop the central square.

    The crop offset is ``round((size - resolution) / 2)`` on the long side (torchvision's CenterCrop).
    An image that is already ``resolution`` x ``resolution`` is returned unchanged (no resampling).
    """
    from PIL import Image

    w, h = img.size
    if (w, h) != (resolution, resolution):
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.LANCZOS)
        left, top = int(round((nw - resolution) / 2.0)), int(round((nh - resolution) / 2.0))
        img = img.crop((left, top, left + resolution, top + resolution))
    return img


def to_rgb8(img):
    """An 8-bit RGB image, scaled by the image's REAL bit depth.

    PIL opens 16-bit grayscale PNGs as mode ``I;16`` (or ``I``) and ``convert("RGB")`` clips their
    0..65535 values at 255 (an almost white image); here they are scaled by 255 / 65535 instead.
    16-bit RGB(A) PNGs are already reduced to 8 bits by PIL itself.
    """
    from PIL import Image

    if img.mode in _MODES_16BIT or img.mode == "I":  # "I" from a PNG is 16-bit grayscale (others refused)
        arr = np.asarray(img).astype(np.float64)
        gray = np.clip(np.rint(arr * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(path: str | Path, resolution: int) -> Tensor:
    """One image -> RGB ``[3, resolution, resolution]`` float32 in ``[-1, 1]`` (EXIF orientation applied)."""
    from PIL import ImageOps

    path = Path(path)
    img = _open_image(path, decode=True)
    try:
        img = ImageOps.exif_transpose(img)
        img = to_rgb8(img)
        img = resize_center_crop(img, resolution)
        arr = np.asarray(img, dtype=np.uint8).copy()
    finally:
        img.close()
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1.0


def load_images(paths: Sequence[str | Path], resolution: int) -> Tensor:
    """Several images -> ``[B, 3, resolution, resolution]`` in ``[-1, 1]``."""
    return torch.stack([load_image(p, resolution) for p in paths])


def encode_images(adapter: ModelAdapter, images: Tensor, seeds: Sequence[int] | None = None,
                  sample: bool = True) -> Tensor:
    """Images in ``[-1, 1]`` -> latents with the teacher's VAE (no_grad).

    ``seeds``: one per image, so each posterior sample is reproducible whatever the batch it is in;
    ``sample=False`` takes the posterior mode.  Adapters whose ``encode`` takes no ``generator`` /
    ``sample`` (pixel-space models) are called with the images only.
    """
    params = inspect.signature(adapter.encode).parameters
    kwargs = {}
    if "sample" in params:
        kwargs["sample"] = sample
    if sample and seeds is not None and "generator" in params:
        kwargs["generator"] = [torch.Generator().manual_seed(int(s)) for s in seeds]
    with torch.no_grad():
        return adapter.encode(images, **kwargs)


class ImageTextItems:
    """A SenseFlow JSON as cacheable / trainable items: prompts plus latents encoded on demand."""

    has_latents = True

    def __init__(self, data: ImageTextSet, resolution: int) -> None:
        self.data, self.resolution = data, int(resolution)

    def __len__(self) -> int:
        return len(self.data)

    def prompts(self, indices: Sequence[int]) -> list[str]:
        return [self.data.prompts[i] for i in indices]

    def images(self, indices: Sequence[int]) -> Tensor:
        return load_images([self.data.image_paths[i] for i in indices], self.resolution)

    def latents(self, indices: Sequence[int], adapter: ModelAdapter, device: torch.device,
                seeds: Sequence[int] | None = None, sample: bool = True) -> Tensor:
        return encode_images(adapter, self.images(indices).to(device), seeds, sample)

    def describe(self) -> dict:
        from .cache import file_sha256

        return {"kind": "image-text", "path": str(self.data.path.resolve()), "sha256": file_sha256(self.data.path)}
