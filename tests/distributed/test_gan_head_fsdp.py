"""Feature-reading discriminators under FSDP2 (CPU/gloo, two processes): DMD2's GAN head (sharded with the
fake score) and SiD2a's pooled features; each rank its own real latents, gradients averaged."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from senseflow.methods.base import LossOutput
from tests.distributed.gan_head_worker import rank_batch, setup, trainer_for

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("scenario", ["dmd2", "dmd2_depths", "sid2a"])
def test_fake_score_update_equals_one_process_on_the_averaged_loss(tmp_path, scenario):
    """Each rank classifies its own real latents; FSDP must give the update of the mean of the two losses."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests/distributed/gan_head_worker.py"), str(tmp_path), scenario],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = load_file(str(tmp_path / "fake_score.safetensors"))

    models = setup(scenario)
    init = {k: v.clone() for k, v in models.fake_score.state_dict().items()}
    trainer = trainer_for(models, tmp_path / "ref", 0, scenario=scenario)
    (tmp_path / "ref").mkdir()
    batches = [rank_batch(models, r) for r in (0, 1)]
    rngs = [trainer.rng, trainer_for(setup(scenario), tmp_path / "ref", 1, scenario=scenario).rng]   # each rank's streams
    loss = trainer.method.loss
    trainer.method.loss = lambda phase, _b, _r: LossOutput(0.5 * (loss(phase, batches[0], rngs[0]).loss
                                                                  + loss(phase, batches[1], rngs[1]).loss))
    trainer.run_phase("fake_score", batches[0])
    ref = models.fake_score.state_dict()
    assert got.keys() == ref.keys()
    trained = [k for k in ref if not torch.equal(init[k], ref[k])]
    assert trained and (not scenario.startswith("dmd2") or any(k.startswith("gan_head.") for k in trained))
    if scenario == "dmd2_depths":   # every head trained
        assert {k.split(".")[2] for k in trained if k.startswith("gan_head.heads.")} == {"0", "1"}
    worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
    assert worst < 1e-6, f"max abs difference {worst:.2e}"  # reduction order only
