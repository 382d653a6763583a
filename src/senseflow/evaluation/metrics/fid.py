"""FID against real images, and FID-T / Patch FID-T against the teacher's images for the same (prompt, seed).

Protocol (each choice is an option, defaults = clean-fid):

* features: the 2015-12-05 TF-Inception pool3 (:mod:`.inception`);
* resize: clean-fid's "clean" mode to 299x299 (:func:`.resize.clean_resize`);
  ``square_crop=True`` + ``pre_resize=512`` reproduce DMD2's ``compute_fid`` (centre square, PIL
  LANCZOS to the evaluation resolution, then clean-fid);
* patch variants (``patch=True``): a 299x299 centre crop of the FULL-resolution image, no resize --
  DMD2's ``compute_fid(patch_fid=True)`` (``main/coco_eval/coco_evaluator.py``), which measures
  high-frequency detail that the 299 px downscale hides;
* FID-T (SenseFlow Tab. 1, DMD2): the reference set is the teacher's image for each prompt and seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ...teachers.base import SenseflowError
from .base import Metric, check_uint8_images
from .frechet import FrechetDistance
from .inception import load_inception
from .resize import center_crop, clean_resize, pil_resize_uint8, square_crop

PATCH = 299


class _InceptionFrechet(Metric):
    """Shared machinery: one Inception, a full-image Frechet pair and optionally a patch pair."""

    def __init__(self, weights: str | Path | None, *, device: torch.device, batch_size: int = 32,
                 patch: bool = False, square_crop: bool = False, pre_resize: int | None = None) -> None:
        self.features = load_inception(weights, device)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.square_crop = bool(square_crop)
        self.pre_resize = pre_resize
        self.full = FrechetDistance(self.features, self.device)
        self.patch = FrechetDistance(self.features, self.device) if patch else None

    def _full_inputs(self, images: Tensor) -> Tensor:
        if self.square_crop:
            images = square_crop(images)
        if self.pre_resize:
            images = pil_resize_uint8(images, int(self.pre_resize), "lanczos")
        return clean_resize(images, 299)

    @staticmethod
    def _patch_inputs(images: Tensor) -> Tensor:
        return center_crop(images, PATCH).float()

    def _add(self, images: Tensor, real: bool, what: str) -> None:
        check_uint8_images(images, what)
        if self.patch is not None and min(images.shape[-2:]) < PATCH:
            raise SenseflowError(f"{what}: Patch FID needs images of at least {PATCH}x{PATCH} px, got "
                                 f"{images.shape[-2]}x{images.shape[-1]}; pass patch=False for small images")
        for start in range(0, images.shape[0], self.batch_size):
            chunk = images[start:start + self.batch_size]
            self.full.update(self._full_inputs(chunk), real=real)
            if self.patch is not None:
                self.patch.update(self._patch_inputs(chunk), real=real)

    def reset(self) -> None:
        self.full.reset()
        if self.patch is not None:
            self.patch.reset()

    def weight_files(self) -> list[Path]:
        return [self.features.path]


class FID(_InceptionFrechet):
    """FID of generated images against real images (``update_real``); ``patch=True`` adds ``patch_fid``."""

    name = "fid"
    requires = frozenset({"real"})

    def update(self, images: Tensor, prompts: Sequence[str], reference: Tensor | None = None) -> None:
        self._add(images, real=False, what="fid: generated images")

    def update_real(self, images: Tensor) -> None:
        self._add(images, real=True, what="fid: real images")

    def compute(self) -> dict[str, float]:
        out = {"fid": self.full.compute()}
        if self.patch is not None:
            out["patch_fid"] = self.patch.compute()
        return out


class FIDT(_InceptionFrechet):
    """FID-T and Patch FID-T: the student's images against the teacher's for the same prompts and seeds."""

    name = "fid_t"
    requires = frozenset({"reference"})

    def __init__(self, weights: str | Path | None, *, device: torch.device, batch_size: int = 32,
                 patch: bool = True, square_crop: bool = False, pre_resize: int | None = None) -> None:
        super().__init__(weights, device=device, batch_size=batch_size, patch=patch, square_crop=square_crop,
                         pre_resize=pre_resize)

    def update(self, images: Tensor, prompts: Sequence[str], reference: Tensor | None = None) -> None:
        if reference is None:
            raise ValueError("fid_t needs the teacher's reference images for the same prompts and seeds")
        if reference.shape[0] != images.shape[0]:
            raise ValueError(f"fid_t: {images.shape[0]} images but {reference.shape[0]} reference images")
        self._add(images, real=False, what="fid_t: images")
        self._add(reference, real=True, what="fid_t: reference images")

    def compute(self) -> dict[str, float]:
        out = {"fid_t": self.full.compute()}
        if self.patch is not None:
            out["patch_fid_t"] = self.patch.compute()
        return out
