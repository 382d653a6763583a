"""A local ``transformers.CLIPModel`` folder turned into projected, L2-normalised image and text embeddings.

Why not torchmetrics' ``CLIPScore``: in transformers 5 ``get_image_features`` / ``get_text_features``
return a ModelOutput (the projected embedding in ``pooler_output``), which torchmetrics does not
expect; and CLIP score, PickScore and HPSv2 differ only in what they do with the cosine, so the
embedding code is shared here.

Preprocessing is the reference one (OpenAI CLIP / open_clip ``preprocess``): resize the short side
with PIL bicubic, centre crop, scale to [0, 1], normalise -- with the size, mean and std from the
folder's ``preprocessor_config.json`` when present (else the model's image size and OpenAI's
statistics).  Done with PIL directly because the reference runs torchvision's PIL path and
transformers' fast image processors need torchvision.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from .base import MetricWeightsError
from .resize import center_crop, pil_resize_uint8, resize_short_side_uint8, square_crop
from .weights import hf_weight_files, require_hf_folder

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def projected(output) -> Tensor:
    """The projected embedding from ``get_*_features`` in transformers 4 (a tensor) or 5 (a ModelOutput)."""
    if isinstance(output, Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"cannot find the projected embedding in {type(output).__name__}")
    return pooled


def _size(value, default: int) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        for key in ("shortest_edge", "height", "width"):
            if key in value:
                return int(value[key])
    return default


class CLIPEmbedder:
    """Loads a CLIPModel folder once; embeds uint8 images and prompts (optionally with a prefix)."""

    def __init__(self, folder: str | Path | None, *, what: str, source: str, device: torch.device,
                 batch_size: int = 32, prefix: str = "", square_crop: bool = False,
                 pre_resize: int | None = None) -> None:
        from transformers import AutoTokenizer, CLIPModel

        self.folder = require_hf_folder(folder, what, source, model_type="clip")
        try:
            self.model = CLIPModel.from_pretrained(str(self.folder), local_files_only=True).eval().to(device)
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise MetricWeightsError(f"{what}: cannot load the CLIPModel folder {self.folder} ({first}); "
                                     f"expected {source}") from None
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.prefix = prefix
        self.square_crop = square_crop
        self.pre_resize = pre_resize
        vision = self.model.config.vision_config
        pre = {}
        if (self.folder / "preprocessor_config.json").is_file():
            pre = json.loads((self.folder / "preprocessor_config.json").read_text())
        self.resize = _size(pre.get("size"), vision.image_size)
        self.crop = _size(pre.get("crop_size"), vision.image_size)
        self.mean = torch.tensor(pre.get("image_mean", OPENAI_MEAN)).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.get("image_std", OPENAI_STD)).view(1, 3, 1, 1)
        self.max_length = min(int(getattr(self.tokenizer, "model_max_length", 77) or 77),
                              int(self.model.config.text_config.max_position_embeddings))

    def pixels(self, images: Tensor) -> Tensor:
        """uint8 ``[N, 3, H, W]`` -> normalised ``[N, 3, crop, crop]`` float pixels (the reference preprocess)."""
        if self.square_crop:
            images = square_crop(images)
        if self.pre_resize:
            images = pil_resize_uint8(images, int(self.pre_resize), "lanczos")
        images = center_crop(resize_short_side_uint8(images, self.resize, "bicubic"), self.crop)
        return (images.float() / 255 - self.mean) / self.std

    def tokens(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        texts = [self.prefix + p for p in prompts]
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    @torch.no_grad()
    def image_embeds(self, images: Tensor) -> Tensor:
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            px = self.pixels(images[start:start + self.batch_size]).to(self.device, self.model.dtype)
            out.append(projected(self.model.get_image_features(pixel_values=px)).float())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> Tensor:
        out = []
        for start in range(0, len(prompts), self.batch_size):
            out.append(projected(self.model.get_text_features(**self.tokens(prompts[start:start + self.batch_size])))
                       .float())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    def cosine(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Per-image cosine between each image and its own prompt, ``[N]``."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        return (self.image_embeds(images) * self.text_embeds(list(prompts))).sum(-1).cpu()

    def weight_files(self) -> list[Path]:
        return hf_weight_files(self.folder)
