"""Library entry points: everything the CLI does is a call here, usable from your own scripts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

from .build import build_data, build_method_from, build_models, build_samples, resolve_device, run_directory
from .config import Config, dump_config
import torch

from .export import export_meta, export_student
from .rng import RandomStreams
from .teachers.base import SenseflowError
from .train import rundir
from .train.checkpoint import latest_checkpoint, read_meta
from .train.compiled import compile_models
from .shared_base import has_shared_base
from .train.distributed import DistContext, builds_on_meta, init_distributed, parallelize, resolve_strategy
from .train.lock import holds, lock_run_dir, release, write_pid
from .train.precision import cast_trainable, master_dtype
from .train.preflight import check_batch_memory
from .train.trainer import Trainer, TrainerHooks

ResumeMode = Literal["auto", "never"]


def prepare_run_dir(config: Config, resume: str, ctx: DistContext | None = None, step: int = 0) -> Path:
    """Create the run directory (main process), lock it, clean stale temp files, write ``config.yaml``.

    Called by the trainer right before the run writes anything (see :mod:`senseflow.train.rundir`):
    everything that can refuse the run has been checked by then.
    """
    run_dir = run_directory(config)
    if ctx is None or ctx.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock_run_dir(run_dir)
            rundir.clean_stale_tmp(run_dir)
            write_pid(run_dir)
            rundir.write_config(run_dir, dump_config(config), json.loads(config.model_dump_json()), step)
        except OSError as exc:
            raise SenseflowError(f"paths.output: cannot write {str(run_dir)!r} ({exc.strerror or exc})") from None
    if ctx is not None:
        ctx.barrier()
    return run_dir


def _checkpoint_to_resume(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint ``--resume`` asks for, checked before anything is built or written."""
    latest = latest_checkpoint(run_dir)
    if resume == "never":
        if latest is not None:
            raise SenseflowError(f"paths.output {str(run_dir)!r} already holds a run; use --resume auto to continue "
                                 "it or choose another paths.output")
        return None
    if resume == "auto":
        return latest
    ckpt = Path(resume)
    if not ckpt.is_dir():
        raise SenseflowError(f"--resume {resume!r}: not a checkpoint directory")
    read_meta(ckpt)  # one line if it is not a complete checkpoint
    return ckpt


def _check_saved_configs(config: Config, run_dir: Path, ckpt: Path | None) -> None:
    """Refuse to resume under a config that builds other networks (the run's and the checkpoint's run's)."""
    if ckpt is None:
        return
    new = json.loads(config.model_dump_json())
    for folder in dict.fromkeys([run_dir, ckpt.parent.parent]):
        saved = rundir.read_saved_config(folder)
        if saved is not None:
            rundir.check_resumable(saved[1], new, ckpt)


def build_trainer(config: Config, resume: str = "auto", hooks: TrainerHooks | None = None) -> Trainer:
    """Everything short of ``fit()``: models, method, data, optimisers, resumed state.

    Nothing is written here: the run directory and its ``config.yaml`` are created by the trainer
    once its first step succeeded (``Trainer.before_first_write``), so any refusal -- a bad
    checkpoint, bad data, a batch that does not fit -- leaves ``paths.output`` as it was.
    """
    resolve_device(config.train.device)  # fail early on an impossible device request
    run_dir = run_directory(config)
    rundir.check_writable(run_dir)
    ckpt = _checkpoint_to_resume(run_dir, resume)
    ctx = init_distributed(config.train.device)
    locked_here = False
    if ctx.is_main and run_dir.is_dir() and not holds(run_dir):
        lock_run_dir(run_dir)  # a second trainer on this directory stops here, before building anything
        locked_here = True
    try:
        _check_saved_configs(config, run_dir, ckpt)
        trainer = _build(config, ctx, run_dir, ckpt, hooks)
    except BaseException:
        if locked_here:
            release(run_dir)
        raise
    return trainer


