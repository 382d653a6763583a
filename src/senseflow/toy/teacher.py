"""The toy teacher: a tiny SD3 (``SD3Transformer2DModel``) trained on the procedural world.

It is stored as an SD3 diffusers folder -- ``transformer/``, ``text_encoder/`` (a tiny
CLIPTextModelWithProjection), ``tokenizer/``, ``scheduler/``, ``model_index.json`` -- and loaded
through the very same :class:`~senseflow.teachers.sd3.SD3Adapter` a real SD3.5 folder uses. It
works in pixel space (no ``vae/``), with no T5 tokens (``max_sequence_length = 0``).

Architecture choice (measured on the 2-core CPU, see docs/toy.md): patch size 4 on 32x32 RGB
(an 8x8 token grid), 6 joint blocks of width 128: ~3.5M parameters, ~0.74 s per batch-64
training step on one core -- five times cheaper than patch 2, which is what lets the shipped
teacher train in about 100 minutes (8000 steps) and the demo distil it in minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..rng import derive_seed
from ..schedules import logit_normal

RESOLUTION = 32
TEACHER_ASSET = Path(__file__).resolve().parent.parent / "assets" / "toy" / "teacher"
# Shift 3, as SD3.5: 32-px images with large flat backgrounds are very redundant, so a noisy image
# still reveals its layout until t is close to 1.  Unshifted logit-normal training almost never
# visits t > 0.95 (where the text must decide the layout); the first 1750 steps of the shipped
# teacher were trained that way and learned text -> layout very slowly (docs/toy.md).
SCHEDULER_SHIFT = 3.0


def transformer_config(width: int = 128, layers: int = 6, head_dim: int = 32, patch: int = 4,
                       text_dim: int = 64, pooled_dim: int = 64) -> dict:
    return dict(sample_size=RESOLUTION, patch_size=patch, in_channels=3, out_channels=3, num_layers=layers,
                attention_head_dim=head_dim, num_attention_heads=width // head_dim, joint_attention_dim=text_dim,
                caption_projection_dim=width, pooled_projection_dim=pooled_dim, pos_embed_max_size=RESOLUTION // patch)


def create_teacher_folder(path: str | os.PathLike, seed: int = 0, **arch) -> Path:
    """Write an untrained toy teacher (random weights) as an SD3 diffusers folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from .text import build_text_encoder, build_tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    encoder = build_text_encoder(seed)
    text_dim = encoder.config.hidden_size
    pooled_dim = encoder.config.projection_dim
    torch.manual_seed(derive_seed(seed, "toy-transformer") % (2 ** 31))
    transformer = SD3Transformer2DModel(**transformer_config(text_dim=text_dim, pooled_dim=pooled_dim, **arch))
    transformer.save_pretrained(path / "transformer")
    encoder.save_pretrained(path / "text_encoder")
    build_tokenizer(path / "tokenizer")
    FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT).save_pretrained(path / "scheduler")
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1",
             "transformer": ["diffusers", "SD3Transformer2DModel"], "scheduler":
             ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers",
             "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
             "text_encoder_2": [None, None], "tokenizer_2": [None, None], "text_encoder_3": [None, None],
             "tokenizer_3": [None, None], "vae": [None, None]}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def load_toy_teacher(folder: str | os.PathLike | None = None, device: torch.device | str = "cpu",
                     load_text_encoders: bool = True):
    """``(SD3Adapter, transformer)`` for the shipped toy teacher (or another toy folder)."""
    from ..teachers.sd3 import SD3Adapter

    return SD3Adapter.from_pretrained(folder or TEACHER_ASSET, resolution=RESOLUTION, device=device,
                                      load_text_encoders=load_text_encoders, max_sequence_length=0)


# The quality bar for the toy teacher: attribute accuracy at 32 Euler steps with CFG.
QUALITY_BAR = 0.90
QUALITY_SETTING = (32, 3.0)  # (Euler steps, CFG scale)


@torch.no_grad()
def teacher_quality(settings: Sequence[tuple[int, float]] = (QUALITY_SETTING,), num_prompts: int = 64, seed: int = 0,
                    folder: str | os.PathLike | None = None, open_positions: bool = False) -> list[dict]:
    """Evaluator metrics of a toy teacher per ``(Euler steps, CFG)`` on the fixed evaluation prompts.

    One sample per prompt from noise seed ``seed``: the setting the shipped teacher's quality is
    quoted in (docs/toy.md), shared by ``benchmarks/toy_teacher_quality.py`` and the tests.
    ``open_positions``: the same prompts with their positions left out (the multimodal prompts).
    """
    from ..sampling import sample_ode
    from ..teachers.base import Denoiser, Guidance
    from .evaluator import ToyEvaluator
    from .world import evaluation_prompts

    adapter, backbone = load_toy_teacher(folder)
    teacher = Denoiser(backbone.eval(), adapter)
    evaluator = ToyEvaluator.load()
    prompts = evaluation_prompts(num_prompts, open_positions=open_positions)
    cond = adapter.encode_prompts(prompts)
    noise = torch.randn(num_prompts, *adapter.latent_shape(), generator=torch.Generator().manual_seed(seed))
    results = []
    for steps, cfg in settings:
        images = adapter.decode(sample_ode(teacher, noise, cond, steps, Guidance(cfg=cfg))).clamp(-1, 1)
        results.append({"steps": steps, "cfg": cfg, **evaluator.evaluate(images, prompts)})
    return results


