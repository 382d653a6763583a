"""Teacher quality in the toy world: attribute accuracy per sampler and CFG scale (docs/toy.md).

    .venv/bin/python benchmarks/toy_teacher_quality.py [TEACHER_FOLDER]

64 evaluation prompts x 1 seed (noise seed 0); prints one JSON line per setting.
"""

from __future__ import annotations

import json
import sys

import torch

from senseflow.sampling import sample_ode
from senseflow.teachers.base import Denoiser, Guidance
from senseflow.toy.evaluator import ToyEvaluator
from senseflow.toy.teacher import TEACHER_ASSET, load_toy_teacher
from senseflow.toy.world import evaluation_prompts


def main(folder: str | None = None) -> None:
    adapter, backbone = load_toy_teacher(folder or TEACHER_ASSET)
    teacher = Denoiser(backbone.eval(), adapter)
    evaluator = ToyEvaluator.load()
    prompts = evaluation_prompts(64)
    cond = adapter.encode_prompts(prompts)
    noise = torch.randn(64, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    for steps, cfg in ((32, 1.0), (32, 2.0), (32, 3.0), (32, 5.0), (4, 3.0)):
        images = adapter.decode(sample_ode(teacher, noise, cond, steps, Guidance(cfg=cfg))).clamp(-1, 1)
        r = evaluator.evaluate(images, prompts)
        keys = ("attr_acc", "fd_real", "shape", "color", "size", "position", "background")
        print(json.dumps({"steps": steps, "cfg": cfg, **{k: round(r[k], 3) for k in keys}}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
