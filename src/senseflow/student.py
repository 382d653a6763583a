"""Loading a trained student: teacher folder + ``student.safetensors`` + ``student.json`` -> a generator.

A run writes ``<output>/student/`` (see :func:`senseflow.api.train`): ``student.safetensors`` (the
generator backbone's state dict) and ``student.json`` (native anchors, sampler, family, teacher
folder, resolution, ...), next to the run's resolved ``config.yaml``.  :func:`load_student` rebuilds
the teacher adapter exactly as training did (the run config's ``teacher`` section -- options, shift,
dtype -- when ``config.yaml`` is there), turns the teacher backbone into the student architecture
with the family's ``make_student`` (FLUX: no guidance embedder), re-applies LoRA adapters when the
student has them, and loads the weights strictly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .export import STUDENT_META, STUDENT_WEIGHTS
from .generator import FewStepGenerator
from .teachers.base import Denoiser, ModelAdapter, SenseflowError

RUN_CONFIG = "config.yaml"


def __getattr__(name: str):
    """``DIFFUSERS_FAMILIES`` (families whose students export to a stock pipeline) now comes from the registry."""
    if name == "DIFFUSERS_FAMILIES":
        from .teachers.registry import diffusers_families
        return diffusers_families()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class StudentSpec:
    """What ``student.json`` (and the run's ``config.yaml``, when present) say about a student."""

    folder: Path
    meta: dict[str, Any]
    run_config: dict[str, Any] | None = None

    @property
    def weights(self) -> Path:
        return self.folder / STUDENT_WEIGHTS

    @property
    def family(self) -> str:
        return str(self.meta["family"])

    @property
    def teacher(self) -> str:
        return str(self.meta["teacher"])

    @property
    def resolution(self) -> int:
        return int(self.meta["resolution"])

    @property
    def anchors(self) -> list[float]:
        """NATIVE anchor times (sigma for flows, DDPM index for SDXL), as the generator was trained."""
        return [float(a) for a in self.meta["anchors"]]

    @property
    def first_input_time(self) -> float | None:
        """NATIVE time G's backbone is queried at for the pure-noise first anchor (``generator.first_input_time``);
        None: the first anchor itself."""
        value = self.meta.get("first_input_time")
        return None if value is None else float(value)

    @property
    def sampler(self) -> str:
        return str(self.meta.get("sampler", "stochastic"))

    @property
    def default_weights(self) -> str:
        """What ``student.safetensors`` holds: ``ema`` or ``raw`` (students without an EMA: raw)."""
        return str(self.meta.get("weights", "raw"))

    @property
    def weight_kinds(self) -> list[str]:
        """The weight sets this student folder holds (``--weights`` choices)."""
        files = self.meta.get("weight_files")
        return sorted(files) if isinstance(files, dict) else [self.default_weights]

    def weights_file(self, kind: str | None = None) -> Path:
        """The file of weight set ``kind`` (``ema`` / ``raw``; None: the default, ``student.safetensors``)."""
        if kind is None or kind == self.default_weights:
            return self.weights
        if kind not in ("ema", "raw"):
            raise SenseflowError(f"--weights must be 'ema' or 'raw', got {kind!r}")
        files = self.meta.get("weight_files")
        if not isinstance(files, dict) or kind not in files:
            raise SenseflowError(f"--weights {kind}: {self.folder} holds only {self.default_weights} weights (train with "
                                 f"generator.ema to keep both); drop --weights or pass --weights {self.default_weights}")
        path = self.folder / str(files[kind])
        if path.name != str(files[kind]) or not path.is_file():
            raise SenseflowError(f"--weights {kind}: {path} (listed in {self.folder / STUDENT_META}) is missing")
        return path

    @property
    def lora(self) -> dict[str, Any] | None:
        value = self.meta.get("lora")
        return dict(value) if isinstance(value, dict) else None


def resolve_student_dir(path: str | os.PathLike) -> Path:
    """A run's ``student/`` folder from the folder itself, the run directory or ``student.safetensors``."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_file() and p.name in (STUDENT_WEIGHTS, STUDENT_META):
        p = p.parent
    if not p.exists():
        raise SenseflowError(f"--student {str(path)!r} does not exist: pass a run's student/ folder or the run "
                             f"directory")
    if not p.is_dir():
        raise SenseflowError(f"--student {str(path)!r} is a file: pass a run's student/ folder or the run directory")
    if not (p / STUDENT_META).exists() and (p / "student" / STUDENT_META).exists():
        p = p / "student"
    for name in (STUDENT_META, STUDENT_WEIGHTS):
        if not (p / name).is_file():
            raise SenseflowError(f"{p} has no {name}: not a student folder (a finished run writes "
                                 f"<output>/student/{STUDENT_WEIGHTS} and {STUDENT_META})")
    return p


def read_student(path: str | os.PathLike) -> StudentSpec:
    """Read and check ``student.json`` (and the run config next to it); one-line errors."""
    folder = resolve_student_dir(path)
    try:
        meta = json.loads((folder / STUDENT_META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SenseflowError(f"cannot read {folder / STUDENT_META}: {exc.__class__.__name__}") from None
    if not isinstance(meta, dict):
        raise SenseflowError(f"{folder / STUDENT_META} does not hold a JSON object")
    for key in ("anchors", "family", "teacher", "resolution"):
        if key not in meta:
            raise SenseflowError(f"{folder / STUDENT_META} has no {key!r}: re-export the student with this version "
                                 f"of senseflow")
    anchors = meta["anchors"]
    if not isinstance(anchors, list) or not anchors or not all(isinstance(a, (int, float)) for a in anchors):
        raise SenseflowError(f"{folder / STUDENT_META}: 'anchors' must be a non-empty list of numbers")
    t_in = meta.get("first_input_time")
    if t_in is not None and (isinstance(t_in, bool) or not isinstance(t_in, (int, float))
                             or not float(t_in) < float(anchors[0])):   # NaN fails too
        raise SenseflowError(f"{folder / STUDENT_META}: 'first_input_time' must be a number below the first anchor, "
                             f"got {t_in!r}")
    if meta.get("sampler", "stochastic") not in ("stochastic", "euler"):
        raise SenseflowError(f"{folder / STUDENT_META}: unknown sampler {meta.get('sampler')!r}")
    run_config = None
    cfg_path = folder.parent / RUN_CONFIG
    if cfg_path.is_file():
        from .config import load_yaml
        run_config = load_yaml(cfg_path)
    return StudentSpec(folder=folder, meta=meta, run_config=run_config)


def check_stock_export(spec: StudentSpec) -> None:
    """Refuse (one line) exporting a student the stock pipelines cannot run: they feed the noise at the first
    anchor itself (t = 1 for flows), not at ``generator.first_input_time``."""
    if spec.first_input_time is not None:
        raise SenseflowError(f"this student was trained with generator.first_input_time (native "
                             f"{spec.first_input_time:g}): a stock pipeline feeds the noise at the first anchor "
                             f"({spec.anchors[0]:g}) and cannot reproduce it; use senseflow generate")


def teacher_config(spec: StudentSpec, teacher: str | os.PathLike | None = None):
    """A :class:`~senseflow.config.Config` that loads the student's teacher like training did.

    ``teacher`` overrides the folder recorded in ``student.json`` (e.g. the run was made on another
    machine).  The run's ``teacher`` section (options, shift, dtype, custom factory) is used when
    the run's ``config.yaml`` sits next to ``student/``.
    """
    from .config import validate

    teacher_path = str(teacher) if teacher is not None else spec.teacher
    section: dict[str, Any] = {"family": spec.family, "resolution": spec.resolution}
    if spec.run_config and isinstance(spec.run_config.get("teacher"), dict):
        section = {**spec.run_config["teacher"], "family": spec.family, "resolution": spec.resolution}
        options = dict(section.get("options") or {})
        options.pop("load_text_encoders", None)     # training may have used a prompt cache; sampling encodes
        section["options"] = options
    data = {"paths": {"teacher": teacher_path}, "teacher": section, "method": {"name": "dmd2"}}
    config = validate(data)
    from .teachers.registry import get as family

    if not teacher_path.startswith("builtin:") and not family(spec.family).factory:
        p = Path(os.path.expanduser(teacher_path))
        if not p.is_dir():
            raise SenseflowError(f"teacher folder {teacher_path!r} (recorded in {spec.folder / STUDENT_META}) does "
                                 f"not exist: pass --teacher with the local diffusers folder")
    return config


@dataclass
class LoadedStudent:
    """A ready-to-sample student: the generator (student backbone + adapter), its spec and its config."""

    spec: StudentSpec
    generator: FewStepGenerator
    adapter: ModelAdapter
    config: Any
    device: torch.device
    teacher_path: str
    weights: str = "raw"

    @property
    def backbone(self) -> nn.Module:
        return self.generator.denoiser.backbone

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def has_lora(self) -> bool:
        from .lora import has_lora
        return has_lora(self.backbone)


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 -- a truncated / foreign file
        raise SenseflowError(f"cannot read {path}: {' '.join(str(exc).split())[:200]}; the file is damaged") from None


def build_student_backbone(adapter: ModelAdapter, teacher_backbone: nn.Module, state: dict[str, torch.Tensor],
                           lora_meta: dict[str, Any] | None, where: Path) -> nn.Module:
    """Teacher backbone -> the student architecture holding ``state`` (LoRA re-applied when present)."""
    from .lora import config_from_state_dict, is_lora_state_dict, maybe_apply_lora

    own = set(teacher_backbone.state_dict().keys())
    lora = is_lora_state_dict(state.keys())
    if not lora and set(state.keys()) == own:
        student = teacher_backbone          # same architecture: load in place, no second copy
    else:
        student = adapter.make_student(teacher_backbone)
        if lora:
            student = maybe_apply_lora(student, config_from_state_dict(state, lora_meta))
    dtype = next((p.dtype for p in student.parameters() if p.is_floating_point()), torch.float32)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    missing, unexpected = student.load_state_dict(state, strict=False)
    if missing or unexpected:
        what = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
        raise SenseflowError(f"{where} does not match the {type(student).__name__} built from the teacher ({what}): "
                             f"was it trained from another teacher? pass --teacher with the right folder")
    student.requires_grad_(False)
    student.eval()
    return student


def load_student(path: str | os.PathLike, teacher: str | os.PathLike | None = None,
                 device: torch.device | str = "cpu", dtype: str | None = None,
                 weights: str | None = None) -> LoadedStudent:
    """Load a trained student for sampling / export (see module docstring).

    ``dtype`` (``float32`` / ``bfloat16`` / ``float16``) overrides the run's ``teacher.dtype``.
    ``weights`` (``ema`` / ``raw``) picks a weight set of a run that kept an EMA (default: the
    student's default, ``student.safetensors``: the EMA unless the run set ``generator.ema.weights: raw``).
    """
    from .build import load_teacher

    spec = read_student(path)
    weights_file = spec.weights_file(weights)
    config = teacher_config(spec, teacher)
    if dtype is not None:
        config = config.model_copy(update={"teacher": config.teacher.model_copy(update={"dtype": dtype})})
    device = torch.device(device)
    state = _load_state(weights_file)
    adapter, backbone = load_teacher(config, device)
    student = build_student_backbone(adapter, backbone, state, spec.lora, weights_file)
    del backbone, state
    try:
        generator = FewStepGenerator(Denoiser(student, adapter), spec.anchors, first_input_time=spec.first_input_time)
    except ValueError as exc:
        raise SenseflowError(f"{spec.folder / STUDENT_META}: {exc}") from None
    generator.eval()
    return LoadedStudent(spec=spec, generator=generator, adapter=adapter, config=config, device=device,
                         teacher_path=config.paths.teacher, weights=weights or spec.default_weights)
