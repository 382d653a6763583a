"""Distil a Gaussian-mixture teacher with the project's real methods and :class:`~senseflow.train.trainer.Trainer`.

One :class:`RunSpec` = one training run (method, steps, settings); :func:`distil` builds the
networks through the teacher contract (:class:`~.teacher.GMMAdapter`), the method through
:func:`senseflow.methods.build_method` and trains with the ordinary Trainer, evaluating the
student against the true mixture every ``eval_every`` iterations.  An exponential moving average
of the generator weights is kept alongside (evaluated separately) so its effect can be measured
without touching the trainer.
"""

from __future__ import annotations

import copy
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from ...config import GeneratorConfig, OptimizerConfig, TrainConfig
from ...generator import FewStepGenerator
from ...methods import DMD2Config, DistillationModels, SenseFlowConfig, SiDConfig, build_method
from ...methods.base import Batch
from ...rng import RandomStreams, derive_seed
from ...sampling import sample_ode
from ...schedules import anchors as unit_to_native
from ...teachers.base import Conditioning, Denoiser, SenseflowError, freeze
from ...train.trainer import Trainer, TrainerHooks
from .metrics import evaluate, outlier_profile
from .mixture import GaussianMixture
from .teacher import ExactVelocity, GMMAdapter, VelocityMLP, class_prompt

#: no CFG anywhere (the benchmark's setting: the mixture's conditional is the target itself)
NO_CFG: dict[str, dict[str, Any]] = {
    "dmd2": {"real_guidance": {"cfg": None}},
    "senseflow": {"real_guidance": {"cfg": None}, "isg_guidance": {"cfg": None}},
    "sid": {"teacher_guidance": {"cfg": None}, "fake_guidance": {"cfg": None}, "fake_train_guidance": {"cfg": None}},
}
CONFIGS = {"dmd2": DMD2Config, "senseflow": SenseFlowConfig, "sid": SiDConfig}
#: the toy recipes' optimiser settings (src/senseflow/recipes/toy/*.yaml): lr 1e-4, SiD with beta1 = 0
BETAS = {"dmd2": (0.9, 0.999), "senseflow": (0.9, 0.999), "sid": (0.0, 0.999)}


def unit_anchors(steps: int) -> list[float]:
    """``K`` equally spaced unit anchors ``1, 1 - 1/K, ...`` (the toy recipes' ``[1, .75, .5, .25]`` at K = 4)."""
    return [1.0 - i / steps for i in range(steps)]


@dataclass
class RunSpec:
    """One distillation run.  ``method_overrides`` are fields of the method's config (e.g. ``{"ttur": 10}``)."""

    method: str = "senseflow"
    steps: int = 4
    iterations: int = 2000
    batch_size: int = 256
    lr_g: float = 1e-4
    lr_fake: float = 1e-4
    seed: int = 0
    teacher: str = "mlp"  # "mlp": the network teacher; "exact": the analytic posterior (G, fake: copies of the MLP)
    method_overrides: dict[str, Any] = field(default_factory=dict)
    real_data: bool = False  # batches carry true samples (forward diffusion / discriminators)
    ema_decay: float | None = None
    grad_clip: float | None = 1.0
    generator_input_time: float | None = None  # generator.first_input_time (SiD's sigma_init); < the first anchor
    regression_weight: float = 0.0  # DMD (v1)'s regression on teacher ODE pairs (toy/gmm/regression.py); K > 1
    # steps: on the first anchor's (pure-noise) prediction
    regression_pairs: int = 65536
    sampler: str = "stochastic"  # "euler": a probe, not the released form (EulerSimulated)
    anchors: tuple[float, ...] | None = None  # unit anchors; None = unit_anchors(steps) ([1, .75, .5, .25] at 4)
    # a probe, not the released form: the anchor indices G's training inputs are drawn from (None = all; (K-1,) =
    # the last only, so the fake score models the final samples rather than a mixture of every anchor's outputs)
    trained_anchors: tuple[int, ...] | None = None
    # a probe, not the released form: one fake score per anchor, each trained on (and scoring) only the x0 outputs
    # of its own anchor -- the released trainers share one fake score across the anchors (AnchorFakeScores)
    fake_per_anchor: bool = False
    # "cosine": every optimiser's lr follows a half cosine from its value to 0 over the run (the backbone's own fit
    # does; the toy recipes keep it constant); "constant": as the recipes
    lr_schedule: str = "constant"
    label: str = ""

    def method_config(self):
        if self.method not in CONFIGS:
            raise SenseflowError(f"gmm: unknown method {self.method!r} (choose from {', '.join(CONFIGS)})")
        data = {**NO_CFG[self.method], **self.method_overrides}
        return CONFIGS[self.method](**data)


