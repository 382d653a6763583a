"""Train the toy evaluator's attribute classifier and write its weights and a record of the run.

Usage::

    OMP_NUM_THREADS=1 python -m senseflow.toy.train_evaluator --out src/senseflow/assets/toy/evaluator \\
        --steps 1500 --seed 0

Training images come from ``ToyWorld(seed)`` (batch index = step), held-out images from
``ToyWorld(eval_seed)``, a different stream.  Light noise and blur augmentation make the classifier
tolerant of imperfect generated images.  Writes ``evaluator.safetensors`` (weights; loaded back
without pickle) and ``evaluator.json`` (command, seeds, steps, architecture, held-out accuracies,
training time), so the shipped numbers can be reproduced and checked.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from .evaluator import (ASSET_DIR, DEFAULT_CHANNELS, CELL_DIM, INFO_NAME, WEIGHTS_NAME, AttributeNet,
                        ToyEvaluator, classifier_accuracy, classifier_loss, scene_labels)
from .world import ToyWorld, render_batch


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Blur a quarter of the batch (3x3 binomial) and add Gaussian noise (sigma <= 0.1) to half."""
    b = images.shape[0]
    k = torch.tensor([1.0, 2.0, 1.0])
    kernel = (k[:, None] * k[None, :] / 16.0).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    blur = torch.rand(b, generator=generator) < 0.25
    images = torch.where(blur.view(b, 1, 1, 1), blurred, images)
    sigma = torch.rand(b, generator=generator) * 0.1 * (torch.rand(b, generator=generator) < 0.5)
    return images + sigma.view(b, 1, 1, 1) * torch.randn(images.shape, generator=generator)


def heldout_metrics(evaluator: ToyEvaluator, eval_seed: int, n: int, batch: int = 512) -> dict:
    """Accuracies on ``n`` fresh images of ``ToyWorld(eval_seed)``: per head, per prompt check, and
    on canonical (unjittered) renders of the same scenes."""
    world = ToyWorld(eval_seed)
    logits, labels, images, prompts, scenes = [], [], [], [], []
    for i in range(math.ceil(n / batch)):
        x, c, s = world.batch(min(batch, n - i * batch), i)
        logits.append(evaluator.predict(x))
        labels.append(scene_labels(s))
        images.append(x)
        prompts += c
        scenes += s
    cat = lambda ds: {k: torch.cat([d[k] for d in ds]) for k in ds[0]}  # noqa: E731
    canonical = render_batch(scenes)
    return {
        "n_images": n,
        "heads": classifier_accuracy(cat(logits), cat(labels)),
        "prompt_checks": evaluator.attribute_accuracy(torch.cat(images), prompts),
        "prompt_checks_canonical_renders": evaluator.attribute_accuracy(canonical, prompts),
    }


def train(steps: int, seed: int, batch_size: int, lr: float, eval_seed: int,
          progress: bool = True) -> tuple[AttributeNet, float]:
    """Adam with linear warm-up and cosine decay; returns the net and the wall time in seconds."""
    torch.manual_seed(seed)
    net = AttributeNet(DEFAULT_CHANNELS, CELL_DIM)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    warmup = min(100, steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    world = ToyWorld(seed)
    aug_gen = torch.Generator().manual_seed(seed + 1)
    probe_x, _, probe_s = ToyWorld(eval_seed).batch(256, 10_000)  # progress display only
    probe_y = scene_labels(probe_s)
    start = time.time()
    bar = tqdm(range(steps), desc="toy evaluator", disable=not progress, mininterval=2.0)
    for step in bar:
        x, _, s = world.batch(batch_size, step)
        net.train()
        loss = classifier_loss(net(augment(x, aug_gen)), scene_labels(s))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            net.eval()
            with torch.no_grad():
                acc = classifier_accuracy(net(probe_x), probe_y)
            bar.set_postfix(loss=f"{loss.item():.4f}", image_acc=f"{acc['image']:.3f}")
    return net.eval(), time.time() - start


def main(argv: Sequence[str] | None = None) -> dict:
    """Train, measure on held-out images, write weights + JSON; returns the JSON record."""
    parser = argparse.ArgumentParser(prog="python -m senseflow.toy.train_evaluator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ASSET_DIR, help="output folder (default: shipped assets)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0, help="training stream seed and init seed")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-seed", type=int, default=987_654, help="held-out stream seed")
    parser.add_argument("--eval-n", type=int, default=4096, help="held-out images")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    net, seconds = train(args.steps, args.seed, args.batch_size, args.lr, args.eval_seed,
                         progress=not args.no_progress)
    metrics = heldout_metrics(ToyEvaluator(net), args.eval_seed, args.eval_n)
    args.out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(args.out / WEIGHTS_NAME))
    record = {
        "command": "python -m senseflow.toy.train_evaluator " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "eval_seed": args.eval_seed,
        "architecture": {"channels": list(DEFAULT_CHANNELS), "cell_dim": CELL_DIM,
                         "parameters": sum(p.numel() for p in net.parameters())},
        "train_seconds": round(seconds, 1), "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "weights_bytes": (args.out / WEIGHTS_NAME).stat().st_size,
        "heldout": metrics,
    }
    (args.out / INFO_NAME).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["heldout"], indent=2))
    return record


if __name__ == "__main__":
    main()
