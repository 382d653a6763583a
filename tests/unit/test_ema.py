"""generator.ema: the decay law (EDM half-life with ramp-up), the recurrence, the start step, serving, IDA, checks."""

from __future__ import annotations

import pytest
import torch

from senseflow.config import TrainConfig
from senseflow.methods.base import Batch, LossOutput
from senseflow.rng import RandomStreams
from senseflow.teachers.base import Conditioning, SenseflowError
from senseflow.train.distributed import DistContext
from senseflow.train.ema import EMAConfig, halflife_decay
from senseflow.train.trainer import Trainer


class _Quadratic:
    """loss = mean ||W c + b||^2 over fixed random conditioning: deterministic, moves W and b every step."""

    name = "quadratic"

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.net = torch.nn.Linear(6, 3)
        self.models = None

    def networks(self):
        return {"generator": self.net}

    def phases(self, iteration):
        return ["generator"]

    def loss(self, phase, batch, rng):
        out = (self.net(batch.cond.tensors["text"]) - 1.0).pow(2).sum(1).mean()
        return LossOutput(out, {"loss_q": out.detach()})

    def after_step(self, phase):
        return {}


def _trainer(tmp_path, ema: EMAConfig | None, batch_size: int = 4, ctx=None) -> tuple[Trainer, Batch]:
    from senseflow.config import OptimizerConfig
    method = _Quadratic()
    train = TrainConfig(batch_size=batch_size, grad_clip=None, progress=False, tensorboard=False)
    trainer = Trainer(method, None, train, {"generator": OptimizerConfig(lr=0.05)}, tmp_path, RandomStreams(0),
                      torch.device("cpu"), ctx=ctx, ema=ema)
    g = torch.Generator().manual_seed(1)
    batch = Batch(["p"] * batch_size, Conditioning({"text": torch.randn(batch_size, 6, generator=g)}))
    return trainer, batch


def _raw(trainer):
    return {n: p.detach().double().clone() for n, p in trainer.networks["generator"].named_parameters()}


def _shadow(trainer):
    return {n: t.double() for n, t in trainer.ema.tensors().items()}


def test_halflife_to_decay_is_edms_formula():
    # beta = 0.5 ** (batch / min(halflife_kimg * 1000, images_seen * rampup)), by hand:
    # 500-image half-life, batch 4, ramp-up long over: 2^(-0.008) = exp(-0.0055452) = 0.9944702
    assert halflife_decay(0.5, 4, 10 ** 9, 0.05) == pytest.approx(0.9944702, abs=1e-7)
    assert halflife_decay(0.5, 4, 40, 0.05) == 0.25          # half-life min(500, 40 * 0.05 = 2): 2^-2
    assert halflife_decay(0.5, 4, 80, 0.05) == 0.5           # half-life 4 = the batch: 2^-1
    assert halflife_decay(0.5, 4, 0, 0.05) == 0.0            # first update: a copy of the raw weights
    assert halflife_decay(0.004, 4, 0, None) == 0.5          # no ramp-up: 4-image half-life from the start
    assert halflife_decay(0.008, 8, 10 ** 6, None) == 0.5    # 2 ranks x batch 4 = 8 images per step


def test_images_per_step_is_the_global_batch(tmp_path):
    trainer, _ = _trainer(tmp_path, EMAConfig(halflife_kimg=1.0), batch_size=4, ctx=DistContext(world_size=2))
    assert trainer.ema.images_per_step == 8


def test_config_needs_exactly_one_law():
    with pytest.raises(ValueError, match="exactly one"):
        EMAConfig()
    with pytest.raises(ValueError, match="exactly one"):
        EMAConfig(decay=0.9, halflife_kimg=1.0)
    with pytest.raises(ValueError):
        EMAConfig(decay=1.0)


def test_ema_after_n_steps_equals_the_recurrence(tmp_path):
    """Half-life 10 images, ramp-up 0.5, batch 4: half-lives min(10, 0.5 * seen) = 0, 2, 4, 6, 8 images."""
    trainer, batch = _trainer(tmp_path, EMAConfig(halflife_kimg=0.010, rampup_ratio=0.5), batch_size=4)
    betas = [0.0, 0.25, 0.5, 0.6299605249, 0.7071067812]      # 2^-(4/h): 2^-inf, 2^-2, 2^-1, 2^-(2/3), 2^-(1/2)
    expect = _raw(trainer)
    logged = []
    for beta in betas:
        logged.append(trainer.run_phase("generator", batch)["ema_decay"])
        raw = _raw(trainer)
        expect = {n: beta * expect[n] + (1 - beta) * raw[n] for n in raw}
        trainer.step += 1
    assert logged == pytest.approx(betas, abs=1e-9)
    got = _shadow(trainer)
    worst = max((got[n] - expect[n]).abs().max().item() for n in expect)
    assert worst < 1e-6, worst
    gap = max((got[n] - raw[n]).abs().max().item() for n in raw)
    assert gap > 1e-3, "the EMA must lag the raw weights for the comparison to mean anything"
    assert trainer.ema.images_seen == 20


