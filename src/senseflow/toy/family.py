"""Registers the ``toy`` teacher family: ``paths.teacher: builtin:toy`` (the shipped teacher) or a toy folder."""

from __future__ import annotations

import torch

from ..config import BUILTIN_PREFIX, Config
from ..teachers import registry
from ..teachers.base import SenseflowError
from .teacher import RESOLUTION, TEACHER_ASSET, load_toy_teacher


def load(config: Config, device: torch.device):
    path = config.paths.teacher
    if path.startswith(BUILTIN_PREFIX):
        if path != "builtin:toy":
            raise SenseflowError(f"paths.teacher {path!r}: the only built-in teacher is 'builtin:toy'")
        path = TEACHER_ASSET
        if not (TEACHER_ASSET / "transformer").is_dir():
            raise SenseflowError("the shipped toy teacher is missing from this installation; reinstall senseflow "
                                 "or train one with `senseflow toy train-teacher --out DIR`")
    if config.teacher.resolution != RESOLUTION:
        raise SenseflowError(f"teacher.resolution: the toy teacher works at {RESOLUTION} px, got "
                             f"{config.teacher.resolution}")
    return load_toy_teacher(path, device=device, load_text_encoders=config.paths.cache is None)


#: the toy teacher is a StableDiffusion3Pipeline folder (a tiny SD3Transformer2DModel)
FAMILY = registry.FamilyDescriptor(name="toy", label="toy", load=load, reads_folders_of=("sd3",))
