"""Library entry points: everything the CLI does is a call here, usable from your own scripts."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from .build import build_data, build_method_from, build_models, build_samples, resolve_device, run_directory
from .config import Config, dump_config
import torch

from .export import export_meta, export_student
from .rng import RandomStreams
from .teachers.base import SenseflowError
from .train.checkpoint import latest_checkpoint
from .train.distributed import DistContext, builds_on_meta, init_distributed, parallelize
from .train.trainer import Trainer, TrainerHooks

ResumeMode = Literal["auto", "never"]


def prepare_run_dir(config: Config, resume: str, ctx: DistContext | None = None) -> Path:
    """Create the run directory (main process); refuse to mix two runs in one directory."""
    run_dir = run_directory(config)
    has_ckpt = latest_checkpoint(run_dir) is not None
    if has_ckpt and resume == "never":
        raise SenseflowError(f"paths.output {str(run_dir)!r} already holds a run; use --resume auto to continue it "
                             "or choose another paths.output")
    if ctx is None or ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(config))
    if ctx is not None:
        ctx.barrier()
    return run_dir


def build_trainer(config: Config, resume: str = "auto", hooks: TrainerHooks | None = None) -> Trainer:
    """Everything short of ``fit()``: models, method, data, optimisers, resumed state."""
    resolve_device(config.train.device)  # fail early on an impossible device request
    ctx = init_distributed(config.train.device)
    device = ctx.device
    models = build_models(config, device, ctx.rank, meta=builds_on_meta(config.parallel, ctx))
    if config.train.precision == "bf16":
        for net in (models.generator, models.fake_score):
            net.to(torch.bfloat16)
    elif config.train.precision == "amp_bf16":  # fp32 master weights (the copies are made in teacher.dtype):
        for net in (models.generator, models.fake_score):  # Adam on float16 weights divides by an eps that is 0
            net.to(torch.float32)
    parallelize(models, config.parallel, config.train.precision, ctx)
    adapter = models.teacher.adapter
    method = build_method_from(config, models, ctx.world_size)
    data = build_data(config, adapter, device, ctx.rank, ctx.world_size)
    samples = build_samples(config, adapter, device)
    run_dir = prepare_run_dir(config, resume, ctx)
    rng = RandomStreams(config.train.seed, rank=ctx.rank, device=device)
    optim = {"generator": config.optim.generator, "fake_score": config.optim.fake_score,
             "discriminator": config.optim.discriminator}
    trainer = Trainer(method, data, config.train, optim, run_dir, rng, device, samples=samples,
                      sampler=config.generator.sampler, hooks=hooks, ctx=ctx)
    if resume == "auto":
        trainer.resume()
    elif resume != "never":
        ckpt = Path(resume)
        if not ckpt.is_dir():
            raise SenseflowError(f"--resume {resume!r}: not a checkpoint directory")
        trainer.resume(ckpt)
    return trainer


def train(config: Config, resume: str = "auto", hooks: TrainerHooks | None = None) -> Trainer:
    """Train a student as configured; writes checkpoints, logs, samples and ``<output>/student/``.

    ``student/`` is written right after the final checkpoint and before the final sample grid
    (a ``TrainerHooks.on_finish`` hook), so nothing that goes wrong while sampling can lose it.
    """
    hooks = hooks or TrainerHooks()
    hooks = dataclasses.replace(hooks, on_finish=[lambda tr, _step: write_student(tr, config), *hooks.on_finish])
    trainer = build_trainer(config, resume, hooks)
    trainer.fit()
    return trainer


def write_student(trainer: Trainer, config: Config) -> None:
    """``<output>/student/``: the generator backbone + ``student.json`` (gathered from the shards when distributed)."""
    meta = {"family": config.teacher.family, "teacher": config.paths.teacher, "resolution": config.teacher.resolution,
            "sampler": config.generator.sampler, "method": config.method.name, "step": trainer.step,
            "images": trainer.method.models.teacher.adapter.decodes_to_images()}  # generate: PNG or raw latents
    if config.generator.lora is not None:  # load_student rebuilds the adapters from this
        meta["lora"] = config.generator.lora.model_dump()
    if trainer.ctx.distributed:  # gather the sharded student from the final checkpoint
        from .train.checkpoint import latest_checkpoint as latest
        from .train.sharded import consolidate_network
        trainer.ctx.barrier()
        if trainer.ctx.is_main:
            consolidate_network(latest(trainer.run_dir), "generator", trainer.run_dir / "student" / "student.safetensors",
                                strip_prefix="denoiser.backbone.")
            export_meta(trainer.method.models.generator, trainer.run_dir / "student", meta)
        trainer.ctx.barrier()
    else:
        export_student(trainer.method.models.generator, trainer.run_dir / "student", meta)
