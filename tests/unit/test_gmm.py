"""The Gaussian-mixture ground truth: exact posterior, exact metrics, the teacher contract, a short distillation.

Reference values come from independent computations: importance-weighted Monte Carlo over
``p(x0 | class)``, autograd of a ``torch.distributions`` mixture density (Tweedie), and hand
calculations for the metrics.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from senseflow.teachers.base import Denoiser, SenseflowError
from senseflow.toy.gmm.metrics import evaluate, mode_shape, sliced_w2
from senseflow.toy.gmm.mixture import GaussianMixture
from senseflow.toy.gmm.teacher import ClassPromptEncoder, ExactVelocity, GMMAdapter


@pytest.fixture
def one_thread():
    """Tiny ops: a second intra-op thread only adds synchronisation (20x slower on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _full_cov_mixture(dim: int, classes: int, modes: int, seed: int) -> GaussianMixture:
    """Correlated (non-diagonal) covariances and unequal weights: nothing axis-aligned to hide behind."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, modes, dim, generator=g, dtype=torch.float64)
    a = torch.randn(classes, modes, dim, dim, generator=g, dtype=torch.float64) * 0.3
    cov = a @ a.transpose(-1, -2) + 0.05 * torch.eye(dim, dtype=torch.float64)
    w = torch.rand(classes, modes, generator=g, dtype=torch.float64) + 0.2
    return GaussianMixture.from_covariances(means, cov, w / w.sum(1, keepdim=True))


def _torch_density(mix: GaussianMixture, c: int, t: float) -> MixtureSameFamily:
    """p_t(x | c) built from scratch: x_t | k ~ N((1-t) mu_k, (1-t)^2 S_k + t^2 I)."""
    a, s = 1.0 - t, t
    cov = a * a * mix.covariances[c] + s * s * torch.eye(mix.dim, dtype=torch.float64)
    return MixtureSameFamily(Categorical(probs=mix.weights[c]), MultivariateNormal(a * mix.means[c], cov))


@pytest.mark.parametrize("dim,classes,modes,t", [(3, 2, 3, 0.6), (5, 3, 2, 0.35)])
def test_posterior_mean_matches_monte_carlo(dim, classes, modes, t):
    mix = _full_cov_mixture(dim, classes, modes, seed=dim)
    g = torch.Generator().manual_seed(7)
    c = classes - 1
    x0_true = mix.sample(torch.tensor([c]), g)
    x_t = (1 - t) * x0_true + t * torch.randn(1, dim, generator=g, dtype=torch.float64)
    # E[x0 | x_t] = E_{x0 ~ p(.|c)}[x0 N(x_t; (1-t) x0, t^2 I)] / E[N(...)]
    n = 400_000
    x0 = mix.sample(torch.full((n,), c), g)
    logw = -0.5 * ((x_t - (1 - t) * x0) ** 2).sum(1) / t ** 2
    w = torch.softmax(logw, 0)
    mc = (w[:, None] * x0).sum(0)
    ess = 1.0 / (w ** 2).sum()
    spread = ((w[:, None] * (x0 - mc) ** 2).sum(0)).sqrt()
    exact = mix.posterior_mean(x_t, t, torch.tensor([c]))[0]
    assert ess > 500  # the Monte Carlo estimate itself is trustworthy
    assert torch.all((exact - mc).abs() <= 5 * spread / ess.sqrt() + 1e-6), (exact, mc)


@pytest.mark.parametrize("t", [0.05, 0.5, 0.95])
def test_posterior_mean_is_tweedie_of_the_density(t):
    """E[x0 | x_t] = (x_t + t^2 grad log p_t(x_t)) / (1 - t), the density built independently."""
    mix = _full_cov_mixture(4, 2, 3, seed=11)
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 1, 1, 0])
    x_t = ((1 - t) * mix.sample(labels, g) + t * torch.randn(4, 4, generator=g, dtype=torch.float64)).requires_grad_()
    logp = torch.stack([_torch_density(mix, int(c), t).log_prob(x_t[i]) for i, c in enumerate(labels)])
    score, = torch.autograd.grad(logp.sum(), x_t)
    tweedie = (x_t.detach() + t * t * score) / (1 - t)
    torch.testing.assert_close(mix.posterior_mean(x_t.detach(), t, labels), tweedie, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(mix.log_prob(x_t.detach(), labels, t), logp.detach(), rtol=1e-9, atol=1e-9)


def test_no_class_is_the_prior_weighted_mixture():
    """A zero class weighting (CFG's unconditional branch) = the whole mixture under the class prior."""
    mix = _full_cov_mixture(3, 2, 2, seed=5)
    t = 0.4
    x = torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64, requires_grad=True)
    a, s = 1 - t, t
    means = (a * mix.means).reshape(-1, 3)
    covs = (a * a * mix.covariances + s * s * torch.eye(3, dtype=torch.float64)).reshape(-1, 3, 3)
    probs = (mix.class_prior[:, None] * mix.weights).reshape(-1)
    logp = MixtureSameFamily(Categorical(probs=probs), MultivariateNormal(means, covs)).log_prob(x[0])
    score, = torch.autograd.grad(logp, x)
    expected = (x.detach() + s * s * score) / a
    got = mix.posterior_mean(x.detach(), t, torch.zeros(1, 2, dtype=torch.float64))
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-7)