class MixtureBatches:
    """Class-prompt batches (and true samples when ``real``): the Trainer's BatchSource."""

    def __init__(self, mixture: GaussianMixture, adapter: GMMAdapter, batch_size: int, seed: int,
                 real: bool = False) -> None:
        self.mixture, self.adapter, self.batch_size, self.real = mixture, adapter, batch_size, real
        self.g = torch.Generator().manual_seed(derive_seed(seed, "gmm-data"))

    def next_batch(self) -> Batch:
        labels = self.mixture.sample_labels(self.batch_size, self.g)
        prompts = [class_prompt(int(c)) for c in labels]
        latents = self.mixture.sample(labels, self.g).float() if self.real else None
        return Batch(prompts, self.adapter.encode_prompts(prompts), latents)

    def state_dict(self) -> dict[str, Tensor]:
        return {"rng": self.g.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.g.set_state(state["rng"])


@dataclass
class EvalSet:
    """Fixed labels, noise and true reference samples: every evaluation of a run sees the same draws."""

    labels: Tensor
    cond: Conditioning
    noise: Tensor
    reference: Tensor
    seed: int

    @classmethod
    def make(cls, mixture: GaussianMixture, adapter: GMMAdapter, n: int = 4000, seed: int = 1234) -> "EvalSet":
        g = torch.Generator().manual_seed(seed)
        labels = mixture.sample_labels(n, g)
        noise = torch.randn(n, mixture.dim, generator=g)
        reference = mixture.sample(labels, g)
        cond = adapter.encode_prompts([class_prompt(int(c)) for c in labels])
        return cls(labels, cond, noise, reference, seed)

    def score(self, mixture: GaussianMixture, samples: Tensor) -> dict[str, float]:
        return evaluate(mixture, samples, self.labels, self.reference)


def generator_config(spec: RunSpec) -> GeneratorConfig:
    """The run's ``generator.*`` section: the library's anchors and ``first_input_time`` (validated as a run config
    is; the mixture's schedule is unshifted, so unit time is native time)."""
    try:
        anchors = unit_anchors(spec.steps) if spec.anchors is None else list(spec.anchors)
        if len(anchors) != spec.steps:
            raise SenseflowError(f"gmm: {len(anchors)} anchors for a {spec.steps}-step student")
        return GeneratorConfig(anchors=anchors, first_input_time=spec.generator_input_time)
    except ValidationError as err:
        raise SenseflowError(f"gmm: {err.errors()[0]['msg']}") from None


def build_models(mixture: GaussianMixture, mlp: VelocityMLP, spec: RunSpec) -> DistillationModels:
    """Teacher, generator and fake score through the teacher contract (as ``build.build_models`` does)."""
    if spec.teacher == "exact":
        adapter, teacher_backbone = GMMAdapter(mixture, student_init=mlp), ExactVelocity(mixture)
    elif spec.teacher == "mlp":
        adapter, teacher_backbone = GMMAdapter(mixture), copy.deepcopy(mlp)
    else:
        raise SenseflowError(f"gmm: teacher must be 'mlp' or 'exact', got {spec.teacher!r}")
    teacher = Denoiser(freeze(teacher_backbone), adapter)
    student = adapter.make_student(teacher_backbone).requires_grad_(True).train()
    gen_cfg = generator_config(spec)
    t_in = gen_cfg.first_input_time
    if spec.sampler not in ("stochastic", "euler"):
        raise SenseflowError(f"gmm: sampler must be 'stochastic' or 'euler', got {spec.sampler!r}")
    kind = EulerSimulated if spec.sampler == "euler" else FewStepGenerator
    generator = kind(Denoiser(student, adapter), unit_to_native(adapter.schedule, gen_cfg.anchors),
                     first_input_time=None if t_in is None else float(unit_to_native(adapter.schedule, [t_in])[0]))
    if spec.trained_anchors is not None:
        if not spec.trained_anchors or any(not 0 <= k < spec.steps for k in spec.trained_anchors):
            raise SenseflowError(f"gmm: trained_anchors must be indices in 0..{spec.steps - 1}, got "
                                 f"{spec.trained_anchors}")
        generator.trained_anchors = tuple(spec.trained_anchors)
    fake_backbone = adapter.make_fake_score(teacher_backbone)
    if spec.fake_per_anchor:
        if spec.sampler != "stochastic" or spec.method == "sid" or getattr(spec.method_config(), "ida", False):
            raise SenseflowError("gmm: fake_per_anchor probes DMD2 (or SenseFlow with ida=False), stochastic sampler")
        fake_backbone = AnchorFakeScores(fake_backbone, spec.steps)
        generator.anchor_listener = fake_backbone.select
    fake = Denoiser(fake_backbone.requires_grad_(True).train(), adapter)
    return DistillationModels(teacher=teacher, generator=generator, fake_score=fake)


class AnchorFakeScores(nn.Module):
    """A probe, not the released form: ``K`` copies of the fake score, the one in use chosen by the anchor of the
    batch's generator input (drawn once per batch).  The released trainers train ONE fake score on the x0 outputs
    of every anchor, so it models their mixture, and the DMD gradient of each anchor's outputs sees the others'."""

    def __init__(self, backbone: nn.Module, steps: int) -> None:
        super().__init__()
        self.copies = nn.ModuleList(copy.deepcopy(backbone) for _ in range(steps))
        self.current = 0

    def select(self, index: int) -> None:
        self.current = index

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.copies[self.current](*args, **kwargs)


class EulerSimulated(FewStepGenerator):
    """A probe of the sampler, not the released form: backward simulation -- and this runner's evaluation -- step
    between anchors by deterministic Euler steps instead of re-noising each prediction with fresh noise (the
    released DMD2 / SenseFlow trainers, ``FewStepGenerator.simulation_sampler``)."""

    simulation_sampler = "euler"


@torch.no_grad()
def sample_generator(generator: FewStepGenerator, ev: EvalSet, num_steps: int | None = None) -> Tensor:
    """The student's samples on the fixed evaluation draws; ``num_steps`` < K: the x0 prediction at anchor
    ``num_steps - 1`` of the same chain (the sampler's noise is drawn in the same order)."""
    was = generator.training
    generator.eval()
    g = torch.Generator().manual_seed(derive_seed(ev.seed, "gmm-sampler"))
    x = generator.sample(ev.noise, ev.cond, sampler=generator.simulation_sampler, generator=g, num_steps=num_steps)
    generator.train(was)
    return x


def anchor_outputs(mixture: GaussianMixture, generator: FewStepGenerator, ev: EvalSet) -> list[dict[str, float]]:
    """Each anchor's x0 prediction along the evaluation chain, scored and profiled (``metrics.outlier_profile``):
    where in the K steps samples get stranded between modes or displaced.  Backward simulation trains every one
    of them as a sample of the data (the DMD loss scores the x0 output of a random anchor)."""
    rows = []
    for k in range(1, generator.num_steps + 1):
        x = sample_generator(generator, ev, num_steps=k)
        rows.append({"anchor": k - 1, **ev.score(mixture, x), **outlier_profile(mixture, x, ev.labels)})
    return rows


@torch.no_grad()
def teacher_samples(mixture: GaussianMixture, backbone: nn.Module, steps: int, ev: EvalSet,
                    guidance=None) -> Tensor:
    """Euler sampling of a teacher backbone with ``steps`` uniform steps."""
    return sample_ode(Denoiser(backbone, GMMAdapter(mixture)), ev.noise, ev.cond, steps, guidance)


class EMA:
    """Exponential moving average of the generator's backbone weights (evaluation only)."""

    def __init__(self, generator: FewStepGenerator, decay: float) -> None:
        self.decay = decay
        self.source = generator.denoiser.backbone
        self.shadow = copy.deepcopy(self.source).requires_grad_(False)
        self.generator = type(generator)(Denoiser(self.shadow, generator.denoiser.adapter), generator.anchors,
                                         first_input_time=generator.first_input_time)

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow.parameters(), self.source.parameters()):
            s.lerp_(p, 1.0 - self.decay)


