"""Typed run configuration: YAML with a ``paths`` section, ``--set key=value`` overrides, strict validation.

Every section forbids unknown keys, every number has a range, and problems are reported as ONE
line naming the key (``config error: method.ttur: Input should be greater than or equal to 1``)
before anything is written to disk.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from .configbase import StrictModel
from .discriminators.config import VFMDiscriminatorConfig
from .evaluation.train_eval import TrainEvalConfig
from .lora import LoRAConfig
from .methods import MethodConfig
from .teachers.base import SenseflowError
from .train.distributed import ParallelConfig
from .yaml_safe import load_yaml_text
from .train.ema import EMAConfig

BUILTIN_PREFIX = "builtin:"
#: The procedural prompt sources and the fraction of their captions that leave positions open
#: (senseflow.toy.world: open prompts are multimodal, as real text-to-image prompts are).
TOY_WORLDS: dict[str, float] = {"builtin:toy-world": 0.0, "builtin:toy-world-open": 0.5}


def opens_positions(source: str | None) -> bool:
    """Whether a prompt source is a toy world with open captions (such a world is judged on open prompts)."""
    return TOY_WORLDS.get(source or "", 0.0) > 0


class PathsConfig(StrictModel):
    """Where things are.  ``teacher`` is a local diffusers folder or ``builtin:<name>``."""

    teacher: str = Field(description="local diffusers folder of the teacher, or builtin:<name> (builtin:toy)")
    prompts: str | None = Field(None, description="training prompts: .txt (one per line), .json or .csv; "
                                "builtin:toy-world = procedural prompts with real images; "
                                "builtin:toy-world-open = the same with half of the captions leaving positions open")
    eval_prompts: str | None = Field(None, description="prompts for sample grids (default: the first training prompts)")
    image_text: str | None = Field(None, description="SenseFlow image-text JSON {keys, image_paths, prompts}: real "
                                   "images, resized + centre-cropped to teacher.resolution (docs/data.md)")
    lmdb: str | None = Field(None, description="DMD2-style LMDB of VAE latents + prompts (docs/data.md)")
    cache: str | None = Field(None, description="prompt/latent cache built by `senseflow cache`; training then loads "
                              "the teacher without its text encoders (docs/data.md)")
    output: str = Field("runs/senseflow", description="run directory: config, logs, samples, checkpoints, student")

    @field_validator("output")
    @classmethod
    def _output(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("is empty: give a run directory (an empty path would train into the current directory)")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "PathsConfig":
        given = [f"paths.{k}" for k in ("prompts", "image_text", "lmdb") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} are both set: give one data source")
        return self


class TeacherConfig(StrictModel):
    family: str = Field(description="teacher family: a built-in (toy, sd3, flux, flux2, sdxl, sana, qwenimage, zimage, custom) or one a package "
                        "registers (entry points senseflow.families); see senseflow.teachers.registry")
    factory: str | None = Field(None, description="custom family: 'package.module:function' returning (adapter, backbone)")
    resolution: int = Field(1024, ge=8, le=8192, description="training resolution in pixels")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="storage dtype of the frozen teacher")
    weight_dtype: Literal["none", "fp8_e4m3"] = Field(
        "none", description="fp8_e4m3: store the frozen teacher's nn.Linear weights in float8_e4m3fn with a per-channel "
                            "scale, dequantised to the activations' dtype in each forward (linears: ~1/4 of their fp32, "
                            "1/2 of their bf16 bytes; the student and fake score keep full precision); "
                            "docs/performance.md")
    cpu_offload: Literal["none", "text_encoders", "backbone", "all"] = Field(
        "none", description="single-process runs: keep the frozen teacher backbone and/or the text encoders in CPU "
                            "memory, each submodule's weights copied to the device for its forward (accelerate's "
                            "cpu_offload); docs/performance.md")
    shift: float | None = Field(None, gt=0.0, description="override the scheduler's shift (rectified flow)")
    options: dict[str, Any] = Field(
        default_factory=dict, description="family-specific loader options, e.g. FLUX {fake_guidance_embed: true, "
                                          "default_embedded_guidance: 3.5}, SANA {prediction: trigflow}")

    @field_validator("family")
    @classmethod
    def _known_family(cls, v: str) -> str:
        from .teachers import registry

        known = registry.names()
        if v not in known:
            raise ValueError(f"unknown family {v!r}; known families: {', '.join(known)}")
        return v

    @model_validator(mode="after")
    def _factory(self) -> "TeacherConfig":
        from .teachers import registry

        built_by_factory = registry.get(self.family).factory   # the family's descriptor (custom: True)
        if built_by_factory and not self.factory:
            raise ValueError("family 'custom' needs teacher.factory = 'package.module:function'")
        if not built_by_factory and self.factory:
            raise ValueError("teacher.factory is only used with family 'custom'")
        return self


class GeneratorConfig(StrictModel):
    anchors: list[float] = Field(default_factory=lambda: [1.0, 0.75, 0.5, 0.25],
                                 description="unit (unshifted, index/1000) anchor times, strictly decreasing in (0, 1]")
    sampler: Literal["stochastic", "euler"] = Field(
        "stochastic", description="stochastic: fresh noise at every anchor (SenseFlow tables); euler: deterministic")
    lora: LoRAConfig | None = Field(None, description="train LoRA adapters on the teacher's frozen base instead "
                                                      "of the whole backbone: {rank, alpha, target_modules, "
                                                      "shared_base}")
    ema: EMAConfig | None = Field(None, description="keep an fp32 EMA of the generator (served by sample grids, "
                                  "evaluation, student/, generate and export): {decay | halflife_kimg, "
                                  "rampup_ratio, start_step, weights}; docs/config.md#generatorema")
    first_input_time: float | None = Field(
        None, description="unit time (like anchors, mapped through the same shift) at which G's backbone is "
                          "queried for the pure-noise first anchor, the noise scaled as that time's noise term "
                          "(SiD's G(sigma_init z, sigma_init)); None: the anchor itself (SenseFlow/DMD2). "
                          "0 < T < anchors[0]; saved in student.json; such a student cannot be exported to a "
                          "stock pipeline (docs/deviations.md)")

    @model_validator(mode="after")
    def _first_input_time(self) -> "GeneratorConfig":
        t = self.first_input_time
        if t is not None and not 0.0 < t < self.anchors[0]:   # NaN fails too
            raise ValueError(f"first_input_time must lie in (0, anchors[0] = {self.anchors[0]:g}) (unit time, "
                             f"below the pure-noise first anchor), got {t}; or omit it")
        return self

    @field_validator("anchors")
    @classmethod
    def _anchors(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("need at least one anchor")
        if any(not 0.0 < a <= 1.0 for a in v):
            raise ValueError(f"anchors must lie in (0, 1], got {v}")
        if any(b >= a for a, b in zip(v, v[1:])):
            raise ValueError(f"anchors must be strictly decreasing, got {v}")
        return v


class FakeScoreConfig(StrictModel):
    lora: LoRAConfig | None = Field(None, description="LoRA for the fake score (with IDA: the same as generator.lora)")


class OptimizerConfig(StrictModel):
    name: Literal["adamw", "adam"] = "adamw"
    lr: float = Field(1e-6, gt=0.0, le=1.0, description="learning rate (Adam moves each weight by about lr per "
                                                         "step: above 1 it destroys the weights)")
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0, le=10.0, description="decoupled weight decay; lr * weight_decay < 1")

    @model_validator(mode="after")
    def _decay(self) -> "OptimizerConfig":
        if self.lr * self.weight_decay >= 1.0:  # AdamW scales the weights by 1 - lr * wd every step
            raise ValueError(f"lr * weight_decay = {self.lr * self.weight_decay:g} must be < 1 (AdamW multiplies "
                             "the weights by 1 - lr * weight_decay each step)")
        return self

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"betas must be in [0, 1), got {list(v)}")
        return v


class OptimConfig(StrictModel):
    generator: OptimizerConfig = OptimizerConfig()
    fake_score: OptimizerConfig = OptimizerConfig()
    discriminator: OptimizerConfig = OptimizerConfig()


class TrainConfig(StrictModel):
    steps: int = Field(1000, ge=1, description="training iterations")
    batch_size: int = Field(1, ge=1, le=65536, description="per-process batch per iteration (the first batch's "
                                                             "memory is checked against the device)")
    grad_accum: int = Field(1, ge=1, le=65536, description="micro-batches per iteration (batch_size must divide "
                                                           "evenly)")
    grad_clip: float | None = Field(1.0, gt=0.0)
    seed: int = Field(0, description="seeds every random draw of the run: data, noise, and the initialisation of "
                                     "LoRA adapters and discriminator heads (two runs with one seed are the same run)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "amp_bf16", "bf16"] = Field(
        "fp32", description="amp_bf16: fp32 master weights + bf16 autocast; bf16: pure bf16 weights "
                            "(SiD-DiT's setting: use Adam eps 1e-4); losses are always computed in fp32")
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(0, ge=0, description="0 = only at the end")
    num_samples: int = Field(8, ge=0, le=64, description="prompts in each sample grid; 0 = no sample grids")
    checkpoint_every: int = Field(0, ge=0, description="0 = only at the end")
    keep_checkpoints: int = Field(2, ge=1)
    progress: bool = True
    tensorboard: bool = True
    eval: TrainEvalConfig | None = Field(None, description="evaluation during training: every N steps a cheap metric "
                                         "set on M prompts, logged as eval/*; keeps <output>/best/ (docs/evaluation.md)")
    compile: bool | Literal["blocks"] = Field(
        False, description="torch.compile each transformer block of the teacher, generator and fake score "
                           "(regional compilation: true = 'blocks'); same maths, see docs/performance.md")

    @model_validator(mode="after")
    def _accum(self) -> "TrainConfig":
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        return self


class Config(StrictModel):
    paths: PathsConfig
    teacher: TeacherConfig
    generator: GeneratorConfig = GeneratorConfig()
    fake_score: FakeScoreConfig = FakeScoreConfig()
    method: MethodConfig = Field(discriminator="name")
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    parallel: ParallelConfig = ParallelConfig()
    discriminator: VFMDiscriminatorConfig | None = Field(
        None, description="SenseFlow's VFM discriminator; used when method.adversarial_weight > 0")

    @model_validator(mode="after")
    def _adversarial(self) -> "Config":
        weight = getattr(self.method, "adversarial_weight", 0.0)
        if self.method.name != "sid" and weight > 0 and self.discriminator is None:
            raise ValueError("method.adversarial_weight > 0 needs a `discriminator:` section (DINOv2 and CLIP paths)")
        from .lora import same_adapters
        if getattr(self.method, "ida", False) and self.method.name == "senseflow" \
                and not same_adapters(self.generator.lora, self.fake_score.lora):
            raise ValueError("method.ida aligns fake score and generator parameters by name: give fake_score.lora "
                             "the same setting as generator.lora (or set method.ida: false)")
        return self

    def check_paths(self) -> None:
        """Fail (one line) on inputs that do not exist, before a run directory is created."""
        teacher = self.paths.teacher
        from .teachers import registry

        folder = not teacher.startswith(BUILTIN_PREFIX) and not registry.get(self.teacher.family).factory
        if folder and not Path(teacher).is_dir():
            raise SenseflowError(f"paths.teacher: {teacher!r} is not a directory; point it at a local diffusers folder")
        if folder:
            from .teachers.loading import check_folder_family
            check_folder_family(teacher, self.teacher.family)
        for key in ("prompts", "eval_prompts"):
            value = getattr(self.paths, key)
            if value is not None and value.startswith(BUILTIN_PREFIX) and value not in TOY_WORLDS:
                raise SenseflowError(f"paths.{key}: unknown built-in {value!r} (available: {', '.join(TOY_WORLDS)})")
            if value is not None and not value.startswith(BUILTIN_PREFIX):
                require_file(value, f"paths.{key}: file")
        if self.paths.image_text is not None:
            require_file(self.paths.image_text, "paths.image_text: file")
        if self.paths.lmdb is not None and not Path(self.paths.lmdb).is_dir():
            raise SenseflowError(f"paths.lmdb: directory {self.paths.lmdb!r} not found")
        if self.discriminator is not None and getattr(self.method, "adversarial_weight", 0.0) > 0:
            self.discriminator.check_paths()
        out = Path(self.paths.output)
        if out.exists() and not out.is_dir():
            raise SenseflowError(f"paths.output: {str(out)!r} exists and is not a directory")


def require_file(path: str | os.PathLike, what: str) -> None:
    """One-line error unless ``path`` is an existing file (a directory is named as one, not "not found")."""
    p = Path(path)
    if p.is_dir():
        raise SenseflowError(f"{what} {str(p)!r} is a directory; give a file")
    if not p.is_file():
        raise SenseflowError(f"{what} {str(p)!r} not found")


def _format_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in ("senseflow", "dmd2", "sid")))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see docs/config.md)"
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = f" (+{len(parts) - 1} more)" if len(parts) > 1 else ""
    return f"config error: {parts[0]}{more}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], YAML-parsed value)."""
    if "=" not in item:
        raise SenseflowError(f"--set {item!r}: expected key=value, e.g. --set train.steps=100")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise SenseflowError(f"--set {item!r}: bad key {key!r}")
    try:
        value = load_yaml_text(raw, f"--set {item!r}") if raw != "" else ""
    except yaml.YAMLError as exc:
        raise SenseflowError(f"--set {item!r}: cannot parse value ({exc.__class__.__name__})") from exc
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a new dict with ``--set`` overrides applied (the input is never mutated)."""
    out = copy.deepcopy(data)
    for item in overrides:
        keys, value = parse_override(item)
        node = out
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise SenseflowError(f"--set {item!r}: {k!r} is not a section")
            node = child
        node[keys[-1]] = value
    return out


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    require_file(p, "config file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SenseflowError(f"config file {str(p)!r} is not UTF-8 text (byte {exc.start}): is it a binary file?") \
            from None
    except OSError as exc:
        raise SenseflowError(f"config file {str(p)!r} cannot be read ({exc.strerror or exc})") from None
    try:
        data = load_yaml_text(text, f"config file {str(p)!r}")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise SenseflowError(f"config file {str(p)!r} is not valid YAML{where}") from exc
    if not isinstance(data, dict):
        raise SenseflowError(f"config file {str(p)!r} must contain a mapping of sections")
    return data


def validate(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise SenseflowError(_format_error(err)) from None


def load_config(path: str | os.PathLike, overrides: list[str] | None = None, check_paths: bool = True) -> Config:
    """Load, override, validate and (optionally) check the paths of a run config."""
    config = validate(apply_overrides(load_yaml(path), overrides or []))
    if check_paths:
        config.check_paths()
    return config


def dump_config(config: Config) -> str:
    """The resolved config as YAML (saved next to every run)."""
    return yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False)
