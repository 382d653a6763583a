"""FSDP2 on CPU/gloo with two processes: equivalence, IDA on shards, randomness, sharded resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from senseflow import api
from senseflow.train.checkpoint import latest_checkpoint
from tests.distributed.worker import EMA, TRAIN_EMA, config

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def torchrun(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([*TORCHRUN, str(ROOT / "tests/distributed/worker.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def single_process_reference(tmp_path, method: str, steps: int = 4, ema: bool = False) -> dict[str, torch.Tensor]:
    from tests.distributed.worker import METHODS, ema_samples
    trainer = api.build_trainer(config(tmp_path / f"ref-{method}", f"train.steps={steps}", *METHODS[method],
                                       *([EMA] if ema else [])))
    models = trainer.method.models
    init = {f"generator.{k}": v.clone() for k, v in models.generator.state_dict().items()}
    samples = []
    for _ in range(steps):
        batch = trainer.data.next_batch()
        for phase in trainer.method.phases(trainer.step):
            trainer.run_phase(phase, batch)
        trainer.step += 1
        if ema:
            samples.append(ema_samples(trainer, models))
    out = {f"generator.{k}": v for k, v in models.generator.state_dict().items()}
    out.update({f"fake_score.{k}": v for k, v in models.fake_score.state_dict().items()})
    if ema:
        out.update({f"ema.{k}": v for k, v in trainer.ema.tensors().items()})
        out["samples"] = torch.stack(samples)
    return out, init


@pytest.fixture(scope="module")
def equivalence_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    torchrun("equivalence", str(out))
    return out


@pytest.mark.parametrize("method,strategy", [("dmd2", "fsdp"), ("senseflow", "fsdp"), ("sid", "fsdp"),
                                             ("senseflow", "ddp")])
def test_sharded_training_matches_single_process(equivalence_run, tmp_path, method, strategy):
    """Same batch and noise on both ranks: averaged sharded gradients == one process (IDA on shards included)."""
    got = load_file(str(equivalence_run / f"{method}-{strategy}.safetensors"))
    ref, init = single_process_reference(tmp_path, method)
    assert got.keys() == ref.keys()
    worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
    assert worst < 1e-5, f"max abs difference {worst:.2e}"  # stated tolerance: reduction order only
    moved = max((got[k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-4, "training must have moved the generator for the comparison to mean anything"


def test_broadcast_from_rank0_fills_meta_ranks_with_rank0_weights(equivalence_run):
    """parallel.broadcast_from_rank0: rank 1 built on meta; gathered shards == rank 0's loaded weights exactly."""
    saved = load_file(str(equivalence_run / "bcast-init.safetensors"))
    ref = {k[4:]: v for k, v in saved.items() if k.startswith("ref.")}
    got = {k[4:]: v for k, v in saved.items() if k.startswith("got.")}
    assert ref.keys() == got.keys() and {k.split(".")[0] for k in ref} == {"generator", "fake_score", "teacher"}
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_broadcast_from_rank0_training_matches(equivalence_run, tmp_path):
    """Same-streams training after a rank-0 broadcast == the plain sharded run == one process (1e-5)."""
    got = load_file(str(equivalence_run / "senseflow-fsdp-rank0.safetensors"))
    plain = load_file(str(equivalence_run / "senseflow-fsdp.safetensors"))
    ref, init = single_process_reference(tmp_path, "senseflow")
    assert got.keys() == plain.keys() == ref.keys()
    assert max((got[k] - plain[k]).abs().max().item() for k in plain) < 1e-5
    assert max((got[k] - ref[k]).abs().max().item() for k in ref) < 1e-5
    assert max((got[k] - init[k]).abs().max().item() for k in init) > 1e-4


def test_sharded_ema_matches_single_process(equivalence_run, tmp_path):
    """generator.ema on FSDP2 shards (no gathering in the update) == one process; EMA-served samples after every
    iteration agree too, and training is unaffected by serving the EMA (weights == one process, 1e-5)."""
    got = load_file(str(equivalence_run / "senseflow-fsdp-ema.safetensors"))
    ref, init = single_process_reference(tmp_path, "senseflow", ema=True)
    assert got.keys() == ref.keys() and any(k.startswith("ema.") for k in ref)
    worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
    assert worst < 1e-5, f"max abs difference {worst:.2e}"
    plain = load_file(str(equivalence_run / "senseflow-fsdp.safetensors"))
    assert max((got[k] - plain[k]).abs().max().item() for k in plain) < 1e-5   # serving the EMA changed nothing
    lag = max((ref[f"ema.{k[len('generator.'):]}"] - ref[k]).abs().max().item()
              for k in ref if k.startswith("generator.") and f"ema.{k[len('generator.'):]}" in ref)
    assert lag > 1e-5, "the EMA must differ from the raw weights for the comparison to mean anything"


def test_per_rank_noise_differs_and_shared_draws_agree(equivalence_run):
    r0, r1 = json.loads((equivalence_run / "draws.json").read_text())
    assert r0["k"] == r1["k"] and r0["guidance"] == r1["guidance"]
    assert all(a != b for a, b in zip(r0["noise"], r1["noise"]))


def test_sharded_checkpoint_resume_and_world_size_change(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    torchrun("train", str(straight), "4")
    torchrun("train", str(split), "2")
    ckpt = latest_checkpoint(split)
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["format"] == "dcp" and meta["world_size"] == 2 and meta["step"] == 2
    # kill + resume with two processes continues exactly like the straight run
    torchrun("train", str(split), "4")
    assert "ema" in json.loads((latest_checkpoint(split) / "meta.json").read_text())["extra"]
    for name in ("student.safetensors", "student_raw.safetensors"):   # the EMA (served) and the raw weights
        a = load_file(str(straight / "student" / name))
        b = load_file(str(split / "student" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # the sharded step-2 checkpoint of a fresh split run loads into ONE process
    one = tmp_path / "one"
    torchrun("train", str(one), "2")
    from tests.distributed.worker import METHODS
    trainer = api.build_trainer(config(one, "train.steps=4", *METHODS["senseflow"], *TRAIN_EMA), resume="auto")
    assert trainer.step == 2 and trainer.ema.images_seen == 1 * 8      # ttur 2: one G step (2 ranks x batch 4)
    gathered = load_file(str(one / "student/student_raw.safetensors"))
    for k, v in trainer.method.models.generator.denoiser.backbone.state_dict().items():
        assert torch.equal(v, gathered[k]), k
    served = load_file(str(one / "student/student.safetensors"))      # the EMA, resharded 2 -> 1 by DCP
    for k, v in trainer.ema.tensors().items():
        assert torch.equal(v, served[k.removeprefix("denoiser.backbone.")]), k
    trainer.fit()
    assert trainer.step == 4