def cosine_scale(step: int, total: int) -> float:
    """Half-cosine lr factor after ``step`` of ``total`` steps: 1 at the start, 0 after the last."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def distil(mixture: GaussianMixture, mlp: VelocityMLP, spec: RunSpec, ev: EvalSet, eval_every: int = 250,
           progress: bool = False, run_dir: Path | None = None, pairs_cache: Path | None = None) -> dict[str, Any]:
    """Train one student; returns ``{"spec", "history": [{"iteration", metrics...}], "final", "final_ema"}``.

    ``pairs_cache``: where the teacher ODE pairs of ``spec.regression_weight`` are cached (safetensors)."""
    if spec.lr_schedule not in ("constant", "cosine"):
        raise SenseflowError(f"gmm: lr_schedule must be 'constant' or 'cosine', got {spec.lr_schedule!r}")
    torch.manual_seed(spec.seed)
    models = build_models(mixture, mlp, spec)
    method = build_method(models, spec.method_config(), images_per_iteration=spec.batch_size)
    if spec.regression_weight > 0:
        from .regression import install, load_or_make_pairs

        pairs = load_or_make_pairs(mixture, models.teacher.backbone, spec.regression_pairs, 32, pairs_cache)
        install(method, pairs, spec.regression_weight, spec.batch_size, derive_seed(spec.seed, "gmm-regression"),
                first_anchor=spec.steps > 1)
    adapter = models.teacher.adapter
    data = MixtureBatches(mixture, adapter, spec.batch_size, spec.seed, real=spec.real_data)
    train = TrainConfig(steps=spec.iterations, batch_size=spec.batch_size, grad_clip=spec.grad_clip, seed=spec.seed,
                        device="cpu", log_every=max(1, min(50, spec.iterations)), progress=progress,
                        tensorboard=False)
    betas = BETAS[spec.method]
    optim = {"generator": OptimizerConfig(lr=spec.lr_g, betas=betas),
             "fake_score": OptimizerConfig(lr=spec.lr_fake, betas=betas),
             "discriminator": OptimizerConfig(lr=spec.lr_fake, betas=betas)}
    ema = EMA(models.generator, spec.ema_decay) if spec.ema_decay else None
    history: list[dict[str, float]] = [{"iteration": 0, **ev.score(mixture, sample_generator(models.generator, ev))}]
    ema_history: list[dict[str, float]] = []

    def on_step(trainer: Trainer, step: int) -> None:
        if spec.lr_schedule == "cosine":  # the lr of the NEXT step
            for opt in trainer.optimizers.values():
                for group in opt.param_groups:
                    group["lr"] = group.setdefault("initial_lr", group["lr"]) * cosine_scale(step, spec.iterations)
        if ema is not None:
            ema.update()
        if step % eval_every == 0 or step == spec.iterations:
            row = {"iteration": step, **ev.score(mixture, sample_generator(models.generator, ev))}
            row.update({k: v for k, v in trainer.last_logs.items() if k.startswith("loss_")})
            history.append(row)
            if ema is not None:
                ema_history.append({"iteration": step, **ev.score(mixture, sample_generator(ema.generator, ev))})

    with tempfile.TemporaryDirectory(prefix="gmm_run_") as tmp:
        # samples=None: Trainer.sample_grid decodes latents to images, which a (D,) latent is not
        # (issue #13 item 4, fixed on another branch); the benchmark scores samples itself instead.
        trainer = Trainer(method, data, train, optim, Path(run_dir or tmp), RandomStreams(spec.seed),
                          torch.device("cpu"), samples=None, hooks=TrainerHooks(on_step=[on_step]))
        trainer.fit()
    out: dict[str, Any] = {"spec": spec.__dict__, "history": history, "final": history[-1],
                           "final_anchors": anchor_outputs(mixture, models.generator, ev)}
    if ema is not None:
        out["ema_history"] = ema_history
        out["final_ema"] = ema_history[-1]
        out["final_ema_anchors"] = anchor_outputs(mixture, ema.generator, ev)
    out["generator"] = models.generator
    return out