def _build(config: Config, ctx: DistContext, run_dir: Path, ckpt: Path | None, hooks: TrainerHooks | None) -> Trainer:
    device = ctx.device
    from .evaluation.train_eval import attach_train_eval
    hooks = attach_train_eval(config, hooks, ctx.is_main, device)   # train.eval (metric weights checked here)
    from .train.frozen import apply_teacher_storage, check_teacher_storage
    check_teacher_storage(config, ctx.distributed)
    models = build_models(config, device, ctx.rank, meta=builds_on_meta(config.parallel, ctx),
                          sharded=resolve_strategy(config.parallel.strategy, ctx) != "none")
    for net in (models.generator, models.fake_score):
        if config.train.precision == "bf16" and not has_shared_base(net):  # a shared base keeps teacher.dtype
            net.to(torch.bfloat16)
        else:  # fp32 master weights (and so fp32 optimiser state) whatever teacher.dtype is
            cast_trainable(net, master_dtype(config.train.precision))
    apply_teacher_storage(models, config, device)   # teacher.weight_dtype / cpu_offload: after the copies
    adapter = models.teacher.adapter
    check_batch_memory(config.train.batch_size, config.train.grad_accum, tuple(adapter.latent_shape()), device)
    parallelize(models, config.parallel, config.train.precision, ctx)
    compile_models(models, config.train.compile)
    method = build_method_from(config, models, ctx.world_size)
    data = build_data(config, adapter, device, ctx.rank, ctx.world_size)
    samples = build_samples(config, adapter, device)
    rng = RandomStreams(config.train.seed, rank=ctx.rank, device=device)
    optim = {"generator": config.optim.generator, "fake_score": config.optim.fake_score,
             "discriminator": config.optim.discriminator}
    trainer = Trainer(method, data, config.train, optim, run_dir, rng, device, samples=samples,
                      sampler=config.generator.sampler, hooks=hooks, ctx=ctx, ema=config.generator.ema)
    if ckpt is not None:
        trainer.resume(ckpt)
    step = trainer.step
    trainer.before_first_write = lambda: prepare_run_dir(config, "auto", ctx, step)
    if ckpt is not None and ctx.is_main:
        print(f"resuming {run_dir} from step {trainer.step} (checkpoint {ckpt})", flush=True)
    return trainer


def train(config: Config, resume: str = "auto", hooks: TrainerHooks | None = None) -> Trainer:
    """Train a student as configured; writes checkpoints, logs, samples and ``<output>/student/``.

    ``student/`` is written right after the final checkpoint and before the final sample grid
    (a ``TrainerHooks.on_finish`` hook), so nothing that goes wrong while sampling can lose it.
    """
    hooks = hooks or TrainerHooks()
    hooks = dataclasses.replace(hooks, on_finish=[lambda tr, _step: write_student(tr, config), *hooks.on_finish])
    trainer = build_trainer(config, resume, hooks)
    try:
        trainer.fit()
    finally:
        if trainer.ctx.is_main:
            release(trainer.run_dir)  # the run directory is free for the next command
    return trainer


def write_student(trainer: Trainer, config: Config) -> None:
    """``<output>/student/``: the generator backbone + ``student.json`` (gathered from the shards when distributed)."""
    meta = {"family": config.teacher.family, "teacher": config.paths.teacher, "resolution": config.teacher.resolution,
            "sampler": config.generator.sampler, "method": config.method.name, "step": trainer.step,
            "images": trainer.method.models.teacher.adapter.decodes_to_images()}  # generate: PNG or raw latents
    if config.generator.lora is not None:  # load_student rebuilds the adapters from this
        meta["lora"] = config.generator.lora.model_dump()
    if trainer.ema is not None:  # student.safetensors = generator.ema.weights, the other set named by kind
        from .train.ema import export_student_with_ema
        export_student_with_ema(trainer, trainer.run_dir / "student", meta)
    elif trainer.ctx.distributed:  # gather the sharded student from the final checkpoint
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
