"""DMD (v1)'s regression term on teacher ODE pairs (toy/gmm/regression.py), the ground-truth probe."""

from __future__ import annotations

import pytest
import torch

from senseflow.methods import build_method
from senseflow.rng import RandomStreams
from senseflow.sampling import sample_ode
from senseflow.teachers.base import Denoiser, SenseflowError
from senseflow.toy.gmm.mixture import GaussianMixture
from senseflow.toy.gmm.regression import install, load_or_make_pairs, ode_pairs
from senseflow.toy.gmm.run import RunSpec, build_models
from senseflow.toy.gmm.teacher import GMMAdapter, VelocityMLP, class_prompt


@pytest.fixture
def world():
    torch.manual_seed(0)
    mix = GaussianMixture.random(dim=4, classes=2, modes_per_class=2, seed=1)
    return mix, VelocityMLP(4, 2, width=16, depth=1)


def test_pairs_are_the_teachers_euler_samples_of_their_noise(world, tmp_path):
    mix, mlp = world
    pairs = ode_pairs(mix, mlp, 10, steps=4, seed=3)
    adapter = GMMAdapter(mix)
    cond = adapter.encode_prompts([class_prompt(int(c)) for c in pairs["labels"]])
    expect = sample_ode(Denoiser(mlp, adapter), pairs["noise"], cond, 4, None)
    torch.testing.assert_close(pairs["x0"], expect.float())
    cached = load_or_make_pairs(mix, mlp, 10, 4, tmp_path / "p.safetensors")
    assert (tmp_path / "p.safetensors").is_file()
    again = load_or_make_pairs(mix, VelocityMLP(4, 2, width=16, depth=1), 10, 4, tmp_path / "p.safetensors")
    torch.testing.assert_close(again["x0"], cached["x0"])   # read back, not recomputed with the other net


def test_term_is_the_mse_of_g_on_the_pairs_and_keeps_the_methods_own(world):
    mix, mlp = world
    spec = RunSpec(method="senseflow", steps=1, batch_size=8)
    models = build_models(mix, mlp, spec)
    method = build_method(models, spec.method_config(), images_per_iteration=8)
    pairs = ode_pairs(mix, mlp, 64, steps=2)
    term = install(method, pairs, weight=0.5, batch_size=8, seed=0)
    gen, adapter = models.generator, models.teacher.adapter
    x = torch.zeros(8, 4)
    from senseflow.methods.base import Batch
    batch = Batch([class_prompt(0)] * 8, adapter.encode_prompts([class_prompt(0)] * 8))
    gin = gen.training_input(batch.cond, (8, 4), RandomStreams(0))
    idx = torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(0))
    losses = method.extra_generator_losses(gin, gen(gin.x_t, gin.t, batch.cond), batch, RandomStreams(0))
    assert set(losses) == {"isg", "reg"} and term.weight == 0.5     # SenseFlow's ISG stays
    cond = adapter.encode_prompts([class_prompt(int(c)) for c in pairs["labels"][idx]])
    expect = torch.nn.functional.mse_loss(gen(pairs["noise"][idx], gen.time(0, 8, x.device), cond), pairs["x0"][idx])
    assert losses["reg"][0] == 0.5
    torch.testing.assert_close(losses["reg"][1], expect)


def test_regression_steps_pull_g_onto_the_pairs(world):
    """Only the regression term (DMD's weight swamped): 40 G steps must halve the pair error; a sign error or a
    term that never reaches G's parameters fails."""
    from senseflow.toy.gmm.regression import ODERegression
    mix, mlp = world
    models = build_models(mix, mlp, RunSpec(method="dmd2", steps=1))
    method = build_method(models, RunSpec(method="dmd2", steps=1).method_config(), images_per_iteration=64)
    pairs = ode_pairs(mix, VelocityMLP(4, 2, width=16, depth=1), 64, steps=2)
    reg = ODERegression(method, pairs, 1.0, 64, seed=0)
    gen = models.generator
    opt = torch.optim.Adam(gen.parameters(), lr=1e-2)

    def err() -> float:
        with torch.no_grad():
            cond = models.teacher.adapter.encode_prompts([class_prompt(int(c)) for c in pairs["labels"]])
            return float(torch.nn.functional.mse_loss(gen(pairs["noise"], gen.time(0, 64, "cpu"), cond), pairs["x0"]))

    before = err()
    for _ in range(40):
        loss = reg(None, torch.zeros(1), None, RandomStreams(0))["reg"][1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert err() < 0.5 * before, (before, err())


def test_refused_for_multi_step_generators(world):
    mix, mlp = world
    spec = RunSpec(method="dmd2", steps=4)
    method = build_method(build_models(mix, mlp, spec), spec.method_config(), images_per_iteration=8)
    with pytest.raises(SenseflowError, match="1-step term: use steps = 1"):
        install(method, ode_pairs(mix, mlp, 8, steps=2), 1.0, 8, 0)


def test_first_anchor_form_regresses_a_multi_step_generators_pure_noise_prediction(world):
    """With pairs given as a conditioning (any model), a 4-step generator's first-anchor prediction is regressed:
    the term equals the MSE of G at anchor 0 (first_input_time applied) on the drawn pairs."""
    mix, mlp = world
    spec = RunSpec(method="dmd2", steps=4, batch_size=8, generator_input_time=0.85)
    models = build_models(mix, mlp, spec)
    method = build_method(models, spec.method_config(), images_per_iteration=8)
    pairs = ode_pairs(mix, mlp, 32, steps=2)
    adapter, gen = models.teacher.adapter, models.generator
    cond = adapter.encode_prompts([class_prompt(int(c)) for c in pairs["labels"]])
    term = install(method, {"noise": pairs["noise"], "x0": pairs["x0"]}, 1.0, 8, seed=0, cond=cond,
                   first_anchor=True)
    got = term(None, torch.zeros(1), None, RandomStreams(0))["reg"][1]
    idx = torch.randint(0, 32, (8,), generator=torch.Generator().manual_seed(0))
    pred = gen(pairs["noise"][idx], gen.time(0, 8, "cpu"), cond[idx])
    torch.testing.assert_close(got, torch.nn.functional.mse_loss(pred, pairs["x0"][idx]))
    assert gen.first_input_time is not None   # the anchor-0 query differs from the raw backbone at t = 1
    raw = gen.denoiser(pairs["noise"][idx], gen.time(0, 8, "cpu"), cond[idx])
    assert not torch.allclose(raw, pred)


def test_runner_installs_the_first_anchor_form_for_multi_step_students(world):
    """RunSpec(steps=4, regression_weight>0) trains with the term on the first anchor: its loss is logged."""
    from senseflow.toy.gmm.run import EvalSet, distil
    mix, mlp = world
    spec = RunSpec(method="dmd2", steps=4, iterations=2, batch_size=8, regression_weight=1.0, regression_pairs=16,
                   method_overrides={"ttur": 1})
    ev = EvalSet.make(mix, GMMAdapter(mix), 40)
    out = distil(mix, mlp, spec, ev, eval_every=2)
    assert out["final"]["loss_reg"] > 0
