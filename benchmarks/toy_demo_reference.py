"""Reference points for the demo's numbers, on the demo's own evaluation set (64 open prompts x 4 seeds).

Why: the demo's bar is "fd_real below the 4-step teacher's", so it matters where FD can go at 256
samples at all (real images against real images of the same prompts with other placements: the
floor), what the teacher gives at other CFG scales and step counts, and where the student starts
(the teacher's weights run as a 4-step generator, stochastic or Euler, no CFG).

    .venv/bin/python benchmarks/toy_demo_reference.py [--teacher FOLDER] [--seed S] [--points 4:3 32:3 ...]

``--teacher`` scores another toy teacher folder (a candidate from ``senseflow toy train-teacher``) on
the same evaluation set; ``--seed`` is the demo's ``--seed`` (it moves the evaluation noise).
"""

from __future__ import annotations

import argparse
import time

import torch

from senseflow import api
from senseflow.config import load_config
from senseflow.toy.demo import RECIPES, EvalSet, sample_student, sample_teacher
from senseflow.toy.evaluator import ToyEvaluator

TEACHER_POINTS = ((4, 1.0), (4, 2.0), (4, 3.0), (8, 3.0), (32, 2.0))


def _point(text: str) -> tuple[int, float]:
    """``STEPS:CFG`` -> (steps, cfg); argparse turns the error into one line and exit 2."""
    steps, sep, cfg = text.partition(":")
    try:
        if not sep or int(steps) < 1:
            raise ValueError
        return int(steps), float(cfg)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not STEPS:CFG (e.g. 4:3)") from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=None, help="toy teacher folder (default: the shipped one)")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed (the demo's --seed)")
    p.add_argument("--points", nargs="*", type=_point, default=None, metavar="STEPS:CFG",
                   help="teacher settings to score (default: the full reference list, floor and student start)")
    args = p.parse_args(argv)
    overrides = ["paths.output=runs/demo_reference", "train.progress=false"]
    if args.teacher:
        overrides.append(f"paths.teacher={args.teacher}")
    config = load_config(RECIPES / "senseflow.yaml", overrides)
    evaluator = ToyEvaluator.load()
    trainer = api.build_trainer(config, resume="never")
    teacher = trainer.method.models.teacher
    evalset = EvalSet(teacher.adapter, 64, 4, args.seed, trainer.device, open_positions=True)

    def show(name: str, images: torch.Tensor) -> None:
        m = evaluator.evaluate(images, evalset.prompts)
        print(f"{name:44s} attr_acc {m['attr_acc']:.3f}  fd_real {m['fd_real']:7.1f}", flush=True)

    full = args.points is None  # the whole reference list: floor, teacher points, student start
    points = TEACHER_POINTS if full else args.points
    if full:
        show("real images, other placements (floor)", ToyEvaluator.load(reference_seed=1).reference_images(evalset.prompts))
    for steps, cfg in points:
        t0 = time.time()
        images, _ = sample_teacher(teacher, evalset, steps, cfg)
        show(f"teacher {steps} Euler steps, CFG {cfg} ({time.time() - t0:.0f} s)", images)
    for sampler in ("stochastic", "euler") if full else ():
        images, _ = sample_student(trainer.method.models.generator, evalset, sampler)
        show(f"student at initialisation, {sampler}", images)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