def test_start_step_is_respected(tmp_path):
    trainer, batch = _trainer(tmp_path, EMAConfig(decay=0.5, start_step=3))
    for _ in range(3):                        # iterations 0, 1, 2: the EMA follows the raw weights exactly
        trainer.run_phase("generator", batch)
        trainer.step += 1
        raw = dict(trainer.networks["generator"].named_parameters())
        assert all(torch.equal(trainer.ema.tensors()[n], raw[n].detach()) for n in raw)
    prev = _raw(trainer)
    trainer.run_phase("generator", batch)     # iteration 3: the first average
    trainer.step += 1
    now = _raw(trainer)
    expect = {n: 0.5 * prev[n] + 0.5 * now[n] for n in now}
    trainer.run_phase("generator", batch)     # iteration 4
    last = _raw(trainer)
    expect = {n: 0.5 * expect[n] + 0.5 * last[n] for n in now}
    got = _shadow(trainer)
    assert max((got[n] - expect[n]).abs().max().item() for n in now) < 1e-6
    assert trainer.ema.images_seen == 8       # two averaged steps of 4 images


def test_eval_weights_serves_the_ema_and_restores_raw_bit_exactly(tmp_path):
    trainer, batch = _trainer(tmp_path, EMAConfig(decay=0.9))
    for _ in range(3):
        trainer.run_phase("generator", batch)
        trainer.step += 1
    net = trainer.networks["generator"]
    raw = {n: p.detach().clone() for n, p in net.named_parameters()}
    ema = trainer.ema.tensors()
    with trainer.eval_weights():
        assert all(torch.equal(p, ema[n]) for n, p in net.named_parameters())
    assert all(torch.equal(p, raw[n]) for n, p in net.named_parameters())
    assert any(not torch.equal(raw[n], ema[n]) for n in raw)
    # generator.ema.weights: raw serves the raw weights
    trainer.ema.cfg = EMAConfig(decay=0.9, weights="raw")
    with trainer.eval_weights():
        assert all(torch.equal(p, raw[n]) for n, p in net.named_parameters())


def test_skipped_step_does_not_update_the_ema(tmp_path):
    trainer, batch = _trainer(tmp_path, EMAConfig(decay=0.5))
    trainer.run_phase("generator", batch)
    before = trainer.ema.tensors()
    bad = Batch(batch.prompts, Conditioning({"text": torch.full_like(batch.cond.tensors["text"], float("nan"))}))
    logs = trainer.run_phase("generator", bad)
    assert logs.get("skipped/generator") == 1.0 and "ema_decay" not in logs
    assert all(torch.equal(before[n], v) for n, v in trainer.ema.tensors().items())


def test_non_finite_ema_is_never_saved(tmp_path):
    trainer, batch = _trainer(tmp_path, EMAConfig(decay=0.5))
    trainer.data = type("D", (), {"state_dict": lambda self: {}})()
    trainer.run_phase("generator", batch)
    trainer.step = 1
    trainer.save()
    with torch.no_grad():
        next(iter(trainer.ema.shadow.values())).view(-1)[0] = float("inf")
    trainer.step = 2
    with pytest.raises(SenseflowError, match="non-finite"):
        trainer.save()
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000001"]


def test_ida_reads_the_raw_generator(tmp_path):
    """SenseFlow's IDA after a G step: phi <- lam phi + (1 - lam) theta_RAW, with an EMA far from theta."""
    from tests.integration.test_training import METHODS, _config
    from senseflow import api
    trainer = api.build_trainer(_config(tmp_path, "train.steps=8", *METHODS["senseflow"], "method.ttur=1",
                                        "generator.ema={decay: 0.99}", "optim.generator.lr=1.0e-2"))
    lam = trainer.method.config.ida_lambda
    fake = trainer.method.models.fake_score.backbone
    gen = trainer.method.models.generator.denoiser.backbone
    for _ in range(3):
        batch = trainer.data.next_batch()
        for phase in trainer.method.phases(trainer.step):
            trainer.run_phase(phase, batch)
        trainer.step += 1
    phi0 = {n: p.detach().double().clone() for n, p in fake.named_parameters()}
    trainer.run_phase("generator", trainer.data.next_batch())
    theta = {n: p.detach().double() for n, p in gen.named_parameters()}
    ema = {k.removeprefix("denoiser.backbone."): v.double() for k, v in trainer.ema.tensors().items()}
    shared = [n for n in phi0 if n in theta]
    assert shared
    got = {n: p.detach().double() for n, p in fake.named_parameters()}
    worst_raw = max((got[n] - (lam * phi0[n] + (1 - lam) * theta[n])).abs().max().item() for n in shared)
    worst_ema = max((got[n] - (lam * phi0[n] + (1 - lam) * ema[n])).abs().max().item() for n in shared)
    assert worst_raw < 1e-6, worst_raw
    assert worst_ema > 1e-4, "the EMA must differ from the raw weights for this test to mean anything"
