"""Does the toy world punish few-step sampling?  Teacher quality per Euler step count, with and
without a prompt (docs/toy.md, "Why the 4-step teacher is strong").

    .venv/bin/python benchmarks/toy_few_step_gap.py [--samples 256]

Conditional: the fixed evaluation prompts with CFG 3 (what the demo compares against).
Unconditional: the empty caption with CFG 1 (the teacher learned it through 10% caption dropout),
judged against random real scenes -- a prompt-free scene is strongly multimodal (which shapes,
where), the situation real text-to-image teachers are in for every prompt.  ``plausible`` is the
fraction of samples in which the evaluator finds 1 or 2 shapes (the world's scene sizes); an Euler
sampler that averages modes leaves faint ghosts or nothing.  One JSON line per setting.
"""

from __future__ import annotations

import argparse
import json

import torch

from senseflow.sampling import sample_ode
from senseflow.teachers.base import Denoiser, Guidance
from senseflow.toy.evaluator import ToyEvaluator
from senseflow.toy.teacher import load_toy_teacher
from senseflow.toy.world import ToyWorld, evaluation_prompts

STEPS = (1, 2, 4, 8, 32)


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--teacher", default=None, help="toy teacher folder (default: the shipped one)")
    args = p.parse_args(argv)
    adapter, backbone = load_toy_teacher(args.teacher)
    teacher = Denoiser(backbone.eval(), adapter)
    evaluator = ToyEvaluator.load()
    n = args.samples
    noise = torch.randn(n, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    real_random, _, _ = ToyWorld(seed=12345).batch(n, 0)
    prompts = [evaluation_prompts(64)[i % 64] for i in range(n)]
    settings = {"conditional": (adapter.encode_prompts(prompts), 3.0),
                "unconditional": (adapter.encode_prompts([""] * n), 1.0)}
    for name, (cond, cfg) in settings.items():
        for steps in STEPS:
            images = adapter.decode(sample_ode(teacher, noise, cond, steps, Guidance(cfg=cfg))).clamp(-1, 1)
            counts = (evaluator.predict(images)["shape"].argmax(-1) > 0).sum(-1)
            row = {"prompt": name, "steps": steps, "cfg": cfg,
                   "plausible": round(float(((counts >= 1) & (counts <= 2)).float().mean()), 3),
                   "diversity": round(evaluator.diversity(images, prompts if name == "conditional" else None), 2)}
            if name == "conditional":
                m = evaluator.evaluate(images, prompts)
                row.update(attr_acc=round(m["attr_acc"], 3), fd_real=round(m["fd_real"], 1))
            else:
                row.update(fd_real=round(evaluator.frechet_distance(images, real_random), 1))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
