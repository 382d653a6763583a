"""FD-DINOv2 (Stein et al. 2023, dgm-eval): the Frechet distance on DINOv2 ViT-L/14 CLS features.

As ``dgm_eval/models/dinov2.py`` (``clean_resize=False``): resize to 224x224 with PIL bicubic
(torchvision's ``Resize((224, 224))`` on a PIL image; aspect ratio not kept), ImageNet mean/std, and
the hub model's output ``x_norm_clstoken`` -- which is transformers' ``Dinov2Model(...).pooler_output``
(the layer-normed CLS token).  ``against="real"`` (default, key ``fd_dinov2``) compares with real
images; ``against="reference"`` (key ``fd_dinov2_t``) with the teacher's images for the same prompts and
seeds, the cheap FID-T stand-in used during training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from .base import Metric, MetricWeightsError, check_uint8_images
from .frechet import FrechetDistance
from .resize import pil_resize_uint8
from .weights import hf_weight_files, require_hf_folder

SOURCE = "a transformers Dinov2Model folder, e.g. facebook/dinov2-large from huggingface.co (dgm-eval's ViT-L/14)"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _CLSFeatures(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_features = int(model.config.hidden_size)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model(pixel_values=pixels.to(self.model.dtype)).pooler_output.float()


class FDDinov2(Metric):
    name = "fd_dinov2"
    requires = frozenset({"real"})

    @classmethod
    def requires_for(cls, against: str = "real", **_: object) -> frozenset[str]:
        return frozenset({"reference" if against == "reference" else "real"})

    def __init__(self, weights: str | Path | None, *, device: torch.device, batch_size: int = 32,
                 against: str = "real", size: int = 224) -> None:
        from transformers import Dinov2Model

        if against not in ("real", "reference"):
            raise ValueError(f"fd_dinov2: against must be 'real' or 'reference', got {against!r}")
        self.folder = require_hf_folder(weights, "fd_dinov2", SOURCE, tokenizer=False, model_type="dinov2")
        try:
            model = Dinov2Model.from_pretrained(str(self.folder), local_files_only=True).eval().to(device)
        except (OSError, ValueError) as exc:
            raise MetricWeightsError(f"fd_dinov2: cannot load {self.folder} ({str(exc).splitlines()[0][:160]}); "
                                     f"expected {SOURCE}") from None
        self.against = against
        self.requires = self.requires_for(against)  # per instance, by option
        self.key = "fd_dinov2" if against == "real" else "fd_dinov2_t"
        self.size = int(size)
        self.batch_size = int(batch_size)
        self.fd = FrechetDistance(_CLSFeatures(model), device)

    def _pixels(self, images: Tensor) -> Tensor:
        images = pil_resize_uint8(images, self.size, "bicubic")
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (images.float() / 255 - mean) / std

    def _add(self, images: Tensor, real: bool, what: str) -> None:
        check_uint8_images(images, what)
        for start in range(0, images.shape[0], self.batch_size):
            self.fd.update(self._pixels(images[start:start + self.batch_size]), real=real)

    def update(self, images: Tensor, prompts: Sequence[str], reference: Tensor | None = None) -> None:
        self._add(images, False, "fd_dinov2: images")
        if self.against == "reference":
            if reference is None or reference.shape[0] != images.shape[0]:
                raise ValueError("fd_dinov2 (against='reference') needs one reference image per image")
            self._add(reference, True, "fd_dinov2: reference images")

    def update_real(self, images: Tensor) -> None:
        self._add(images, True, "fd_dinov2: real images")

    def compute(self) -> dict[str, float]:
        return {self.key: self.fd.compute()}

    def reset(self) -> None:
        self.fd.reset()

    def weight_files(self) -> list[Path]:
        return hf_weight_files(self.folder)
