"""ImageReward (Xu et al. 2023): BLIP ViT-L image tokens cross-attended by the prompt's BERT, [CLS] -> MLP.

As ``ImageReward.ImageReward.score``: the prompt padded/truncated to 35 BERT tokens (no [ENC]
substitution), the image resized (short side, bicubic) and centre-cropped to 224 with OpenAI's mean/std,
``text_encoder(ids, encoder_hidden_states=visual_encoder(image))``, the [CLS] state through the linear
MLP, then ``(r - mean) / std`` with the released constants.  Weights: the folder written by
``senseflow convert-weights image-reward ImageReward.pt OUT --tokenizer BERT_FOLDER``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from .base import MetricWeightsError
from .clip_common import OPENAI_MEAN, OPENAI_STD
from .mean_score import MeanScoreMetric
from .mlp_head import build_mlp
from .resize import center_crop, resize_short_side_uint8
from .weights import hf_weight_files, load_state_dict, require_hf_folder

SOURCE = ("a folder written by `senseflow convert-weights image-reward ImageReward.pt OUT --tokenizer BERT_FOLDER` "
          "from huggingface.co/THUDM/ImageReward")


class ImageReward(MeanScoreMetric):
    name = "image_reward"
    key = "image_reward"

    def __init__(self, weights: str | Path | None, *, device: torch.device, batch_size: int = 32) -> None:
        from transformers import AutoTokenizer, BlipForImageTextRetrieval

        super().__init__()
        self.folder = require_hf_folder(weights, "image_reward", SOURCE, model_type="blip")
        for name in ("mlp.safetensors", "image_reward.json"):
            if not (self.folder / name).is_file():
                raise MetricWeightsError(f"image_reward: {self.folder} lacks {name}; expected {SOURCE}")
        info = json.loads((self.folder / "image_reward.json").read_text())
        self.mean, self.std = float(info["mean"]), float(info["std"])
        self.max_length, self.size = int(info["max_length"]), int(info["image_size"])
        model = BlipForImageTextRetrieval.from_pretrained(str(self.folder), local_files_only=True).eval()
        self.vision, self.text = model.vision_model.to(device), model.text_encoder.to(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
        state = load_state_dict(self.folder / "mlp.safetensors", what="image_reward", source=SOURCE)
        self.mlp = build_mlp(state, "image_reward", self.folder / "mlp.safetensors", SOURCE,
                             input_size=int(model.config.text_config.hidden_size)).to(device)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)

    def pixels(self, images: Tensor) -> Tensor:
        images = center_crop(resize_short_side_uint8(images, self.size, "bicubic"), self.size)
        mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
        return (images.float() / 255 - mean) / std

    @torch.no_grad()
    def score_batch(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            px = self.pixels(images[start:start + self.batch_size]).to(self.device)
            tokens = self.tokenizer(list(prompts[start:start + self.batch_size]), padding="max_length",
                                    truncation=True, max_length=self.max_length, return_tensors="pt").to(self.device)
            image_embeds = self.vision(pixel_values=px).last_hidden_state
            atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
            hidden = self.text(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                               encoder_hidden_states=image_embeds, encoder_attention_mask=atts).last_hidden_state
            reward = self.mlp(hidden[:, 0].float()).squeeze(-1)
            out.append(((reward - self.mean) / self.std).cpu())
        return torch.cat(out)

    def weight_files(self) -> list[Path]:
        return [*hf_weight_files(self.folder), self.folder / "mlp.safetensors", self.folder / "image_reward.json"]
