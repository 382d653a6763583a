"""Small stand-ins for the evaluation runner's tests: a deterministic image source and exact metrics.

``SeedSource`` makes image ``b`` from ``seeds[b]`` alone (a CPU generator), as every real source must,
and counts its calls; ``MeanMetric`` / ``OrderMetric`` give numbers a test can compute by hand from
the same images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from senseflow.evaluation.metrics.base import Metric, check_uint8_images
from senseflow.evaluation.sources import ImageSource


def seed_image(seed: int, size: int = 8, offset: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(int(seed) + offset)
    return torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()


class SeedSource(ImageSource):
    """Image = f(seed) only; ``fail_after`` raises after that many rendered images (a killed run)."""

    kind = "student"

    def __init__(self, label: str = "fake", offset: int = 0, fail_after: int | None = None,
                 cached: bool = False, steps: int = 4, size: int = 8) -> None:
        super().__init__(label)
        self.offset, self.fail_after, self.cached, self.steps, self.size = offset, fail_after, cached, steps, size
        self.rendered = 0
        self.calls = 0
        self.loads = 0
        if cached:
            self.kind = "teacher"

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, "offset": self.offset, "steps": self.steps, "resolution": self.size}

    def cache_fields(self) -> dict[str, Any] | None:
        return {"teacher": f"fake-{self.offset}", "steps": self.steps, "cfg": 1.0, "sampler": "euler",
                "resolution": self.size} if self.cached else None

    def load(self, device) -> None:
        self.loads += 1

    def render(self, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        self.calls += 1
        out = []
        for s in seeds:
            if self.fail_after is not None and self.rendered >= self.fail_after:
                raise KeyboardInterrupt("killed")
            out.append(seed_image(s, size=self.size, offset=self.offset))
            self.rendered += 1
        return np.stack(out)


class MeanMetric(Metric):
    """``mean``: mean pixel value; ``ref_gap``: mean |image - reference| (needs the teacher reference)."""

    name: ClassVar[str] = "mean"
    requires: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, files: Sequence[Path] = ()) -> None:
        self.files = [Path(f) for f in files]
        self.reset()

    def reset(self) -> None:
        self.total, self.count, self.gap, self.gap_count = 0.0, 0, 0.0, 0

    def update(self, images, prompts, reference=None) -> None:
        check_uint8_images(images)
        self.total += float(images.double().sum())
        self.count += images.numel()
        if reference is not None:
            self.gap += float((images.double() - reference.double()).abs().sum())
            self.gap_count += images.numel()

    def compute(self) -> dict[str, float]:
        out = {"mean": self.total / self.count}
        if self.gap_count:
            out["ref_gap"] = self.gap / self.gap_count
        return out

    def weight_files(self) -> list[Path]:
        return list(self.files)


class OrderMetric(Metric):
    """``order``: sum over positions k of k * (mean of image k) -- changes if images arrive out of order."""

    name: ClassVar[str] = "order"

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.k, self.value = 0, 0.0

    def update(self, images, prompts, reference=None) -> None:
        for img in images:
            self.value += self.k * float(img.double().mean())
            self.k += 1

    def compute(self) -> dict[str, float]:
        return {"order": self.value}
