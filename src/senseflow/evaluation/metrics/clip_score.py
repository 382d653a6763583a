"""CLIP score: the raw cosine between a prompt and its image in a local CLIPModel's projected space.

Two published protocols, both options of this one metric:

* SenseFlow's: OpenAI ViT-B/32, raw cosine (about 0.32 for good SD-class images; torchmetrics'
  ``CLIPScore`` would report ``max(100 * cos, 0)``, i.e. about 32);
* DMD2's (``main/coco_eval/coco_evaluator.py::compute_clip_score``): open_clip ViT-g/14
  (laion2b_s12b_b42k, used here as a transformers CLIPModel folder), prompts prefixed with
  ``"A photo depicts "``, images centre-cropped to a square and LANCZOS-resized to 256 before CLIP's own
  preprocessing (``prefix="A photo depicts ", square_crop=True, pre_resize=256``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from .clip_common import CLIPEmbedder
from .mean_score import MeanScoreMetric

SOURCE = ("a transformers CLIPModel folder, e.g. openai/clip-vit-base-patch32 (SenseFlow) or "
          "laion/CLIP-ViT-g-14-laion2B-s12B-b42K (DMD2) from huggingface.co, downloaded on a machine with access")


class CLIPScore(MeanScoreMetric):
    name = "clip_score"
    key = "clip_score"

    def __init__(self, weights: str | Path | None, *, device: torch.device, batch_size: int = 32, prefix: str = "",
                 square_crop: bool = False, pre_resize: int | None = None) -> None:
        super().__init__()
        self.clip = CLIPEmbedder(weights, what="clip_score", source=SOURCE, device=device, batch_size=batch_size,
                                 prefix=prefix, square_crop=square_crop, pre_resize=pre_resize)

    def score_batch(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.clip.cosine(images, prompts)

    def weight_files(self) -> list[Path]:
        return self.clip.weight_files()
