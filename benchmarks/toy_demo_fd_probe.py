"""What makes the demo student's fd_real high?  Probe a trained demo student's samples with simple edits.

Why: the student beats the 4-step teacher on prompt following but its fd_real is far worse (336 vs
240), and two causes are visible in the grid -- a faint 4 x 4 block texture in flat backgrounds and
faint extra ("ghost") shapes.  Editing the samples and re-measuring FD on the demo's own evaluation
set separates them: flattening the background (every pixel near the image's median colour set to
it) removes the texture and the faintest ghosts; the same edit is applied to the teacher's samples
so the comparison stays fair.

    .venv/bin/python benchmarks/toy_demo_fd_probe.py --run runs/demo_v4/run
"""

from __future__ import annotations

import argparse
import json

import torch

from senseflow import api
from senseflow.config import load_config
from senseflow.toy.demo import EvalSet, sample_student, sample_teacher
from senseflow.toy.evaluator import ToyEvaluator
from senseflow.toy.world import parse_caption


def flatten_background(images: torch.Tensor, tol: float) -> torch.Tensor:
    """Pixels within ``tol`` (max over RGB, images in [-1, 1]) of the image's median colour become that colour."""
    med = images.flatten(2).median(dim=2).values[:, :, None, None]
    near = (images - med).abs().amax(dim=1, keepdim=True) <= tol
    return torch.where(near, med.expand_as(images), images)


def toward_median(images: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale every pixel's distance to the image's median colour by ``factor`` (< 1: less contrast / saturation)."""
    med = images.flatten(2).median(dim=2).values[:, :, None, None]
    return med + factor * (images - med)


def block_mean(images: torch.Tensor, k: int) -> torch.Tensor:
    """Average over k x k blocks (aligned with the teacher's patch-4 token grid for k = 4) and upsample back."""
    return torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(images, k), scale_factor=k, mode="nearest")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a demo's run folder (with config.yaml and checkpoints/)")
    p.add_argument("--sampler", default="stochastic")
    args = p.parse_args()
    config = load_config(f"{args.run}/config.yaml", ["train.progress=false", "train.num_samples=0"])
    trainer = api.build_trainer(config, resume="auto")
    teacher = trainer.method.models.teacher
    evalset = EvalSet(teacher.adapter, 64, 4, 0, trainer.device, open_positions=True)
    ev = ToyEvaluator.load()
    with trainer.eval_weights():
        student, _ = sample_student(trainer.method.models.generator, evalset, args.sampler)
    teacher4, _ = sample_teacher(teacher, evalset, 4, 3.0)
    real = ev.reference_images(evalset.prompts)
    teacher32, _ = sample_teacher(teacher, evalset, 32, 3.0)
    print("| images | shapes drawn (mean) | share with an extra shape | mean |pixel - median| | "
          + " | ".join(("position", "shape", "color", "size", "background", "count")) + " |")
    for name, imgs in (("real", real), ("teacher 32 steps", teacher32), ("teacher 4 steps", teacher4),
                       ("student", student)):
        drawn = (ev.predict(imgs)["shape"].argmax(-1) > 0).sum(1).float()   # class 0 = empty cell
        named = torch.tensor([len(parse_caption(p).shapes) for p in evalset.prompts], dtype=torch.float32)
        dev = (imgs - imgs.flatten(2).median(dim=2).values[:, :, None, None]).abs().mean().item()
        acc = ev.attribute_accuracy(imgs, evalset.prompts)
        print(f"| {name} | {drawn.mean():.2f} | {(drawn > named).float().mean():.3f} | {dev:.3f} | "
              + " | ".join(f"{acc[k]:.3f}" for k in ("position", "shape", "color", "size", "background", "count"))
              + " |", flush=True)
    rows = []
    for name, imgs in (("teacher 4 steps", teacher4), (f"student (step {trainer.step})", student)):
        for edit, fn in (("none", lambda x: x), ("flat background tol 0.1", lambda x: flatten_background(x, 0.1)),
                         ("flat background tol 0.25", lambda x: flatten_background(x, 0.25)),
                         ("2x2 block mean", lambda x: block_mean(x, 2)),
                         ("contrast to the median x0.75", lambda x: toward_median(x, 0.75)),
                         ("contrast to the median x0.6", lambda x: toward_median(x, 0.6))):
            m = ev.evaluate(fn(imgs), evalset.prompts)
            rows.append({"model": name, "edit": edit, "attr_acc": round(m["attr_acc"], 4),
                         "fd_real": round(m["fd_real"], 1)})
            print(json.dumps(rows[-1]), flush=True)
    print("| model | edit | attr_acc | fd_real |\n| --- | --- | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['edit']} | {r['attr_acc']:.3f} | {r['fd_real']:.1f} |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
