"""Distillation methods: losses + update policies (DMD2, SenseFlow, SiD-DiT)."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from .base import Batch, DistillationModels, GuidanceSpec, LossOutput, Method
from .dmd2 import DMD2, DMD2Config, ida_update
from .senseflow import SenseFlow, SenseFlowConfig
from .sid import SiD, SiDConfig

MethodConfig = Annotated[Union[SenseFlowConfig, DMD2Config, SiDConfig], Field(discriminator="name")]

_REGISTRY: dict[str, type[Method]] = {"dmd2": DMD2, "senseflow": SenseFlow, "sid": SiD}


def build_method(models: DistillationModels, config: SenseFlowConfig | DMD2Config | SiDConfig,
                 images_per_iteration: int | None = None) -> Method:
    """Instantiate the method named by ``config.name`` (SiD needs the global batch for its SiD2a schedule)."""
    if config.name == "sid":
        return SiD(models, config, images_per_iteration=images_per_iteration)
    return _REGISTRY[config.name](models, config)


__all__ = ["Batch", "DistillationModels", "GuidanceSpec", "LossOutput", "Method", "MethodConfig", "DMD2",
           "DMD2Config", "SenseFlow", "SenseFlowConfig", "SiD", "SiDConfig", "build_method", "ida_update"]
