"""Network passes per iteration, counted by hooks during real bench iterations, equal the minimum.

The expected counts are written out here from ALGORITHMS.md (not read from senseflow's table), so
an extra pass -- or a table entry that drifts -- fails.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from senseflow.bench.passes import MINIMUM, PassCounter, count_passes, excess
from senseflow.bench.runner import BenchSettings, setup
from tests.helpers.threads import single_thread  # noqa: E402,F401 (module-wide autouse: one thread)


def _records(method: str, iterations: int, **overrides):
    settings = BenchSettings(preset="tiny", method=method, batch_size=2, iterations=iterations, warmup=0,
                             method_overrides=overrides)
    trainer, batch, _, _ = setup(settings)
    try:
        return count_passes(trainer, batch, iterations)
    finally:
        shutil.rmtree(trainer.run_dir, ignore_errors=True)


# ALGORITHMS.md, written out by hand: "network/kind" -> passes (absent = 0)
DMD2_G = {"generator/rollouts": 1, "generator/forward_grad": 1, "generator/backward": 1,
          "teacher/forward_nograd": 1, "fake_score/forward_nograd": 1, "fake_score/forward_grad": 1,
          "fake_score/backward": 1}
DMD2_FAKE = {"generator/rollouts": 1, "generator/forward_nograd": 1, "fake_score/forward_grad": 1,
             "fake_score/backward": 1}
SENSEFLOW_G = {**DMD2_G, "teacher/forward_nograd": 2, "generator/forward_nograd": 1}  # + ISG: teacher & G steps
SID = {"generator/rollouts": 2, "generator/forward_nograd": 1, "generator/forward_grad": 1, "generator/backward": 1,
       "fake_score/forward_grad": 2, "fake_score/backward": 2, "teacher/forward_grad": 1, "teacher/backward": 1}


def _check(records, expected_by_kind):
    for r in records:
        kind = "generator" if "generator" in r["phases"] else "fake"
        expected = expected_by_kind[kind]
        counted = {k: v for k, v in r["counted"].items() if not k.startswith("generator/rollout_")}
        assert counted == expected, (r["phases"], counted)
        # every rollout forward was a step the rollouts asked for (k drawn per rollout)
        assert r["counted"].get("generator/rollout_forwards", 0) == r["counted"].get("generator/rollout_steps", 0)
        assert all(v == 0 for v in excess(r).values()), excess(r)


@pytest.mark.parametrize("method, ttur, expected", [
    ("dmd2", 2, {"generator": DMD2_G, "fake": DMD2_FAKE}),
    ("senseflow", 2, {"generator": SENSEFLOW_G, "fake": DMD2_FAKE}),
])
def test_dmd2_and_senseflow_do_the_minimum_passes(method, ttur, expected):
    records = _records(method, 2, ttur=ttur)
    assert [("generator" in r["phases"]) for r in records] == [True, False]
    _check(records, expected)
    assert MINIMUM[method]["generator"] == expected["generator"] and MINIMUM[method]["fake"] == expected["fake"]


def test_sid_does_the_minimum_passes():
    records = _records("sid", 1)
    _check(records, {"generator": SID})
    assert MINIMUM["sid"]["generator"] == SID


def test_fresh_fake_sample_is_one_rollout_and_one_g_forward_more_on_generator_iterations():
    """The old behaviour (``fake_sample: fresh``) draws a new G sample for the fake score: counted as excess."""
    r = _records("dmd2", 1, ttur=1, fake_sample="fresh")[0]
    assert excess(r)["generator/rollouts"] == 1 and excess(r)["generator/forward_nograd"] == 1


def test_counter_counts_backward_through_a_frozen_network():
    net = torch.nn.Linear(3, 3).requires_grad_(False)
    counter = PassCounter()
    x = torch.randn(2, 3, requires_grad=True)
    with counter.installed({"teacher": net}):
        with torch.no_grad():
            net(x)
        net(x).sum().backward()
    assert counter.take() == {"teacher/forward_nograd": 1, "teacher/forward_grad": 1, "teacher/backward": 1}


def test_generator_iteration_trains_the_fake_score_on_gs_own_detached_sample():
    """Released DMD2 (guidance_data_dict): the fake score's loss uses the very sample G's loss used."""
    settings = BenchSettings(preset="tiny", method="dmd2", batch_size=2, iterations=1, warmup=0,
                             method_overrides={"ttur": 1})
    trainer, batch, _, _ = setup(settings)
    try:
        method = trainer.method
        seen = []
        orig = method.dmd_loss

        def dmd_loss(x, cond, rng):
            seen.append(x.detach().clone())
            return orig(x, cond, rng)
        method.dmd_loss = dmd_loss
        orig_add = method.schedule.add_noise
        used = []

        def add_noise(x, eps, t):
            used.append(x.detach().clone())
            return orig_add(x, eps, t)
        method.phases(0)
        trainer.run_phase("generator", batch)
        method.schedule.add_noise = add_noise
        trainer.run_phase("fake_score", batch)
        del method.schedule.add_noise
        assert torch.equal(used[0], seen[0].float())
    finally:
        shutil.rmtree(trainer.run_dir, ignore_errors=True)
