"""Per-image scores averaged over the evaluation set (CLIP score, PickScore, HPS, ImageReward, aesthetic)."""

from __future__ import annotations

from abc import abstractmethod
from typing import Sequence

import torch
from torch import Tensor

from .base import Metric, check_uint8_images


class MeanScoreMetric(Metric):
    """Subclasses score one batch (``score_batch``); the metric is the mean over all images seen."""

    key: str

    def __init__(self) -> None:
        self._scores: list[Tensor] = []

    @abstractmethod
    def score_batch(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Per-image scores ``[N]`` (float)."""

    def update(self, images: Tensor, prompts: Sequence[str], reference: Tensor | None = None) -> None:
        check_uint8_images(images, f"{self.name}: images")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")
        self._scores.append(self.score_batch(images, list(prompts)).double().cpu())

    def scores(self) -> Tensor:
        """Every per-image score so far, in update order (for paired comparisons and reports)."""
        return torch.cat(self._scores) if self._scores else torch.zeros(0, dtype=torch.float64)

    def compute(self) -> dict[str, float]:
        scores = self.scores()
        if scores.numel() == 0:
            raise ValueError(f"{self.name}: no images were scored")
        return {self.key: float(scores.mean())}

    def reset(self) -> None:
        self._scores = []
