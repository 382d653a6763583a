"""What in a demo student's images the evaluator's FD sees: image statistics and FD after simple repairs.

Why: the demo student's fd_real (~318, Euler sampler ~269) is far above the 4-step teacher's (~227)
although its prompt following is higher; this probe tells which visible defect carries that excess
(issue #13, item 3).  For real images, the teacher at 32 / 4 Euler steps (CFG 3), the student at
initialisation and each trained student given (stochastic and Euler samplers), on the demo's seed-0
evaluation set, it prints attr_acc and fd_real, then: the fixed pattern (per-pixel high-pass mean over
all samples, RMS: the 4 x 4 grid texture) and fd_real with it subtracted; the share of "ghost" pixels
(0.05-0.25 away from the image's median background colour) and fd_real with them snapped to the
background; the mean saturation of shape pixels and fd_real after scaling chroma by 0.85 / 0.7.

    .venv/bin/python benchmarks/toy_demo_artifact_probe.py RUN_DIR [RUN_DIR ...]   # e.g. runs/demo/run
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from senseflow import api
from senseflow.config import load_config
from senseflow.student import load_student
from senseflow.toy.demo import RECIPES, EvalSet, sample_student, sample_teacher
from senseflow.toy.evaluator import ToyEvaluator


def _blur(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", help="demo run folders holding student/ (e.g. runs/demo/run)")
    args = p.parse_args(argv)
    students = {run: load_student(run).generator for run in args.runs}   # a bad folder fails before minutes of sampling
    evaluator = ToyEvaluator.load()
    config = load_config(RECIPES / "senseflow.yaml", ["paths.output=runs/artifact_probe", "train.progress=false"])
    trainer = api.build_trainer(config, resume="never")
    teacher = trainer.method.models.teacher
    evalset = EvalSet(teacher.adapter, 64, 4, 0, trainer.device, open_positions=True)
    sets = {"real": evaluator.reference_images(evalset.prompts),
            "teacher 32 steps CFG 3": sample_teacher(teacher, evalset, 32, 3.0)[0],
            "teacher 4 steps CFG 3": sample_teacher(teacher, evalset, 4, 3.0)[0]}
    for sampler in ("stochastic", "euler"):
        sets[f"student at init, {sampler}"] = sample_student(trainer.method.models.generator, evalset, sampler)[0]
    for run, generator in students.items():
        for sampler in ("stochastic", "euler"):
            sets[f"{run}, {sampler}"] = sample_student(generator, evalset, sampler)[0]

    def fd(x: torch.Tensor) -> str:
        return f"{evaluator.frechet_distance(sets['real'], x.clamp(-1, 1)):6.1f}"

    for name, x in sets.items():
        m = evaluator.evaluate(x, evalset.prompts, reference_real=sets["real"])
        fixed = (x - _blur(x)).mean(0, keepdim=True)
        x01 = (x + 1) / 2
        bg = x01.flatten(2).median(-1).values[..., None, None]
        dist = (x01 - bg).abs().max(1, keepdim=True).values
        ghost = ((dist > 0.05) & (dist <= 0.25)).float().mean()
        fg = (dist > 0.25).float()
        sat = ((x01.max(1, keepdim=True).values - x01.min(1, keepdim=True).values) * fg).sum() / fg.sum()
        snapped = torch.where(dist <= 0.25, bg.expand_as(x01), x01) * 2 - 1
        gray = x01.mean(1, keepdim=True)
        desat = {k: (gray + (x01 - gray) * k).clamp(0, 1) * 2 - 1 for k in (0.85, 0.7)}
        print(f"{name:44s} attr_acc {m['attr_acc']:.3f} fd_real {m['fd_real']:6.1f} | fixed pattern {fixed.pow(2).mean().sqrt():.4f}"
              f" -> fd {fd(x - fixed)} | ghost px {ghost:.3f} -> fd {fd(snapped)} | shape sat {sat:.3f}"
              f" -> chroma x0.85 fd {fd(desat[0.85])}, x0.7 fd {fd(desat[0.7])}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
