"""The teacher error curve xi(t) of SenseFlow Fig. 4, for any family through the adapter contract.

    xi(t) = || x0 - x0_hat(x_t, t) ||^2 / || x0 ||^2,   x_t = alpha(t) x0 + sigma(t) eps,

for ``x0`` the teacher's OWN samples (so the curve measures how well the teacher denoises its own
distribution, not a data mismatch), averaged over samples.  SenseFlow reads it as "where along t does
the teacher do its work", the motivation for the anchor choice and ISG.  It is computed in the
space the teacher denoises in (latents for VAE models, pixels for the toy), with the same guidance
the teacher samples with; ``t`` runs over ``points`` unit times ``(k + 0.5) / points`` mapped through
the family's schedule (shift included), each image with its own noise stream.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..rng import derive_seed
from ..teachers.base import SenseflowError


def unit_grid(points: int) -> list[float]:
    if points < 2:
        raise SenseflowError(f"--curve-points must be >= 2, got {points}")
    return [(k + 0.5) / points for k in range(points)]


@torch.no_grad()
def xi_curve(x0: Tensor, seeds: Sequence[int], schedule, predict_x0: Callable[[Tensor, Tensor], Tensor],
             units: Sequence[float]) -> dict[str, list[float]]:
    """xi at each unit time: mean and standard deviation over the images of ``x0`` ``[N, ...]``.

    ``predict_x0(x_t, t)`` is the teacher's ``x0`` prediction (conditioning and guidance bound in).
    """
    n = x0.shape[0]
    denom = x0.double().flatten(1).pow(2).sum(1)
    means, stds, natives = [], [], []
    for k, u in enumerate(units):
        t = schedule.from_unit(torch.tensor([u], dtype=torch.float64)).expand(n).to(x0.device)
        eps = torch.cat([torch.randn((1, *x0.shape[1:]), generator=torch.Generator().manual_seed(
            derive_seed(int(s), "xi-curve", k) % (2 ** 63))) for s in seeds]).to(x0.device, x0.dtype)
        x_t = schedule.add_noise(x0, eps, t)
        x0_hat = predict_x0(x_t, t)
        xi = (x0.double() - x0_hat.double()).flatten(1).pow(2).sum(1) / denom
        means.append(float(xi.mean()))
        stds.append(float(xi.std()) if n > 1 else 0.0)
        natives.append(float(t[0]))
    return {"t_unit": [float(u) for u in units], "t": natives, "xi": means, "xi_std": stds}


def plot_curve(curve: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    mean = torch.tensor(curve["xi"])
    std = torch.tensor(curve["xi_std"])
    ax.plot(curve["t_unit"], mean, marker="o", ms=3)
    ax.fill_between(curve["t_unit"], (mean - std).clamp(min=0), mean + std, alpha=0.2)
    ax.set_xlabel("t (unit time, before the schedule's shift)")
    ax.set_ylabel(r"$\xi(t) = \|x_0 - \hat x_0(x_t,t)\|^2 / \|x_0\|^2$")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


@torch.no_grad()
def teacher_curve(teacher, prompts: Sequence[str], seeds: Sequence[int], points: int, batch_size: int,
                  device: torch.device) -> dict:
    """Sample ``x0`` with the teacher (its steps / guidance), then measure xi(t) on those samples."""
    from ..generate import ImageNoise
    from ..sampling import sample_ode
    from ..teachers.loading import module_dtype

    teacher.load(device)
    den = teacher.denoiser
    adapter = den.adapter
    guidance = teacher.guidance()
    dtype = module_dtype(den.backbone)
    units = unit_grid(points)
    parts = []
    for b in range(0, len(prompts), batch_size):
        p, s = list(prompts[b:b + batch_size]), list(seeds[b:b + batch_size])
        cond = adapter.encode_prompts(p).to(device)
        noise = torch.cat([ImageNoise(teacher.family, x, adapter.latent_shape(), device, dtype).initial()
                           for x in s]).float()
        x0 = sample_ode(den, noise, cond, teacher.steps, guidance).float()
        c = xi_curve(x0, s, den.schedule, lambda x_t, t: den(x_t.to(dtype), t, cond, guidance).float(), units)
        parts.append((len(p), c))
    total = sum(n for n, _ in parts)
    xi = [sum(n * c["xi"][k] for n, c in parts) / total for k in range(len(units))]
    # pooled standard deviation over all images (within-batch variances + between-batch spread)
    var = [sum(n * (c["xi_std"][k] ** 2 + (c["xi"][k] - xi[k]) ** 2) for n, c in parts) / total
           for k in range(len(units))]
    return {"t_unit": parts[0][1]["t_unit"], "t": parts[0][1]["t"], "xi": xi, "xi_std": [v ** 0.5 for v in var],
            "num_images": total, "teacher": teacher.settings()}


def curve_from_args(args: argparse.Namespace) -> int:
    from .promptset import from_source
    from .runner import resolve_device
    from .sources import TeacherSource
    from .store import write_json_atomic

    if args.out is None:
        raise SenseflowError("--teacher-curve needs --out DIR")
    if args.teacher is None:
        raise SenseflowError("--teacher-curve needs --teacher FOLDER (a diffusers folder) or builtin:toy")
    if args.prompts is None:
        raise SenseflowError("--teacher-curve needs --prompts FILE (or builtin:toy-world)")
    from .presets import PAPER_TEACHERS
    from .sources import teacher_family
    family = args.teacher_family or teacher_family(args.teacher)
    steps, cfg = PAPER_TEACHERS.get(family, (32, 1.0))
    teacher = TeacherSource(args.teacher, family=family,
                            steps=args.teacher_steps if args.teacher_steps is not None else steps,
                            cfg=args.teacher_cfg if args.teacher_cfg is not None else cfg,
                            resolution=args.teacher_resolution, dtype=args.dtype or "float32")
    prompts = from_source(args.prompts, args.num_prompts or 16, args.seed or 0, args.per_prompt)
    unit_grid(args.curve_points)   # validated before anything is written
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SenseflowError(f"--out {str(out)!r} exists and is not a directory")
    curve = teacher_curve(teacher, prompts.prompts, prompts.seeds, args.curve_points, args.batch_size,
                          resolve_device(args.device))
    curve["prompts_sha256"] = prompts.sha256
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "curve.json", curve)
    plot_curve(curve, out / "curve.png", f"teacher error, {teacher.family} {teacher.steps} steps, guidance "
                                         f"{teacher.cfg}, {curve['num_images']} images")
    peak = max(range(len(curve["xi"])), key=lambda k: curve["xi"][k])
    print(f"xi(t): {curve['xi'][0]:.4f} at t={curve['t_unit'][0]:.3f} ... {curve['xi'][-1]:.4f} at "
          f"t={curve['t_unit'][-1]:.3f} (max {curve['xi'][peak]:.4f} at t={curve['t_unit'][peak]:.3f}); wrote "
          f"{out / 'curve.json'} and curve.png")
    return 0