def test_posterior_limits():
    """t = 1: the class mean (x_t says nothing); t = 0: x_t itself."""
    mix = _full_cov_mixture(3, 2, 3, seed=2)
    x = torch.randn(5, 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 1])
    class_mean = (mix.weights[..., None] * mix.means).sum(1)
    torch.testing.assert_close(mix.posterior_mean(x, 1.0, labels), class_mean[labels])
    torch.testing.assert_close(mix.posterior_mean(x, 0.0, labels), x)


def test_exact_teacher_through_the_custom_contract():
    """Denoiser(ExactVelocity, GMMAdapter) returns the exact posterior mean as its x0 prediction."""
    mix = GaussianMixture.random(dim=6, classes=3, modes_per_class=2, seed=1)
    adapter = GMMAdapter(mix)
    teacher = Denoiser(ExactVelocity(mix), adapter)
    cond = adapter.encode_prompts(["class 0", "class 2", ""])
    x = torch.randn(3, 6)
    t = torch.tensor([0.3, 0.7, 0.5], dtype=torch.float64)
    expected = mix.posterior_mean(x, t, torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 0, 0]]))
    torch.testing.assert_close(teacher(x, t, cond).double(), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(SenseflowError, match="class k"):
        ClassPromptEncoder(3)(["class 3"])


def test_metrics_floor_hand_values_and_shift(one_thread):
    mix = GaussianMixture.random(dim=8, classes=2, modes_per_class=3, seed=0)
    g = torch.Generator().manual_seed(0)
    labels = mix.sample_labels(4000, g)
    true = evaluate(mix, mix.sample(labels, g), labels, generator=g, recall_samples=300)
    assert true["class_acc"] == 1.0 and true["coverage"] == 1.0
    assert abs(true["precision"] - 0.99) < 0.01  # the 99% ellipsoid holds 99% of a component's mass
    assert true["mode_tv"] < 0.04 and true["recall"] > 0.8
    shifted = evaluate(mix, mix.shifted(0.3).sample(labels, g), labels, generator=g, recall_samples=300)
    assert shifted["precision"] < 0.8 and shifted["log_density"] < true["log_density"] - 3
    assert shifted["sw2"] > 1.5 * true["sw2"]
    # every sample at the centre of mode 0 of its class: coverage 1/M, TV = 1 - w_0 (by hand)
    centres = mix.means[labels, 0]
    one = evaluate(mix, centres, labels, generator=g, recall_samples=300)
    assert one["coverage"] == pytest.approx(1 / 3)
    assert one["precision"] == 1.0
    assert one["mode_tv"] == pytest.approx(float(1 - mix.weights[:, 0].mean()), abs=1e-12)  # mean over classes


def _per_component_draws(mix: GaussianMixture, n: int, seed: int = 0):
    """Labels, the component of each draw, its eigenvalues / eigenvectors / mean, and standard normals
    ``[n, D]``: true samples are ``mu + vecs @ (sqrt(lam) * eps)``, per-axis edits scale ``eps``."""
    g = torch.Generator().manual_seed(seed)
    labels = mix.sample_labels(n, g)
    comp = torch.randint(0, mix.modes_per_class, (n,), generator=g)
    lam, vecs, mu = mix.eigvals[labels, comp], mix.eigvecs[labels, comp], mix.means[labels, comp]
    eps = torch.randn(n, mix.dim, generator=g, dtype=torch.float64)
    return labels, lam, vecs, mu, eps


def test_mode_shape_is_one_on_true_samples_and_sees_each_axis_scaled():
    """Samples built per component along its eigen-axes: scaling the narrowest axis by 2 and the widest by 0.5
    shows as 4 and 0.25 at the two ends of the ranked profile, the rest at 1."""
    mix = GaussianMixture.random(dim=6, classes=2, modes_per_class=2, seed=0, spread=2.0)
    labels, lam, vecs, mu, eps = _per_component_draws(mix, 20000)

    def draw(scale_narrow: float, scale_wide: float) -> torch.Tensor:
        s = torch.ones_like(lam)
        s.scatter_(1, lam.argmin(1, keepdim=True), scale_narrow)
        s.scatter_(1, lam.argmax(1, keepdim=True), scale_wide)
        return mu + torch.einsum("nde,ne->nd", vecs, lam.sqrt() * s * eps)

    true = mode_shape(mix, draw(1.0, 1.0), labels, inside_only=False)
    assert torch.allclose(true, torch.ones(6, dtype=torch.float64), atol=0.05)
    bent = mode_shape(mix, draw(2.0, 0.5), labels, inside_only=False)
    assert bent[0] == pytest.approx(4.0, rel=0.06) and bent[-1] == pytest.approx(0.25, rel=0.06)
    assert torch.allclose(bent[1:-1], torch.ones(4, dtype=torch.float64), atol=0.05)
    assert (mode_shape(mix, draw(1.0, 1.0), labels) < 1.0).all()  # inside the ellipsoid: the tails cut off


def test_sliced_w2_of_a_translation():
    """SW2(x, x + v) over uniform directions in D dims = |v| / sqrt(D) (E[(v.theta)^2] = |v|^2 / D)."""
    x = torch.randn(500, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    v = torch.tensor([1.0, -2.0, 0.5, 0, 0, 0, 1.0, 0], dtype=torch.float64)
    assert sliced_w2(x, x + v, projections=4000) == pytest.approx(float(v.norm()) / math.sqrt(8), rel=0.05)


def test_short_distillation_improves_over_its_start(one_thread):
    """SiD through the real method and Trainer moves a 1-step student off the posterior mean.

    At t = 1 the teacher's x0 prediction is the class mean whatever the noise, so the
    teacher-initialised 1-step student starts collapsed near it; 150 iterations must cut the
    sliced W2 to the true mixture by a fifth and raise the true log-density.  A wrong-signed
    score difference, or a trainer that never steps G, fails this (measured: 0.21 -> 0.14,
    log-density -32 -> -23).
    """
    from senseflow.toy.gmm.run import EvalSet, RunSpec, distil
    from senseflow.toy.gmm.teacher import fit_mlp_teacher

    mix = GaussianMixture.random(dim=8, classes=2, modes_per_class=3, seed=3)
    mlp = fit_mlp_teacher(mix, width=32, depth=2, steps=200, batch_size=256, lr=3e-3, progress=False)
    ev = EvalSet.make(mix, GMMAdapter(mix), n=1000)
    spec = RunSpec(method="sid", steps=1, iterations=150, batch_size=128, lr_g=3e-4, lr_fake=3e-4, teacher="exact")
    res = distil(mix, mlp, spec, ev, eval_every=150)
    start, end = res["history"][0], res["final"]
    assert end["sw2"] < 0.8 * start["sw2"], (start, end)
    assert end["log_density"] > start["log_density"] + 5, (start, end)


def test_cli_refuses_bad_input_before_writing(tmp_path, capsys):
    from senseflow.cli import main

    out = tmp_path / "gmm"
    assert main(["toy", "gmm", "--methods", "dmd2,gan", "--out", str(out)]) == 2
    assert "--methods: unknown 'gan'" in capsys.readouterr().err
    assert main(["toy", "gmm", "--methods", "dmd2", "--set", "ttur=0", "--out", str(out)]) == 2
    assert "ttur" in capsys.readouterr().err
    assert main(["toy", "gmm", "--methods", "dmd2", "--set", "tturx=3", "--out", str(out)]) == 2
    assert "no such setting" in capsys.readouterr().err
    assert not out.exists()


def test_first_input_time_queries_the_backbone_at_an_earlier_time():
    """``first_input_time``: at the pure-noise anchor G returns E[x0 | x = t_in eps, t_in] (SiD's
    ``G(sigma_init z, sigma_init)``), not the class mean E[x0 | x_1] that a t = 1 copy returns for every noise."""
    from senseflow.generator import FewStepGenerator

    mix = GaussianMixture.random(dim=4, classes=2, modes_per_class=3, seed=4)
    adapter = GMMAdapter(mix)
    cond = adapter.encode_prompts(["class 0", "class 1", "class 1"])
    labels = torch.tensor([0, 1, 1])
    eps = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    one = torch.ones(3, dtype=torch.float64)
    plain = FewStepGenerator(Denoiser(ExactVelocity(mix), adapter), [1.0])
    class_mean = (mix.weights[..., None] * mix.means).sum(1)[labels]
    torch.testing.assert_close(plain(eps, one, cond).double(), class_mean, rtol=1e-6, atol=1e-6)
    early = FewStepGenerator(Denoiser(ExactVelocity(mix), adapter), [1.0], first_input_time=0.5)
    expected = mix.posterior_mean(0.5 * eps, 0.5, labels)
    torch.testing.assert_close(early(eps, one, cond).double(), expected, rtol=1e-6, atol=1e-6)
    assert (expected - class_mean).norm(dim=1).min() > 0.05  # the noise now matters
    # later anchors are untouched
    half = torch.full((3,), 0.5, dtype=torch.float64)
    two = FewStepGenerator(Denoiser(ExactVelocity(mix), adapter), [1.0, 0.5], first_input_time=0.7)
    torch.testing.assert_close(two(eps, half, cond).double(), mix.posterior_mean(eps, 0.5, labels),
                               rtol=1e-6, atol=1e-6)


def test_fit_time_laws_put_the_expected_mass_below_0_1():
    """P(t < 0.1): logit-normal(0, 1) = Phi(logit 0.1) = Phi(-2.197) = 0.0140; uniform 0.1; mixed their mean."""
    from senseflow.toy.gmm.teacher import fit_times

    n = 200_000
    share = {law: float((fit_times(n, law, torch.Generator().manual_seed(0)) < 0.1).double().mean())
             for law in ("logit_normal", "uniform", "mixed")}
    assert share["logit_normal"] == pytest.approx(0.0140, abs=0.0015)
    assert share["uniform"] == pytest.approx(0.1, abs=0.003)
    assert share["mixed"] == pytest.approx(0.057, abs=0.003)
    with pytest.raises(SenseflowError, match="time law"):
        fit_times(4, "cosine", torch.Generator())


def test_gan_head_reads_the_mlp_hidden_vectors():
    """DMD2's GAN head on the toy MLP: [B, width] features of the middle block -> one logit per sample,
    and its gradient reaches the fake score's trunk (the classifier loss trains it, as released)."""
    from senseflow.discriminators.dmd2_head import GANHeadConfig, as_map, attach_gan_head
    from senseflow.toy.gmm.teacher import VelocityMLP

    mix = GaussianMixture.random(dim=4, classes=2, modes_per_class=2, seed=0)
    adapter = GMMAdapter(mix)
    fake = Denoiser(VelocityMLP(4, 2, width=16, depth=3), adapter)
    head = attach_gan_head(fake, GANHeadConfig(enabled=True))
    assert head.tap.name == "blocks.1" and head.tap.channels == 16 and head.tap.size == (1, 1)
    cond = adapter.encode_prompts(["class 0", "class 1", "class 0"])
    logits = head.logits(fake, torch.randn(3, 4), torch.full((3,), 0.5, dtype=torch.float64), cond)
    assert logits.shape == (3,)
    logits.sum().backward()
    assert fake.backbone.blocks[0][1].weight.grad.abs().sum() > 0
    assert as_map(torch.ones(2, 5), (1, 1)).shape == (2, 5, 1, 1)
    with pytest.raises(SenseflowError, match="feature_size must be"):
        as_map(torch.ones(2, 5), (2, 2))


def test_cli_refuses_bad_generator_input_time(tmp_path, capsys):
    from senseflow.cli import main

    out = tmp_path / "gmm"
    for bad in ("0", "1"):   # 1 is the anchor itself (generator.first_input_time < the first anchor): omit the flag
        assert main(["toy", "gmm", "--one-step-input-time", bad, "--out", str(out)]) == 2
        assert "--one-step-input-time must be in (0, 1)" in capsys.readouterr().err
    assert not out.exists()


def test_cli_input_times_reach_the_students_by_step_count(tmp_path, capsys, monkeypatch):
    """--one-step-input-time goes to 1-step students only, --multi-step-input-time to the others; bad values are
    refused before anything is written."""
    from senseflow.cli import main
    from senseflow.toy.gmm import bench

    out = tmp_path / "gmm"
    assert main(["toy", "gmm", "--multi-step-input-time", "1.5", "--out", str(out)]) == 2
    assert "--multi-step-input-time must be in (0, 1)" in capsys.readouterr().err
    assert not out.exists()
    seen: dict[int, float | None] = {}

    class Recorded(BaseException):
        """Stops the run once the spec is recorded (not an Exception: the CLI must not turn it into an exit code)."""

    def fake_distil(mixture, mlp, spec, ev, eval_every=250, pairs_cache=None):
        seen[spec.steps] = spec.generator_input_time
        raise Recorded

    monkeypatch.setattr(bench, "distil", fake_distil)
    monkeypatch.setattr(bench, "TEACHER_STEPS", (1,))
    for steps in ("1", "4"):
        with pytest.raises(Recorded):
            main(["toy", "gmm", "--dim", "2", "--classes", "2", "--modes", "2", "--teacher-width", "8",
                  "--teacher-train-steps", "5", "--eval-samples", "40", "--methods", "dmd2", "--steps", steps,
                  "--one-step-input-time", "0.3", "--multi-step-input-time", "0.85", "--out", str(out)])
    assert seen == {1: 0.3, 4: 0.85}


def test_cli_one_step_regression_reaches_only_1_step_dmd_students(tmp_path, capsys, monkeypatch):
    """--one-step-regression W: the weight and a pairs cache in --out go to 1-step students, 0 to the others; a
    negative weight, no 1-step student or SiD is refused before anything is written."""
    from senseflow.cli import main
    from senseflow.toy.gmm import bench

    out = tmp_path / "gmm"
    for extra, message in ((["--one-step-regression", "-1"], "finite weight >= 0"),
                           (["--one-step-regression", "nan"], "finite weight >= 0"),
                           (["--one-step-regression", "4", "--steps", "4"], "add 1 to --steps"),
                           (["--one-step-regression", "4", "--methods", "dmd2,sid", "--steps", "1"], "drop sid")):
        assert main(["toy", "gmm", *extra, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()
    seen: dict[int, tuple[float, object]] = {}

    class Recorded(BaseException):
        """Stops the run once the spec is recorded."""

    def fake_distil(mixture, mlp, spec, ev, eval_every=250, pairs_cache=None):
        seen[spec.steps] = (spec.regression_weight, pairs_cache)
        if len(seen) == 2:
            raise Recorded
        return {"spec": spec.__dict__, "history": [], "final": {}, "generator": None}

    monkeypatch.setattr(bench, "distil", fake_distil)
    monkeypatch.setattr(bench, "sample_generator", lambda gen, ev: torch.zeros(len(ev.labels), 2))
    monkeypatch.setattr(bench, "TEACHER_STEPS", (1,))
    with pytest.raises(Recorded):
        main(["toy", "gmm", "--dim", "2", "--classes", "2", "--modes", "2", "--teacher-width", "8",
              "--teacher-train-steps", "5", "--eval-samples", "40", "--methods", "dmd2", "--steps", "1,4",
              "--one-step-regression", "4", "--out", str(out)])
    assert seen[1][0] == 4.0 and seen[4][0] == 0.0
    assert seen[1][1].parent == out and seen[1][1].suffix == ".safetensors"


def test_euler_simulated_probe_steps_deterministically_between_anchors():
    """RunSpec(sampler="euler"): backward simulation takes Euler steps (no fresh noise: any rng state gives the
    same state at anchor k, equal to the hand-written chain) and the EMA copy keeps the probe's class."""
    from senseflow.rng import RandomStreams
    from senseflow.toy.gmm.run import EMA, EulerSimulated, RunSpec, build_models
    from senseflow.toy.gmm.teacher import VelocityMLP

    mix = GaussianMixture.random(dim=4, classes=2, modes_per_class=2, seed=0)
    gen = build_models(mix, VelocityMLP(4, 2, width=16, depth=1), RunSpec(method="dmd2", steps=4,
                                                                          sampler="euler")).generator
    assert isinstance(gen, EulerSimulated) and isinstance(EMA(gen, 0.9).generator, EulerSimulated)
    cond = GMMAdapter(mix).encode_prompts(["class 0", "class 1"])
    noise = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    a = gen.simulate(noise, cond, 3, RandomStreams(0))
    b = gen.simulate(noise, cond, 3, RandomStreams(1))
    torch.testing.assert_close(a, b)
    x = noise
    with torch.no_grad():
        for i in range(3):
            t, t_next = gen.time(i, 2, "cpu"), gen.time(i + 1, 2, "cpu")
            x = gen.step(x, gen(x, t, cond), t, t_next)
    torch.testing.assert_close(a, x)
    with pytest.raises(SenseflowError, match="sampler must be"):
        build_models(mix, VelocityMLP(4, 2, width=16, depth=1), RunSpec(method="dmd2", steps=4, sampler="ddim"))


def test_trained_anchors_probe_draws_only_the_listed_anchors():
    """RunSpec(trained_anchors=(3,)): every training input sits at the last anchor; the default draws all four;
    an index outside the anchors is refused when the models are built."""
    from senseflow.rng import RandomStreams
    from senseflow.toy.gmm.run import RunSpec, build_models
    from senseflow.toy.gmm.teacher import VelocityMLP

    mix = GaussianMixture.random(dim=4, classes=2, modes_per_class=2, seed=0)
    mlp = VelocityMLP(4, 2, width=16, depth=1)
    cond = GMMAdapter(mix).encode_prompts(["class 0", "class 1"])
    drawn = {}
    for anchors in (None, (3,)):
        gen = build_models(mix, mlp, RunSpec(method="dmd2", steps=4, trained_anchors=anchors)).generator
        rng = RandomStreams(0)
        drawn[anchors] = {gen.training_input(cond, (2, 4), rng).index for _ in range(40)}
    assert drawn[None] == {0, 1, 2, 3} and drawn[(3,)] == {3}
    with pytest.raises(SenseflowError, match="trained_anchors"):
        build_models(mix, mlp, RunSpec(method="dmd2", steps=4, trained_anchors=(4,)))


def test_fake_per_anchor_probe_routes_each_anchor_to_its_own_copy():
    """RunSpec(fake_per_anchor=True): K equal copies of the fake score; the copy in use is the one of the last
    training input's anchor, and a loss through it moves that copy's weights only.  IDA (a blend of ONE fake
    score with G) is refused with it."""
    from senseflow.rng import RandomStreams
    from senseflow.toy.gmm.run import AnchorFakeScores, RunSpec, build_models
    from senseflow.toy.gmm.teacher import VelocityMLP

    mix = GaussianMixture.random(dim=4, classes=2, modes_per_class=2, seed=0)
    mlp = VelocityMLP(4, 2, width=16, depth=1)
    models = build_models(mix, mlp, RunSpec(method="dmd2", steps=4, fake_per_anchor=True))
    fake = models.fake_score.backbone
    assert isinstance(fake, AnchorFakeScores) and len(fake.copies) == 4
    for c in fake.copies:
        torch.testing.assert_close(dict(c.named_parameters()), dict(mlp.named_parameters()))
    cond = GMMAdapter(mix).encode_prompts(["class 0", "class 1"])
    rng = RandomStreams(0)
    seen = set()
    for _ in range(30):
        gin = models.generator.training_input(cond, (2, 4), rng)
        assert fake.current == gin.index
        if gin.index in seen:
            continue
        seen.add(gin.index)
        fake.zero_grad(set_to_none=True)
        models.fake_score(gin.x_t, gin.t, cond).square().sum().backward()
        for i, c in enumerate(fake.copies):
            has_grad = any(p.grad is not None for p in c.parameters())
            assert has_grad == (i == gin.index)
    assert seen == {0, 1, 2, 3}
    with pytest.raises(SenseflowError, match="fake_per_anchor"):
        build_models(mix, mlp, RunSpec(method="senseflow", steps=4, fake_per_anchor=True))


def test_outlier_profile_separates_displaced_modes_from_wide_ones_and_trails():
    """True samples: ~1% outside, nothing far, centre offsets at sampling noise, narrow axes at 1.  Every mode
    moved by half a std along its narrowest axis reads narrow_offset2 ~ 0.25 (q = 1 of 4 axes) with the
    variance still 1; samples put on the segments between two modes of a class are far and all trails."""
    from senseflow.toy.gmm.metrics import outlier_profile

    mix = GaussianMixture.random(dim=4, classes=2, modes_per_class=2, seed=0, spread=3.0)
    n = 20000
    labels, lam, vecs, mu, eps = _per_component_draws(mix, n)
    x = mu + torch.einsum("nde,ne->nd", vecs, lam.sqrt() * eps)
    true = outlier_profile(mix, x, labels)
    assert true["outside"] == pytest.approx(0.01, abs=0.004) and true["far"] < 0.001
    assert true["centre_offset"] < 0.02 and true["narrow_offset2"] < 0.01
    assert true["narrow_var"] == pytest.approx(1.0, abs=0.05)
    narrow = lam.argmin(1)
    shift = 0.5 * vecs[torch.arange(n), :, narrow] * lam[torch.arange(n), narrow].sqrt()[:, None]
    moved = outlier_profile(mix, x + shift, labels)
    assert moved["narrow_offset2"] == pytest.approx(0.25, abs=0.03)
    assert moved["narrow_var"] == pytest.approx(1.0, abs=0.05)
    assert moved["centre_offset"] > 5 * true["centre_offset"]
    between = 0.5 * (mix.means[labels, 0] + mix.means[labels, 1])
    stranded = outlier_profile(mix, between, labels)
    assert stranded["far"] == 1.0 and stranded["trail"] == 1.0


def test_cosine_lr_probe_decays_from_the_start_lr_to_zero_and_refuses_other_schedules():
    from senseflow.toy.gmm.run import EvalSet, RunSpec, cosine_scale, distil
    from senseflow.toy.gmm.teacher import VelocityMLP

    assert cosine_scale(0, 100) == 1.0 and cosine_scale(50, 100) == pytest.approx(0.5)
    assert cosine_scale(100, 100) == pytest.approx(0.0, abs=1e-12) and cosine_scale(150, 100) == pytest.approx(0.0)
    mix = GaussianMixture.random(dim=4, classes=2, modes_per_class=2, seed=0)
    ev = EvalSet.make(mix, GMMAdapter(mix), n=40)
    with pytest.raises(SenseflowError, match="lr_schedule"):
        distil(mix, VelocityMLP(4, 2, width=16, depth=1), RunSpec(method="dmd2", steps=1, iterations=1,
                                                                  lr_schedule="step"), ev)
