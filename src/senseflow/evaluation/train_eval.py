"""Evaluation during training (``train.eval``): a cheap metric set every N iterations, and the best student kept.

Why: the loss of a distillation run says little about image quality, and SenseFlow / DMD2 pick
their checkpoints by FID-like numbers.  Every ``every`` iterations the hook samples the current
generator on ``num_prompts`` fixed (prompt, seed) pairs -- the same pairs and the same per-image
noise each time, so the curve moves only because the student does -- scores them with the chosen
metrics (the toy evaluator for the toy world; e.g. ``fd_dinov2``, ``clip_score``, ``pickscore`` for real
teachers) and logs ``eval/<name>`` to TensorBoard and ``metrics.jsonl``.  With ``best_metric`` set,
the student with the best value so far is written to ``<output>/best/`` (``student.safetensors``,
``student.json`` -- loadable by ``senseflow generate`` / ``evaluate`` -- and ``best.json``).

It is a :class:`~senseflow.train.trainer.TrainerHooks` ``on_step`` hook: the trainer is unchanged.
Under ``torchrun`` every rank samples (sharded generators need all ranks in each forward) and the
main process scores.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from ..configbase import StrictModel


class TrainEvalConfig(StrictModel):
    """``train.eval``: periodic evaluation of the student during training."""

    every: int = Field(0, ge=0, description="evaluate every N iterations and at the end (0 = off)")
    prompts: str | None = Field(None, description="prompt file or builtin:toy-world[-open] (default: paths.eval_prompts, "
                                                  "else the training prompts)")
    num_prompts: int = Field(16, ge=1, description="first M prompts")
    per_prompt: int = Field(1, ge=1, description="images (seeds) per prompt")
    seed: int = Field(0, description="base seed of the (prompt, seed) pairs")
    metrics: list[str] = Field(default_factory=lambda: ["toy"],
                               description="metric names (toy world: toy; real teachers e.g. fd_dinov2, clip_score, "
                                           "pickscore -- docs/evaluation.md)")
    weights: dict[str, str] = Field(default_factory=dict, description="metric name -> local weights folder/file")
    options: dict[str, dict[str, Any]] = Field(default_factory=dict, description="metric name -> options")
    teacher_reference: bool = Field(False, description="sample the teacher once on the same pairs, for metrics that "
                                                       "compare with it (fid_t, the toy fd_teacher)")
    teacher_steps: int = Field(32, ge=1, description="Euler steps of the teacher reference")
    teacher_cfg: float = Field(3.0, description="guidance of the teacher reference")
    best_metric: str | None = Field(None, description="keep <output>/best/ by this number, e.g. attr_acc or fd_dinov2")
    best_mode: Literal["max", "min"] = Field("max", description="max: higher is better; min: lower (FID-like)")
    batch_size: int = Field(16, ge=1, description="images per sampling forward")

    @model_validator(mode="after")
    def _check(self) -> "TrainEvalConfig":
        if not self.metrics:
            raise ValueError("train.eval.metrics is empty: name at least one metric (toy for the toy world)")
        return self


class TrainEvaluator:
    """The ``train.eval`` hook (see module docstring)."""

    def __init__(self, cfg: TrainEvalConfig, config, is_main: bool, device: torch.device) -> None:
        from .backends import MetricSpec, build, check_metric_names

        self.cfg, self.config, self.is_main, self.device = cfg, config, is_main, device
        specs = [MetricSpec(n, cfg.weights.get(n), dict(cfg.options.get(n, {}))) for n in cfg.metrics]
        check_metric_names(specs)
        self.metrics = {s.name: build(s, device=device) for s in specs} if is_main else {}
        for name, m in self.metrics.items():
            if "real" in getattr(m, "requires", ()):
                from ..teachers.base import SenseflowError
                raise SenseflowError(f"train.eval: metric {name!r} needs real images; use `senseflow evaluate` for it")
            if "reference" in getattr(m, "requires", ()) and not cfg.teacher_reference:
                from ..teachers.base import SenseflowError
                raise SenseflowError(f"train.eval: metric {name!r} compares with the teacher: set "
                                     f"train.eval.teacher_reference: true")
        self.prompts = self._prompt_set()
        self.cond = None
        self.reference: torch.Tensor | None = None
        self.history: list[dict[str, Any]] = []
        self.best: float | None = None
        self.best_step: int | None = None

    # -- set-up ------------------------------------------------------------------------------------
    def _prompt_set(self):
        from ..config import TOY_WORLDS
        from .promptset import from_source

        source = self.cfg.prompts or self.config.paths.eval_prompts or self.config.paths.prompts
        if source is None:
            from ..teachers.base import SenseflowError
            raise SenseflowError("train.eval: no prompts (set train.eval.prompts to a prompt file or builtin:toy-world)")
        if source in TOY_WORLDS or not source.startswith("builtin:"):
            return from_source(source, self.cfg.num_prompts, self.cfg.seed, self.cfg.per_prompt)
        from ..teachers.base import SenseflowError
        raise SenseflowError(f"train.eval.prompts: unknown built-in {source!r}")

    def _noise(self, adapter) -> torch.Tensor:
        from ..generate import ImageNoise
        return torch.cat([ImageNoise(self.config.teacher.family, s, adapter.latent_shape(), self.device).initial()
                          for s in self.prompts.seeds]).float()

    def _best_file(self, trainer) -> Path:
        return Path(trainer.run_dir) / "best" / "best.json"

    def _first_call(self, trainer) -> None:
        from ..sampling import sample_ode
        from ..teachers.base import Guidance

        adapter = trainer.method.models.teacher.adapter
        self.cond = adapter.encode_prompts(self.prompts.prompts).to(self.device)
        self.noise = self._noise(adapter)
        best = self._best_file(trainer)
        if best.is_file():       # a resumed run keeps competing against its earlier best
            info = json.loads(best.read_text())
            self.best, self.best_step = info.get("value"), info.get("step")
        if self.cfg.teacher_reference:
            teacher = trainer.method.models.teacher
            kinds = adapter.guidance_kinds
            g = Guidance(cfg=self.cfg.teacher_cfg) if "cfg" in kinds else Guidance(embedded=self.cfg.teacher_cfg)
            outs = [sample_ode(teacher, self.noise[b:b + self.cfg.batch_size], self.cond[b:b + self.cfg.batch_size],
                               self.cfg.teacher_steps, g) for b in range(0, len(self.prompts), self.cfg.batch_size)]
            self.reference = self._uint8(adapter.decode(torch.cat(outs).float()))

    @staticmethod
    def _uint8(images: torch.Tensor) -> torch.Tensor:
        from ..images import to_uint8
        return torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).contiguous()

    # -- one evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, trainer) -> torch.Tensor:
        from ..rng import derive_seed

        gen = trainer.method.models.generator
        was = gen.training
        gen.eval()
        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "train-eval-renoise"))
        outs = []
        for b in range(0, len(self.prompts), self.cfg.batch_size):
            outs.append(gen.sample(self.noise[b:b + self.cfg.batch_size], self.cond[b:b + self.cfg.batch_size],
                                   sampler=trainer.sampler, generator=g).float())
        gen.train(was)
        return self._uint8(gen.denoiser.adapter.decode(torch.cat(outs)))

    def score(self, images: torch.Tensor) -> dict[str, float]:
        numbers: dict[str, float] = {}
        for metric in self.metrics.values():
            metric.reset()
            metric.update(images, self.prompts.prompts, reference=self.reference)
            numbers.update({k: float(v) for k, v in metric.compute().items()})
        return numbers

    def improved(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value > self.best if self.cfg.best_mode == "max" else value < self.best

    def __call__(self, trainer, step: int) -> None:
        if not self.cfg.every or (step % self.cfg.every and step != trainer.cfg.steps):
            return
        if self.cond is None:
            self._first_call(trainer)
        images = self.sample(trainer)
        keep = False
        if self.is_main:
            numbers = self.score(images)
            if trainer.logger is not None:       # TensorBoard + metrics.jsonl
                trainer.logger.scalars(step, {f"eval/{k}": v for k, v in numbers.items()})
            self.history.append({"step": step, **numbers})
            if self.cfg.best_metric is not None:
                if self.cfg.best_metric not in numbers:
                    from ..teachers.base import SenseflowError
                    raise SenseflowError(f"train.eval.best_metric {self.cfg.best_metric!r} is not among the numbers "
                                         f"the metrics give ({', '.join(sorted(numbers))})")
                keep = self.improved(numbers[self.cfg.best_metric])
                if keep:
                    self.best, self.best_step = numbers[self.cfg.best_metric], step
        if trainer.ctx.distributed:
            import torch.distributed as dist
            box = [keep]
            dist.broadcast_object_list(box, src=0)
            keep = box[0]
        if keep:
            self.save_best(trainer, step, self.history[-1] if self.is_main else {})

    def save_best(self, trainer, step: int, numbers: dict[str, Any]) -> None:
        """Write ``<output>/best/``: the student as ``senseflow generate`` loads it, plus ``best.json``."""
        from safetensors.torch import save_file

        from ..export import STUDENT_WEIGHTS, export_meta
        from .runner import finite
        from .store import write_json_atomic

        backbone = trainer.method.models.generator.denoiser.backbone
        if trainer.ctx.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            state = get_model_state_dict(backbone, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            state = backbone.state_dict()
        if not self.is_main:
            return
        folder = Path(trainer.run_dir) / "best"
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        tmp = folder / f".{STUDENT_WEIGHTS}.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "senseflow", "step": str(step)})
        os.replace(tmp, folder / STUDENT_WEIGHTS)      # weights first, then the JSON that names them
        c = self.config
        meta = {"family": c.teacher.family, "teacher": c.paths.teacher, "resolution": c.teacher.resolution,
                "sampler": c.generator.sampler, "method": c.method.name, "step": step}
        if c.generator.lora is not None:
            meta["lora"] = c.generator.lora.model_dump()
        export_meta(trainer.method.models.generator, folder, meta)
        write_json_atomic(folder / "best.json", {"step": step, "metric": self.cfg.best_metric,
                                                 "mode": self.cfg.best_mode, "value": self.best,
                                                 "numbers": finite({k: v for k, v in numbers.items() if k != "step"})})


def attach_train_eval(config, hooks, is_main: bool, device: torch.device):
    """Add the ``train.eval`` hook to ``hooks`` when the config asks for it (returns the hooks)."""
    cfg = getattr(config.train, "eval", None)
    if cfg is None or not cfg.every:
        return hooks
    from ..train.trainer import TrainerHooks

    hooks = hooks or TrainerHooks()
    hooks.on_step.append(TrainEvaluator(cfg, config, is_main, device))
    return hooks
