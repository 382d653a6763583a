"""The toy world's shipped evaluator as one more :class:`~senseflow.evaluation.metrics.base.Metric` backend.

Why: ``senseflow evaluate`` must run end to end on a laptop, on the toy teacher and toy students,
with the same runner, resume, cache, manifest and report as a real SD3.5 evaluation.  The toy
evaluator (:mod:`senseflow.toy.evaluator`) reads every grid cell, so it gives an exact prompt-following
score (``attr_acc``) and a feature space for Fréchet distances against real procedural images
(``fd_real``) and against the teacher's images for the same (prompt, seed) (``fd_teacher``, when
the runner passes a reference), plus the within-prompt ``diversity``.  Its weights ship with the
package (``senseflow/assets/toy/evaluator``); ``weights`` may point at another folder written by
``python -m senseflow.toy.train_evaluator``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar, Sequence

import torch
from torch import Tensor

from .metrics.base import Metric, MetricWeightsError, check_uint8_images

TOY_KEYS = ("attr_acc", "exact", "fd_real", "fd_teacher", "diversity")


def uint8_to_signed(images: Tensor) -> Tensor:
    """uint8 ``[N, 3, H, W]`` -> float in [-1, 1] (the inverse of :func:`senseflow.images.to_uint8`)."""
    return images.float() / 127.5 - 1.0


class ToyMetric(Metric):
    """``attr_acc``, ``exact``, ``fd_real``, ``fd_teacher`` (with a reference) and ``diversity`` on toy-world prompts."""

    name: ClassVar[str] = "toy"

    def __init__(self, weights: str | None = None) -> None:
        from ..toy.evaluator import ASSET_DIR, WEIGHTS_NAME, ToyEvaluator

        folder = Path(weights) if weights else ASSET_DIR
        if not (folder / WEIGHTS_NAME).is_file():
            raise MetricWeightsError(f"toy evaluator weights: {folder} has no {WEIGHTS_NAME} (expected the folder "
                                     f"written by `python -m senseflow.toy.train_evaluator --out DIR`; the shipped "
                                     f"one is senseflow/assets/toy/evaluator)")
        self.folder = folder
        self.weights_file = folder / WEIGHTS_NAME
        self.evaluator = ToyEvaluator.load(folder)
        self.reset()

    def reset(self) -> None:
        self.images: list[Tensor] = []
        self.references: list[Tensor] = []
        self.prompts: list[str] = []

    def update(self, images: Tensor, prompts: Sequence[str], reference: Tensor | None = None) -> None:
        check_uint8_images(images)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        self.images.append(images.cpu())
        self.prompts += list(prompts)
        if reference is not None:
            check_uint8_images(reference, "reference")
            self.references.append(reference.cpu())

    def compute(self) -> dict[str, float]:
        if not self.images:
            raise ValueError("toy metric: no images were given")
        images = uint8_to_signed(torch.cat(self.images))
        reference = None
        if self.references:
            reference = uint8_to_signed(torch.cat(self.references))
            if reference.shape[0] != images.shape[0]:
                raise ValueError("toy metric: a reference image is needed for every image (or none)")
        m = self.evaluator.evaluate(images, self.prompts, reference_teacher=reference)
        return {k: float(m[k]) for k in TOY_KEYS if k in m and not (isinstance(m[k], float) and math.isnan(m[k]))}

    def weight_files(self) -> list[Path]:
        return [self.weights_file]
