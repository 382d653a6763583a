"""Run under ``torchrun --nproc_per_node=2``: feature-reading discriminators under FSDP2 (each rank its own
real latents): DMD2's GAN head (``dmd2``) and SiD2a's pooled fake-score features (``sid2a``)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from senseflow.config import OptimizerConfig, TrainConfig
from senseflow.discriminators.dmd2_head import GANHeadConfig, attach_gan_head
from senseflow.methods import DMD2, DMD2Config, SiD, SiDConfig
from senseflow.methods.base import Batch
from senseflow.rng import RandomStreams
from senseflow.train.trainer import Trainer
from tests.helpers.models import PROMPTS, tiny_models

CONFIG = DMD2Config(ttur=1, gan_head=GANHeadConfig(enabled=True, layer="blocks.1", feature_channels=32,
                                                   feature_size=(8, 8)))
#: ``dmd2_depths``: one head per block at 50 / 75 / 99 % (blocks.1 and blocks.2 of 3)
DEPTHS_CONFIG = DMD2Config(ttur=1, gan_head=GANHeadConfig(enabled=True, depths=[0.5, 0.75, 0.99], feature_channels=32,
                                                          feature_size=(8, 8)))
#: eps = 1: Adam's first step is ~lr * g (linear in the gradient) instead of ~lr * sign(g), so reduction-order
#: noise in near-zero gradients cannot flip whole steps and the comparison stays tight
OPTIM = {"generator": OptimizerConfig(lr=1e-2, eps=1.0), "fake_score": OptimizerConfig(lr=1e-2, eps=1.0)}


def setup(scenario: str = "dmd2"):
    """Tiny models; for ``dmd2`` with the head attached (as ``build_models`` does: before ``parallelize``)."""
    torch.manual_seed(0)
    models = tiny_models()
    if scenario.startswith("dmd2"):
        attach_gan_head(models.fake_score, _config(scenario).gan_head)
    return models


def rank_batch(models, rank: int) -> Batch:
    real = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(10 + rank)) * 2 - 1  # per-rank data
    return Batch(list(PROMPTS), models.teacher.adapter.encode_prompts(PROMPTS), latents=real)


def method_for(models, scenario: str):
    if scenario == "sid2a":
        cfg = SiDConfig(adversarial=True, adversarial_freeze_images=0, adversarial_warmup_images=0,
                        teacher_guidance={"cfg": 2.0}, fake_guidance={"cfg": 2.0}, fake_train_guidance={"cfg": 2.0})
        return SiD(models, cfg, images_per_iteration=8)
    return DMD2(models, _config(scenario))


def _config(scenario: str) -> DMD2Config:
    return DEPTHS_CONFIG if scenario == "dmd2_depths" else CONFIG


def trainer_for(models, run: Path, rank: int, ctx=None, scenario: str = "dmd2") -> Trainer:
    return Trainer(method_for(models, scenario), None, TrainConfig(batch_size=4, progress=False, tensorboard=False), OPTIM,
                   run, RandomStreams(0, rank=rank), torch.device("cpu"), ctx=ctx)


def main() -> None:
    from senseflow.train.distributed import ParallelConfig, init_distributed, parallelize
    from tests.distributed.worker import full_state

    out, scenario = Path(sys.argv[1]), sys.argv[2]
    ctx = init_distributed("cpu")
    models = setup(scenario)
    parallelize(models, ParallelConfig(strategy="fsdp"), "fp32", ctx)
    trainer = trainer_for(models, out / f"run{ctx.rank}", ctx.rank, ctx, scenario)
    trainer.run_phase("fake_score", rank_batch(models, ctx.rank))
    state = full_state(models.fake_score)   # backbone + gan_head, gathered on rank 0
    if ctx.is_main:
        save_file(state, str(out / "fake_score.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    from tests.distributed.clean_exit import exit_cleanly
    exit_cleanly()