def _save_transformer_atomically(model: nn.Module, folder: Path) -> None:
    tmp = folder / "transformer.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    final = folder / "transformer"
    old = folder / "transformer.old"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def train_teacher(folder: str | os.PathLike, steps: int, batch_size: int = 64, lr: float = 1e-3,
                  seed: int = 0, caption_dropout: float = 0.1, ema_decay: float = 0.999, warmup: int = 200,
                  save_every: int = 500, progress: bool = True, stop_at: int | None = None,
                  open_positions: float = 0.0) -> dict:
    """Rectified-flow training (velocity target, shifted logit-normal(0, 1) t, caption dropout for CFG).

    ``open_positions``: the fraction of captions that leave the positions out (``ToyWorld``); 0 is
    the stream the shipped teacher learned.  ``stop_at`` ends this invocation early (after a
    checkpoint) without changing the LR schedule, which is set by ``steps``: a time-boxed run,
    resumed later, trains exactly like a straight one.

    Resumable: the EMA weights are saved into ``folder/transformer`` every ``save_every`` steps
    together with ``folder/train_state.pt`` (optimizer, raw weights, step; loaded weights-only).
    """
    from ..schedules import RectifiedFlow
    from .world import ToyWorld

    folder = Path(folder)
    adapter, model = load_toy_teacher(folder)
    model.train().requires_grad_(True)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    state_path = folder / "train_state.pt"
    start = 0
    g = torch.Generator().manual_seed(derive_seed(seed, "teacher-noise"))
    if state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["raw"])
        opt.load_state_dict(state["optimizer"])
        ema = state["ema"]
        start = int(state["step"])
        if "rng" in state:  # exact resume; states written before the RNG was saved reseed by step
            g.set_state(state["rng"])
        else:
            g.manual_seed(derive_seed(seed, "teacher-noise", start))
    world = ToyWorld(seed=derive_seed(seed, "teacher-data") % (2 ** 31), open_positions=open_positions)
    schedule = RectifiedFlow(shift=SCHEDULER_SHIFT)
    empty = adapter.unconditional(1)
    losses: list[float] = []
    t0 = time.perf_counter()
    end = steps if stop_at is None else min(steps, stop_at)
    bar = tqdm(range(start, end), initial=start, total=steps, desc="toy teacher", disable=not progress)
    for step in bar:
        images, captions, _ = world.batch(batch_size, step)
        cond = adapter.encode_prompts(captions)
        drop = torch.rand(batch_size, generator=g) < caption_dropout
        if drop.any():
            for k, v in cond.tensors.items():
                v[drop] = empty.tensors[k].to(v.dtype)
        t = schedule.from_unit(logit_normal(batch_size, 0.0, 1.0, g))  # SD3's shifted logit-normal
        eps = torch.randn(images.shape, generator=g)
        x_t = schedule.add_noise(images, eps, t)
        pred = adapter.predict(model, x_t, t, cond)
        loss = (pred.float() - schedule.target(images, eps, t)).pow(2).mean()
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].mul_(ema_decay).add_(v.detach(), alpha=1 - ema_decay) if v.is_floating_point() else ema[k].copy_(v)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}", refresh=False)
        if (step + 1) % save_every == 0 or step + 1 == end:
            _checkpoint(model, ema, opt, step + 1, folder, g)
    return {"step": end, "final_loss": sum(losses[-100:]) / max(1, len(losses[-100:])),
            "seconds": time.perf_counter() - t0}


def _checkpoint(model: nn.Module, ema: dict, opt: torch.optim.Optimizer, step: int, folder: Path,
                rng: torch.Generator) -> None:
    raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(ema)
    _save_transformer_atomically(model, folder)
    model.load_state_dict(raw)
    tmp = folder / "train_state.pt.tmp"
    torch.save({"raw": raw, "ema": ema, "optimizer": opt.state_dict(), "step": step, "rng": rng.get_state()}, tmp)
    os.replace(tmp, folder / "train_state.pt")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="senseflow toy train-teacher",
                                description="Train the toy SD3 teacher on the procedural world (resumable).")
    add_arguments(p)
    return run(p.parse_args(argv))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="teacher folder (created if missing; resumes if it has a train_state)")
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop (after a checkpoint) at this step; rerun the same command to continue")
    p.add_argument("--open-positions", type=float, default=0.0,
                   help="fraction of captions that leave the shapes' positions out (multimodal prompts)")
    p.add_argument("--init", default=None,
                   help="start from this toy teacher folder (fine-tuning; 'shipped' = the packaged one) "
                        "instead of a random initialisation; used only when --out does not exist yet")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if not (out / "transformer").is_dir():
        if args.init:
            source = TEACHER_ASSET if args.init == "shipped" else Path(args.init)
            if not (source / "transformer").is_dir():
                raise SystemExit(f"--init {args.init}: not a toy teacher folder (no transformer/); "
                                 "pass a folder written by 'senseflow toy train-teacher' or 'shipped'")
            tmp = out.with_name(f".{out.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("train_state.pt", "training.json"))
            os.replace(tmp, out)
        else:
            create_teacher_folder(out, seed=args.seed)
    info = train_teacher(out, args.steps, args.batch_size, args.lr, args.seed, save_every=args.save_every,
                         stop_at=args.stop_at, open_positions=args.open_positions)
    command = (f"senseflow toy train-teacher --out {args.out} --steps {args.steps} --batch-size {args.batch_size} "
               f"--lr {args.lr} --seed {args.seed}")
    if args.open_positions:
        command += f" --open-positions {args.open_positions}"
    if args.init:
        command += f" --init {args.init}"
    record = {"command": command, **info}
    (out / "training.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
