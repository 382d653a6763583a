"""Screen a variant of the demo's recipe in a fraction of the demo's time, on the demo's own evaluation set.

Why: on a shared 2-core machine one full ``senseflow demo`` takes 15-45 minutes, too long to compare
settings one demo at a time.  This trains the recipe plus ``--set`` overrides for ``--iterations``
and scores the student every ``--eval-every`` iterations on exactly the demo's inputs (64 open
evaluation prompts x 4 seeds, the same noise, the same evaluator), with the raw weights and --
when the run keeps ``generator.ema`` -- the EMA, each with the stochastic and the Euler sampler,
plus the paired attr_acc gain over the teacher at 4 Euler steps (CFG 3).  The teacher's 32-step
baseline is skipped (it is the same for every variant: docs/toy.md).  One JSON line per score,
appended to ``<out>.jsonl``.

    .venv/bin/python benchmarks/toy_demo_screen.py --name gan --iterations 100 \\
        --set generator.ema.decay=0.9 method.gan_head.enabled=true method.gan_head.generator_weight=0.05
    .venv/bin/python benchmarks/toy_demo_screen.py --name reg4 --iterations 100 --regression 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from senseflow import api
from senseflow.config import load_config
from senseflow.toy.demo import RECIPES, EvalSet, sample_student, sample_teacher
from senseflow.toy.evaluator import ToyEvaluator, paired_gain
from senseflow.train.trainer import TrainerHooks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--name", required=True)
    p.add_argument("--method", default="senseflow")
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--out", default="runs/demo_screen")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--regression", type=float, default=0.0, metavar="W",
                   help="probe: add DMD (v1)'s regression of G's first-anchor prediction onto teacher ODE samples "
                        "(toy/gmm/regression.py) with weight W")
    p.add_argument("--regression-pairs", type=int, default=256, help="training-prompt pairs to draw (teacher time)")
    p.add_argument("--regression-steps", type=int, default=32, help="Euler steps of the pairs' teacher samples")
    p.add_argument("--regression-cfg", type=float, default=3.0, help="CFG of the pairs' teacher samples")
    p.add_argument("--simulation", choices=["stochastic", "euler"], default="stochastic",
                   help="probe: how backward simulation steps between anchors (released: stochastic, fresh noise)")
    args = p.parse_args()
    out = Path(args.out)
    run = out / args.name
    config = load_config(RECIPES / f"{args.method}.yaml",
                         [f"paths.output={run}", "train.progress=false", f"train.steps={args.iterations}",
                          "train.num_samples=0", "train.tensorboard=false", *args.set])
    evaluator = ToyEvaluator.load()
    out.mkdir(parents=True, exist_ok=True)
    log = (out / f"{args.name}.jsonl").open("a")
    state: dict = {}

    def score(trainer, step: int) -> None:
        if step % args.eval_every and step != trainer.cfg.steps:
            return
        weights = [("raw", contextlib.nullcontext)] + ([("ema", trainer.ema.swapped_in)] if trainer.ema else [])
        for name, swap in weights:
            for sampler in ("stochastic", "euler"):
                with swap():
                    images, _ = sample_student(trainer.method.models.generator, state["evalset"], sampler)
                prompts = state["evalset"].prompts
                m = evaluator.evaluate(images, prompts)
                gain = paired_gain(evaluator.checks_per_image(images, prompts), state["teacher4"], prompts, seed=0)
                rec = {"name": args.name, "it": step, "weights": name, "sampler": sampler,
                       "attr_acc": round(m["attr_acc"], 4), "fd_real": round(m["fd_real"], 1),
                       "gain": gain["gain"], "ci95": gain["ci95"], "seconds": round(time.time() - state["t0"]),
                       "train": {k: round(float(v), 4) for k, v in (trainer.last_logs or {}).items()}}
                print(json.dumps(rec), flush=True)
                log.write(json.dumps(rec) + "\n")
                log.flush()

    trainer = api.build_trainer(config, resume="never", hooks=TrainerHooks(on_step=[score]))
    trainer.method.models.generator.simulation_sampler = args.simulation
    teacher = trainer.method.models.teacher
    evalset = state["evalset"] = EvalSet(teacher.adapter, 64, 4, 0, trainer.device, open_positions=True)
    teacher4, _ = sample_teacher(teacher, evalset, 4, 3.0)
    state["teacher4"] = evaluator.checks_per_image(teacher4, evalset.prompts)
    m = evaluator.evaluate(teacher4, evalset.prompts)
    print(f"teacher 4 Euler steps, CFG 3: attr_acc {m['attr_acc']:.4f} fd_real {m['fd_real']:.1f}", flush=True)
    if args.regression > 0:
        install_regression(trainer, args)
    state["t0"] = time.time()
    trainer.fit()


def install_regression(trainer, args) -> None:
    """DMD (v1)'s ``L_reg`` next to the recipe's loss: ``--regression-pairs`` (noise, teacher ODE sample) pairs on
    training captions the run never draws (batch indices from 10^6 on), MSE in latent space."""
    from senseflow.rng import derive_seed
    from senseflow.sampling import sample_ode
    from senseflow.teachers.base import Guidance
    from senseflow.toy.gmm.regression import install

    teacher, n = trainer.method.models.teacher, args.regression_pairs
    _, captions, _ = trainer.data.world.batch(n, 10 ** 6)
    cond = teacher.adapter.encode_prompts(list(captions)).to(trainer.device)
    g = torch.Generator().manual_seed(derive_seed(0, "demo-regression-noise"))
    noise = torch.randn((n, *teacher.adapter.latent_shape()), generator=g).to(trainer.device)
    t0 = time.time()
    x0 = torch.cat([sample_ode(teacher, noise[i:i + 128], cond[i:i + 128], args.regression_steps,
                               Guidance(cfg=args.regression_cfg)) for i in range(0, n, 128)])
    print(f"{n} regression pairs ({args.regression_steps} Euler steps, CFG {args.regression_cfg:g}) in "
          f"{time.time() - t0:.0f}s", flush=True)
    install(trainer.method, {"noise": noise, "x0": x0.float()}, args.regression, trainer.cfg.batch_size,
            derive_seed(0, "demo-regression"), cond=cond, first_anchor=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
