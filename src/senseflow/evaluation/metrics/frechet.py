"""Frechet distance between two feature sets, accumulated batch by batch (torchmetrics does the maths).

Why torchmetrics and not a hand-written formula: ``FrechetInceptionDistance(feature=module)`` keeps
float64 running sums and computes ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` through the
eigenvalues of ``S1 S2`` (the same value as clean-fid's ``scipy.linalg.sqrtm``), and works offline
with any feature extractor that has ``num_features``.  ``sync_on_compute=False``: the evaluation
runner scores on the main process only, so a cross-process sync would hang.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FrechetDistance:
    """One pair of feature sets ("real" / reference and generated) through a shared feature extractor."""

    def __init__(self, features: nn.Module, device: torch.device | str = "cpu") -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        self._fid = FrechetInceptionDistance(feature=features, reset_real_features=True, sync_on_compute=False)
        self._fid = self._fid.to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def update(self, inputs: Tensor, real: bool) -> None:
        """Add a batch of feature-extractor inputs to the real (reference) or generated set."""
        self._fid.update(inputs.to(self.device), real=real)

    def counts(self) -> tuple[int, int]:
        return int(self._fid.real_features_num_samples), int(self._fid.fake_features_num_samples)

    def compute(self) -> float:
        real, fake = self.counts()
        if real < 2 or fake < 2:
            raise ValueError(f"a Frechet distance needs at least 2 images per set, got {fake} generated and "
                             f"{real} real/reference")
        return float(self._fid.compute())

    def reset(self) -> None:
        self._fid.reset()
