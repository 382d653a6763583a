"""The metric contract shared by every evaluation backend (`senseflow evaluate`, evaluation during training).

Why a contract of its own: sampling (sharded, resumable, cached teacher references) and scoring are
different jobs.  The evaluation runner samples images to disk, then feeds them -- on the main process
only, in index order, so a sharded run scores exactly what one process would -- to each metric
through :meth:`Metric.update`, and asks :meth:`Metric.compute` for the numbers.  A metric never
samples, never touches files other than its own weights, and never downloads anything.

Images cross this boundary as ``uint8`` tensors ``[N, 3, H, W]`` on the CPU, at the resolution they
were generated; each metric resizes the way its protocol says (documented in its module).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Sequence

import torch
from torch import Tensor

from ...teachers.base import SenseflowError


class MetricWeightsError(SenseflowError):
    """A metric's weight folder or file is missing or has the wrong layout (one line: expected layout + source)."""


class Metric(ABC):
    """One metric (or one family of numbers computed from one model, e.g. FID + FID-T + Patch FID-T).

    ``requires`` names the extra inputs the runner must provide to :meth:`update`:
    ``"reference"`` -- the teacher's images for the same (prompt, seed), same order (FID-T, paired scores);
    ``"real"`` -- real images, streamed separately through :meth:`update_real` (FID against data).
    """

    name: ClassVar[str]
    requires: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def update(self, images: Tensor, prompts: Sequence[str], reference: Tensor | None = None) -> None:
        """Accumulate one batch of generated images (uint8 ``[N, 3, H, W]``) with their prompts."""

    def update_real(self, images: Tensor) -> None:
        """Accumulate real images (only called when ``"real"`` is in :attr:`requires`)."""
        raise NotImplementedError(f"metric {self.name!r} does not use real images")

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """The metric's numbers, keyed by their public names (e.g. ``{"fid_t": 12.3, "patch_fid_t": 20.1}``)."""

    @abstractmethod
    def reset(self) -> None:
        """Forget accumulated state (the weights stay loaded)."""

    def weight_files(self) -> list[Path]:
        """Every weight file this metric read, for the evaluation manifest's sha256 list."""
        return []


def check_uint8_images(images: Tensor, what: str = "images") -> None:
    """Refuse anything but ``uint8 [N, 3, H, W]`` (a float image in [-1, 1] would be scored silently wrong)."""
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        dtype = getattr(images, "dtype", None)
        raise ValueError(f"{what}: expected uint8 [N, 3, H, W], got {dtype} {shape}")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The sha256 of a file, streamed (weight files are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
