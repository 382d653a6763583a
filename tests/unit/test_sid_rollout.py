"""SiD's released rollout noise types (``fixed`` / ``ddim``) and the ``1_over_sigma2`` weighting.

Expected values are worked out by hand from the released formulas (ml-sid-dit
``training/sid_dit_*_util.py::sid_dit_generate`` and the ``weighting_scheme`` branch of
``training/sid_dit_*_training_loop.py``) on the linear velocity model ``v = a x`` (so ``x0 = x (1 - a t)``).
"""

from __future__ import annotations

import pytest
import torch

from senseflow.config import validate as parse_config
from senseflow.methods import SiD, SiDConfig
from senseflow.methods.base import Batch
from senseflow.methods.sid import rollout_state
from senseflow.rng import RandomStreams
from tests.helpers.models import PROMPTS, linear_models

A_STUDENT = 0.4


def _setup(**kw):
    models = linear_models(0.3, A_STUDENT)
    method = SiD(models, SiDConfig(**kw))
    cond = models.teacher.adapter.encode_prompts(PROMPTS)
    z = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    return models, method, cond, z


# Released loop with anchors t = 1, .75, .5 and D_x = x (1 - a t), a = 0.4:
#   step 0: x_0 = z, D_0 = 0.6 z, noise_1 = z (both types), x_1 = 0.25 * 0.6 z + 0.75 z = 0.9 z
#   step 1: D_1 = 0.9 z * (1 - 0.3) = 0.63 z
#     ddim : noise_2 = (x_1 - (1 - .75) D_1) / .75 = (0.9 - 0.1575) / 0.75 z = 0.99 z
#            x_2 = 0.5 * 0.63 z + 0.5 * 0.99 z = 0.81 z
#     fixed: x_2 = 0.5 * 0.63 z + 0.5 * z = 0.815 z
@pytest.mark.parametrize("kind, after_one, after_two", [("ddim", 0.9, 0.81), ("fixed", 0.9, 0.815)])
def test_rollout_state_matches_the_released_noise_types(kind, after_one, after_two):
    models, _, cond, z = _setup()
    gen = models.generator
    torch.testing.assert_close(rollout_state(gen, z, cond, 0, kind), z)
    torch.testing.assert_close(rollout_state(gen, z, cond, 1, kind), after_one * z, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rollout_state(gen, z, cond, 2, kind), after_two * z, rtol=1e-6, atol=1e-7)


def test_ddim_noise_is_the_ddim_inversion_of_the_previous_step():
    """x_{i+1} = (1 - t') D_i + t' (x_i - (1 - t) D_i) / t: the deterministic DDIM step, written out."""
    models, _, cond, z = _setup()
    gen = models.generator
    x1 = rollout_state(gen, z, cond, 1, "ddim")
    t1, t2 = 0.75, 0.5
    d1 = x1 * (1 - A_STUDENT * t1)
    eps = (x1 - (1 - t1) * d1) / t1
    torch.testing.assert_close(rollout_state(gen, z, cond, 2, "ddim"), (1 - t2) * d1 + t2 * eps)


def test_method_rollout_uses_the_configured_noise(monkeypatch):
    models, method, cond, _ = _setup(rollout_noise="ddim")
    rng = RandomStreams(0)
    monkeypatch.setattr(rng, "shared_randint", lambda lo, hi: 3)  # k = 3: two no-grad steps, then G at t = 0.5
    replay = RandomStreams(0)
    z = replay.randn((4, 1, 2, 2))
    x_g, t = method.rollout(Batch(list(PROMPTS), cond), rng, grad=True)
    torch.testing.assert_close(t, torch.full((4,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(x_g, 0.81 * (1 - A_STUDENT * 0.5) * z, rtol=1e-6, atol=1e-7)
    assert x_g.requires_grad  # the last step keeps its graph
    fresh = SiD(models, SiDConfig())
    rng_f = RandomStreams(0)
    monkeypatch.setattr(rng_f, "shared_randint", lambda lo, hi: 3)
    x_f, _ = fresh.rollout(Batch(list(PROMPTS), cond), rng_f, grad=False)
    assert not torch.allclose(x_f, x_g)  # fresh noise is a different state


def test_one_over_sigma2_weights_on_given_sigmas():
    """Released: ``1 / (sigma^2).clip(min=1e-5)``; for rectified flow sigma = t."""
    _, method, _, _ = _setup(weighting="1_over_sigma2")
    t = torch.tensor([0.001, 0.1, 0.5, 1.0], dtype=torch.float64)
    x = torch.zeros(4, 1, 2, 2)
    w = method.weight(t, x, x)
    torch.testing.assert_close(w, torch.tensor([1e5, 100.0, 4.0, 1.0]), rtol=1e-6, atol=0)


def test_rollout_noise_is_a_config_switch():
    base = {"paths": {"teacher": "builtin:toy", "prompts": "builtin:toy-world", "output": "/tmp/x"},
            "teacher": {"family": "toy", "resolution": 32}}
    cfg = parse_config({**base, "method": {"name": "sid", "rollout_noise": "ddim", "weighting": "1_over_sigma2"}})
    assert cfg.method.rollout_noise == "ddim" and cfg.method.weighting == "1_over_sigma2"
    assert parse_config({**base, "method": {"name": "sid"}}).method.rollout_noise == "fresh"
    with pytest.raises(Exception, match="rollout_noise"):
        parse_config({**base, "method": {"name": "sid", "rollout_noise": "euler"}})
