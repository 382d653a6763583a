"""Export the student: its backbone weights as safetensors plus the sampling recipe as JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .generator import FewStepGenerator
from .train.checkpoint import save_safetensors

STUDENT_WEIGHTS = "student.safetensors"
STUDENT_META = "student.json"


def export_student(generator: FewStepGenerator, out_dir: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write ``student.safetensors`` (backbone state dict) and ``student.json`` (anchors, sampler, teacher)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(generator.denoiser.backbone, out / STUDENT_WEIGHTS,
                     metadata={"format": "pt", "producer": "senseflow"})
    return export_meta(generator, out, meta)


def export_meta(generator: FewStepGenerator, out_dir: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write ``student.json``: the anchors and sampler a student must be run with."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = {"anchors": generator.anchors, **meta}
    if generator.first_input_time is not None:   # native time; absent = the first anchor itself
        info["first_input_time"] = float(generator.first_input_time)
    tmp = out / f".{STUDENT_META}.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, out / STUDENT_META)
    return out
