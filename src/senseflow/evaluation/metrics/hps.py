"""HPSv2 / HPSv2.1 (Wu et al. 2023): the cosine between prompt and image in the HPS-finetuned CLIP ViT-H/14.

As ``hpsv2.img_score.score``: normalised open_clip image and text features, ``image @ text.T`` on the
diagonal (raw cosine, about 0.25-0.32; the HPSv2 leaderboard prints it x100).  The official
checkpoints (``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``) are open_clip state dicts;
``senseflow convert-weights hps SRC OUT --tokenizer CLIP_H_FOLDER`` writes the transformers CLIPModel
folder this metric reads (:mod:`senseflow.evaluation.convert_hps`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from .clip_common import CLIPEmbedder
from .mean_score import MeanScoreMetric

SOURCE = ("a CLIPModel folder written by `senseflow convert-weights hps HPS_v2.1_compressed.pt OUT --tokenizer "
          "CLIP_H_FOLDER` from the official checkpoint (huggingface.co/xswu/HPSv2)")


class HPS(MeanScoreMetric):
    name = "hps"
    key = "hps"

    def __init__(self, weights: str | Path | None, *, device: torch.device, batch_size: int = 32) -> None:
        super().__init__()
        self.clip = CLIPEmbedder(weights, what="hps", source=SOURCE, device=device, batch_size=batch_size)

    def score_batch(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.clip.cosine(images, prompts)

    def weight_files(self) -> list[Path]:
        return self.clip.weight_files()
