"""Run under ``torchrun --nproc_per_node=2``: distributed training scenarios, results written to files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from senseflow import api
from senseflow.build import build_data, build_models
from senseflow.config import apply_overrides, validate
from senseflow.methods import build_method
from senseflow.rng import RandomStreams
from senseflow.train.distributed import ParallelConfig, init_distributed, parallelize
from senseflow.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
METHODS = {
    "dmd2": ["method={name: dmd2, ttur: 2, real_guidance: {cfg: 3.0}}"],
    "senseflow": ["method={name: senseflow, ttur: 2, ida_lambda: 0.9, isg_weight: 0.5, isg_guidance: {cfg: 2.0}}"],
    "sid": ["method={name: sid, teacher_guidance: {cfg: 2.0}, fake_guidance: {cfg: 2.0}, fake_train_guidance: {cfg: 2.0}}"],
}


#: the sharded-checkpoint scenario keeps an EMA (half-life with ramp-up) and serves it in sample grids
TRAIN_EMA = ["generator.ema={halflife_kimg: 0.02, rampup_ratio: 0.5}", "train.sample_every=1"]


def config(out: Path, *overrides: str):
    base = yaml.safe_load((ROOT / "configs/examples/tiny_custom.yaml").read_text())
    return validate(apply_overrides(base, [f"paths.output={out}", f"paths.prompts={ROOT / 'configs/examples/prompts.txt'}",
                                           "train.progress=false", "train.tensorboard=false", "teacher.resolution=8",
                                           "train.batch_size=4", *overrides]))


def full_state(module) -> dict[str, torch.Tensor]:
    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


#: the EMA scenario: a constant decay (a half-life law would depend on the world size through the batch)
EMA = "generator.ema={decay: 0.7}"


def ema_samples(trainer, models) -> torch.Tensor:
    """Fixed-noise samples from the served (EMA) weights: under FSDP2 the swap must not leak into training."""
    cond = models.teacher.adapter.encode_prompts(["a red cat", "a small dog"])
    noise = torch.randn((2, *models.teacher.adapter.latent_shape()), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), trainer.eval_weights():
        return models.generator.sample(noise.to(trainer.device), cond, generator=torch.Generator().manual_seed(5))


def same_streams_training(out: Path, method: str, strategy: str, steps: int, ctx, from_rank0: bool = False,
                          ema: bool = False) -> None:
    """Every rank sees the SAME batch and noise: sharded training must equal one process exactly.

    ``from_rank0``: rank 1 builds its networks on the meta device; rank 0 broadcasts the weights.
    ``ema``: keep a generator EMA on the shards and sample from it after every iteration."""
    tag = f"{method}-{strategy}" + ("-rank0" if from_rank0 else "") + ("-ema" if ema else "")
    cfg = config(out / tag, f"train.steps={steps}", *METHODS[method], *([EMA] if ema else []))
    models = build_models(cfg, ctx.device, meta=from_rank0 and not ctx.is_main)
    parallelize(models, ParallelConfig(strategy=strategy, broadcast_from_rank0=from_rank0), "fp32", ctx)
    trainer = Trainer(build_method(models, cfg.method), build_data(cfg, models.teacher.adapter, ctx.device, 0, 1),
                      cfg.train, {"generator": cfg.optim.generator, "fake_score": cfg.optim.fake_score},
                      out / "unused", RandomStreams(cfg.train.seed, rank=0), ctx.device, ctx=ctx, ema=cfg.generator.ema)
    trainer.save = lambda: None  # this scenario only compares weights
    samples = []
    for _ in range(steps):
        batch = trainer.data.next_batch()
        for phase in trainer.method.phases(trainer.step):
            trainer.run_phase(phase, batch)
        trainer.step += 1
        if ema:
            samples.append(ema_samples(trainer, models))
    states = {f"generator.{k}": v for k, v in full_state(models.generator).items()}
    states.update({f"fake_score.{k}": v for k, v in full_state(models.fake_score).items()})
    if ema:   # the EMA lives as DTensor shards like the parameters: gathered here for the comparison only
        assert all(hasattr(t, "to_local") for t in trainer.ema.shadow.values())
        states.update({f"ema.{k}": v.full_tensor().contiguous() for k, v in trainer.ema.shadow.items()})
        states["samples"] = torch.stack(samples).contiguous()
    if ctx.is_main:
        save_file(states, str(out / f"{tag}.safetensors"))


def broadcast_init(out: Path, ctx) -> None:
    """broadcast_from_rank0: rank 1 holds only meta tensors; after sharding + broadcast, the gathered
    generator / fake score / teacher equal what rank 0 loaded, bit for bit."""
    cfg = config(out / "bcast-init", "train.steps=1", *METHODS["senseflow"])
    loaded = build_models(cfg, ctx.device) if ctx.is_main else None
    models = build_models(cfg, ctx.device, meta=not ctx.is_main)
    nets = {"generator": lambda m: m.generator.denoiser.backbone, "fake_score": lambda m: m.fake_score.backbone,
            "teacher": lambda m: m.teacher.backbone}
    on_meta = all(p.is_meta for get in nets.values() for p in get(models).parameters())
    assert on_meta == (not ctx.is_main), "rank 1 must build on meta, rank 0 must load"
    reference = {f"{n}.{k}": v.detach().clone() for n, get in nets.items()
                 for k, v in get(loaded).state_dict().items()} if ctx.is_main else {}
    parallelize(models, ParallelConfig(strategy="fsdp", broadcast_from_rank0=True), "fp32", ctx)
    got = {f"{n}.{k}": v for n, get in nets.items() for k, v in full_state(get(models)).items()}
    # each rank's own shards must be real (not meta) and finite
    assert all(not p.is_meta and bool(torch.isfinite(p.to_local()).all())
               for get in nets.values() for p in get(models).parameters())
    if ctx.is_main:
        save_file({**{f"ref.{k}": v.contiguous() for k, v in reference.items()},
                   **{f"got.{k}": v for k, v in got.items()}}, str(out / "bcast-init.safetensors"))


def draws(out: Path, ctx) -> None:
    """Per-rank noise must differ; shared draws (k, guidance) must agree."""
    cfg = config(out / "draws", "train.steps=1")
    models = build_models(cfg, ctx.device)
    rng = RandomStreams(cfg.train.seed, rank=ctx.rank)
    cond = models.teacher.adapter.encode_prompts(["a", "b"])
    record = {"k": [], "noise": [], "guidance": []}
    from senseflow.methods.base import GuidanceSpec
    for _ in range(4):
        gin = models.generator.training_input(cond, (2, 3, 8, 8), rng)
        record["k"].append(gin.index)
        record["noise"].append(float(gin.x_t.flatten()[0]))
        record["guidance"].append(GuidanceSpec(cfg=(1.0, 8.0)).sample(rng).cfg)
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, record)
    if ctx.is_main:
        (out / "draws.json").write_text(json.dumps(gathered))


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    ctx = init_distributed("cpu")
    torch.manual_seed(0)
    if scenario == "equivalence":
        for method in ("dmd2", "senseflow", "sid"):
            same_streams_training(out, method, "fsdp", 4, ctx)
        same_streams_training(out, "senseflow", "ddp", 4, ctx)
        same_streams_training(out, "senseflow", "fsdp", 4, ctx, from_rank0=True)
        same_streams_training(out, "senseflow", "fsdp", 4, ctx, ema=True)
        broadcast_init(out, ctx)
        draws(out, ctx)
    elif scenario == "train":  # full API path: per-rank data and noise, sharded checkpoints
        steps = sys.argv[3]
        api.train(config(out, f"train.steps={steps}", "train.checkpoint_every=2", *METHODS["senseflow"], *TRAIN_EMA))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    from tests.distributed.clean_exit import exit_cleanly
    exit_cleanly()
