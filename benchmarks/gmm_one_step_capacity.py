"""Can the 1-step generator represent a precise map at all?  Regress it onto its teacher's ODE map.

Why: every 1-step student on the ground-truth mixture plateaus at precision ~0.68-0.72 (DMD2, SiD,
4000 iterations), far below the 0.90 target, while the teacher's own 128-step ODE map -- a smooth
map from noise to samples -- reaches 0.990.  If a copy of the backbone, used as the 1-step generator
(same parameterisation: x0 prediction at the first anchor, optionally at ``first_input_time``),
can be *regressed* onto that ODE map (paired noise -> teacher sample, mean squared error, as DMD's
first version's regression loss and progressive / consistency distillation do) to well above the
distribution-matching students, capacity and parameterisation are not the limit and the
distribution-matching optimisation is; if regression stalls too, the generator is.

    OMP_NUM_THREADS=1 python benchmarks/gmm_one_step_capacity.py --input-time 0.3 --steps 4000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from senseflow.toy.gmm.bench import load_or_fit_teacher
from senseflow.toy.gmm.mixture import GaussianMixture
from senseflow.toy.gmm.regression import load_or_make_pairs
from senseflow.toy.gmm.run import EMA, EvalSet, RunSpec, build_models, sample_generator
from senseflow.toy.gmm.teacher import GMMAdapter, class_prompt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input-time", type=float, default=0.3, help="generator.first_input_time (<= 0: none)")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--pairs", type=int, default=65536)
    p.add_argument("--ode-steps", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--ema", type=float, default=0.0, help="also score an EMA of G with this decay (0: none)")
    p.add_argument("--out", default="runs/gmm_capacity")
    args = p.parse_args()
    torch.manual_seed(0)
    mixture = GaussianMixture.random(16, 4, 5, seed=0)
    mlp = load_or_fit_teacher(mixture, "D16_C4_M5_s0", Path("runs/gmm"), 256, 3, 6000)
    adapter = GMMAdapter(mixture)
    ev = EvalSet.make(mixture, adapter, 4000)
    t_in = args.input_time if args.input_time > 0 else None
    gen = build_models(mixture, mlp, RunSpec(method="dmd2", steps=1, generator_input_time=t_in)).generator
    t0 = time.perf_counter()
    cache = Path("runs/gmm") / f"pairs_capacity_w256_s6000_n{args.pairs}_e{args.ode_steps}.safetensors"
    pairs = load_or_make_pairs(mixture, mlp, args.pairs, args.ode_steps, cache)   # seed 7, cached
    noise, labels, target = pairs["noise"], pairs["labels"], pairs["x0"]
    tqdm.write(f"{args.pairs} ODE pairs ({args.ode_steps} Euler steps) in {time.perf_counter() - t0:.0f}s")
    opt = torch.optim.Adam(gen.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(1)
    ema = EMA(gen, args.ema) if args.ema > 0 else None
    history = [{"step": 0, **ev.score(mixture, sample_generator(gen, ev))}]
    for step in tqdm(range(1, args.steps + 1), desc="regress 1-step G", dynamic_ncols=True):
        idx = torch.randint(0, args.pairs, (args.batch_size,), generator=g)
        cond = adapter.encode_prompts([class_prompt(int(c)) for c in labels[idx]])
        t = gen.time(0, args.batch_size, noise.device)
        loss = torch.nn.functional.mse_loss(gen(noise[idx], t, cond).float(), target[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update()
        if step % args.eval_every == 0 or step == args.steps:
            history.append({"step": step, "loss": float(loss), **ev.score(mixture, sample_generator(gen, ev))})
            if ema is not None:
                history[-1]["ema"] = ev.score(mixture, sample_generator(ema.generator, ev))
            h = history[-1]
            tqdm.write(f"step {step}: loss {h['loss']:.4f} prec {h['precision']:.3f} cov {h['coverage']:.2f} "
                       f"tv {h['mode_tv']:.3f} recall {h['recall']:.3f} sw2 {h['sw2']:.3f}"
                       + (f" | EMA prec {h['ema']['precision']:.3f} tv {h['ema']['mode_tv']:.3f}" if ema else ""))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "capacity.jsonl", "a") as fh:
        fh.write(json.dumps({"args": vars(args), "seconds": time.perf_counter() - t0, "history": history}) + "\n")


if __name__ == "__main__":
    main()
