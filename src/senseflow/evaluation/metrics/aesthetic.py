"""AESv2: the LAION improved-aesthetic-predictor (CLIP ViT-L/14 image embedding -> linear MLP), about 1-10.

As ``simple_inference.py`` of github.com/christophschuhmann/improved-aesthetic-predictor: OpenAI CLIP
ViT-L/14 ``encode_image`` on CLIP's preprocessing, L2-normalised, through the MLP of
``sac+logos+ava1-l14-linearMSE.pth``.  ``weights`` is the CLIP ViT-L/14 CLIPModel folder; the MLP file
is found inside it, or given as ``mlp=PATH`` (``.pth`` state dict read with ``weights_only``, or
``.safetensors``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from .base import MetricWeightsError
from .clip_common import CLIPEmbedder
from .mean_score import MeanScoreMetric
from .mlp_head import build_mlp
from .weights import load_state_dict

SOURCE = ("the openai/clip-vit-large-patch14 CLIPModel folder (huggingface.co) with sac+logos+ava1-l14-linearMSE.pth "
          "from github.com/christophschuhmann/improved-aesthetic-predictor copied into it (or mlp=PATH)")
MLP_NAMES = ("sac+logos+ava1-l14-linearMSE.pth", "aesthetic_mlp.safetensors", "aesthetic_mlp.pth")


class Aesthetic(MeanScoreMetric):
    name = "aesthetic"
    key = "aesthetic"

    def __init__(self, weights: str | Path | None, *, device: torch.device, batch_size: int = 32,
                 mlp: str | None = None) -> None:
        super().__init__()
        self.clip = CLIPEmbedder(weights, what="aesthetic", source=SOURCE, device=device, batch_size=batch_size)
        if mlp is None:
            found = [self.clip.folder / n for n in MLP_NAMES if (self.clip.folder / n).is_file()]
            if not found:
                raise MetricWeightsError(f"aesthetic: no {MLP_NAMES[0]} in {self.clip.folder}; expected {SOURCE}")
            self.mlp_path = found[0]
        else:
            self.mlp_path = Path(mlp)
            if not self.mlp_path.is_file():
                raise MetricWeightsError(f"aesthetic: MLP file {self.mlp_path} does not exist; expected {SOURCE}")
        state = load_state_dict(self.mlp_path, what="aesthetic", source=SOURCE)
        self.mlp = build_mlp(state, "aesthetic", self.mlp_path, SOURCE,
                             input_size=int(self.clip.model.config.projection_dim)).to(device)

    @torch.no_grad()
    def score_batch(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        emb = self.clip.image_embeds(images)  # L2-normalised, as the reference's normalized()
        return self.mlp(emb.to(next(self.mlp.parameters()).device)).squeeze(-1).float().cpu()

    def weight_files(self) -> list[Path]:
        return [*self.clip.weight_files(), self.mlp_path]
