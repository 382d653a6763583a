"""How good can the MLP backbone itself get?  Fit variants of the Gaussian-mixture teacher and score
their own Euler sampling against the true mixture (docs/ground_truth.md, "The backbone ceiling").

Every student and fake score is a copy of this backbone, so its own many-step precision bounds
what distillation can reach.  A variant is ``w<width>-s<fit steps>-<time law>`` (laws:
``logit_normal``, ``uniform``, ``mixed``; see ``senseflow.toy.gmm.teacher.fit_times``).  Fits are
cached in ``--cache`` (safetensors), results appended to ``<out>/backbone.jsonl``.

    OMP_NUM_THREADS=1 python benchmarks/gmm_backbone.py --variants w128-s2000-logit_normal,w128-s2000-uniform
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from senseflow.teachers.base import Guidance
from senseflow.toy.gmm.bench import load_or_fit_teacher
from senseflow.toy.gmm.mixture import GaussianMixture
from senseflow.toy.gmm.run import EvalSet, teacher_samples
from senseflow.toy.gmm.teacher import TIME_LAWS, GMMAdapter

STEPS = (1, 2, 4, 8, 32, 128)


def parse_variant(name: str) -> tuple[int, int, str]:
    try:
        w, s, law = name.split("-", 2)
        width, steps = int(w.removeprefix("w")), int(s.removeprefix("s"))
    except ValueError:
        raise SystemExit(f"variant {name!r}: expected w<width>-s<steps>-<law>, e.g. w256-s4000-uniform") from None
    if law not in TIME_LAWS:
        raise SystemExit(f"variant {name!r}: law must be one of {', '.join(TIME_LAWS)}")
    return width, steps, law


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="w128-s2000-logit_normal,w128-s2000-uniform")
    p.add_argument("--out", default="runs/gmm_backbone")
    p.add_argument("--cache", default="runs/gmm", help="folder of cached teacher fits")
    p.add_argument("--eval-samples", type=int, default=4000)
    args = p.parse_args()
    variants = [(v, *parse_variant(v)) for v in args.variants.split(",") if v]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mixture = GaussianMixture.random(16, 4, 5, seed=0)
    ev = EvalSet.make(mixture, GMMAdapter(mixture), args.eval_samples)
    for name, width, steps, law in variants:
        t0 = time.perf_counter()
        mlp = load_or_fit_teacher(mixture, "D16_C4_M5_s0", Path(args.cache), width, 3, steps, time_law=law)
        fit_s = time.perf_counter() - t0
        rec = {"variant": name, "width": width, "fit_steps": steps, "time_law": law, "fit_seconds": fit_s,
               "params": sum(p.numel() for p in mlp.parameters())}
        for n in STEPS:
            rec[f"euler{n}"] = ev.score(mixture, teacher_samples(mixture, mlp, n, ev, Guidance()))
        with open(out / "backbone.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(name, f"fit {fit_s:.0f}s", " ".join(
            f"E{n}: prec {rec[f'euler{n}']['precision']:.3f} sw2 {rec[f'euler{n}']['sw2']:.3f} "
            f"tv {rec[f'euler{n}']['mode_tv']:.3f}" for n in STEPS), flush=True)


if __name__ == "__main__":
    main()
