"""PickScore (Kirstain et al. 2023): ``logit_scale.exp() * cos(image, prompt)`` of the PickScore CLIP model.

As the reference snippet (github.com/yuvalkirstain/PickScore, README "Inference"): CLIP-H image and
text embeddings, normalised, times the model's learned temperature (about 100), so scores sit
around 20-23.  Preprocessing is CLIP-H's (224 px, OpenAI mean/std, from the folder's
``preprocessor_config.json`` when present).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from .clip_common import CLIPEmbedder
from .mean_score import MeanScoreMetric

SOURCE = ("the yuvalkirstain/PickScore_v1 CLIPModel folder from huggingface.co, with the tokenizer and "
          "preprocessor_config.json of laion/CLIP-ViT-H-14-laion2B-s32B-b79K copied into it")


class PickScore(MeanScoreMetric):
    name = "pickscore"
    key = "pickscore"

    def __init__(self, weights: str | Path | None, *, device: torch.device, batch_size: int = 32) -> None:
        super().__init__()
        self.clip = CLIPEmbedder(weights, what="pickscore", source=SOURCE, device=device, batch_size=batch_size)

    def score_batch(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.clip.model.logit_scale.exp().float().cpu() * self.clip.cosine(images, prompts)

    def weight_files(self) -> list[Path]:
        return self.clip.weight_files()
