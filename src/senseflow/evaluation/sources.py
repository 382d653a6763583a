"""Where evaluation images come from: a trained student, the teacher, or any stock diffusers pipeline.

Every source turns ``(prompts, seeds)`` into uint8 images, one independent random stream per
seed, so an image depends only on its own (prompt, seed) -- never on the batch it was made in or
on the process that made it.  That is what makes a resumed or a sharded evaluation identical to
one uninterrupted process.  The initial noise of image ``i`` is drawn exactly as the family's stock
pipeline draws it (:class:`senseflow.generate.ImageNoise`), so the student, the teacher and an
exported / stock pipeline start from the same latents for the same seed.

* :class:`StudentSource` -- a run directory, its ``student/`` folder or ``student.safetensors``
  (loaded with :func:`senseflow.student.load_student`, sampled with :func:`senseflow.generate.render`);
* :class:`TeacherSource` -- the teacher adapter at any Euler step count and CFG
  (:func:`senseflow.sampling.sample_ode`);
* :class:`PipelineSource` -- ``DiffusionPipeline.from_pretrained(folder, local_files_only=True)``:
  a folder written by ``senseflow export`` or a published Turbo / Lightning / schnell model.

Paths are checked in the constructors (one-line :class:`SenseflowError`, nothing loaded); weights
are loaded by :meth:`ImageSource.load`.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..teachers.base import SenseflowError

#: diffusers pipeline class -> teacher family
PIPELINE_FAMILIES: dict[str, str] = {
    "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux", "StableDiffusionXLPipeline": "sdxl",
    "SanaPipeline": "sana", "SanaSprintPipeline": "sana",
}
#: default teacher resolution per family (the toy teacher works at 32 px only)
DEFAULT_RESOLUTION: dict[str, int] = {"toy": 32, "sd3": 1024, "flux": 1024, "sdxl": 1024, "sana": 1024}
TEACHER_SAMPLERS = ("euler", "pipeline")   # pipeline: the teacher folder's own stock pipeline and scheduler


def fingerprint(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """A fast identity of a model folder or file: names, sizes, and the first and last MiB of each file.

    Why not a full sha256: teachers are tens of GB and the fingerprint is computed on every run;
    a retrained or replaced model changes sizes or the head/tail bytes in practice.  (Metric
    weights, which are small and define the numbers, get full sha256 sums in the manifest.)
    """
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()
                                                 and not p.name.startswith(".") and p.name != "train_state.pt")
    digest = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.relative_to(root) if f != root else f.name}:{size}\n".encode())
        with open(f, "rb") as handle:
            digest.update(handle.read(chunk))
            if size > 2 * chunk:
                handle.seek(-chunk, os.SEEK_END)
                digest.update(handle.read(chunk))
    return digest.hexdigest()


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[N, 3, H, W]`` in [-1, 1] -> ``[N, H, W, 3]`` uint8 (the rounding of :func:`senseflow.images.to_uint8`)."""
    from ..images import to_uint8
    return to_uint8(images)


class ImageSource(ABC):
    """One thing that makes images (see module docstring)."""

    kind: str = "source"

    def __init__(self, label: str) -> None:
        self.label = label

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """Everything that determines the images besides (prompt, seed): part of every image record."""

    def load(self, device: torch.device) -> None:
        """Load the weights (called once, only when some image must be made)."""

    @abstractmethod
    def render(self, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        """``[N, H, W, 3]`` uint8, image ``b`` from ``seeds[b]``'s own random stream."""

    def cache_fields(self) -> dict[str, Any] | None:
        """Key fields for the teacher reference cache (``None``: this source is not cached)."""
        return None

    def unload(self) -> None:
        """Free the weights (sources are sampled one after the other)."""


# -------------------------------------------------------------------------------------------------
class StudentSource(ImageSource):
    kind = "student"

    def __init__(self, path: str | os.PathLike, *, label: str | None = None, steps: int | None = None,
                 sampler: str | None = None, teacher: str | None = None, dtype: str | None = None) -> None:
        from ..generate import SAMPLERS
        from ..student import read_student, teacher_config

        self.spec = read_student(path)
        k = len(self.spec.anchors)
        self.steps = k if steps is None else int(steps)
        if not 1 <= self.steps <= k:
            raise SenseflowError(f"student {self.spec.folder}: steps must be in 1..{k} (its anchors), got {self.steps}")
        self.sampler = sampler or self.spec.sampler
        if self.sampler not in SAMPLERS:
            raise SenseflowError(f"student sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        self.teacher_override = teacher
        self.dtype = dtype
        teacher_config(self.spec, teacher)   # the teacher folder exists (one line otherwise)
        run = self.spec.folder.parent.name if self.spec.folder.name == "student" else self.spec.folder.name
        super().__init__(label or (f"{run}-{self.steps}step" if steps is not None else run))
        self._fingerprint = fingerprint(self.spec.weights)
        self.loaded = None

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def teacher_path(self) -> str:
        return self.teacher_override or self.spec.teacher

    @property
    def resolution(self) -> int:
        return self.spec.resolution

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.spec.folder.resolve()), "steps": self.steps,
                "sampler": self.sampler, "anchors": self.spec.anchors[:self.steps], "family": self.family,
                "resolution": self.resolution, "method": self.spec.meta.get("method"),
                "train_step": self.spec.meta.get("step"), "fingerprint": self._fingerprint}

    def load(self, device: torch.device) -> None:
        if self.loaded is None:
            from ..student import load_student
            self.loaded = load_student(self.spec.folder, teacher=self.teacher_override, device=device, dtype=self.dtype)

    def render(self, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        from ..generate import render
        return images_to_uint8(render(self.loaded, list(prompts), list(seeds), self.steps, self.sampler))

    def unload(self) -> None:
        self.loaded = None


# -------------------------------------------------------------------------------------------------
def teacher_family(path: str) -> str:
    """``builtin:toy`` -> toy; a diffusers folder -> its family from ``model_index.json``."""
    if path == "builtin:toy":
        return "toy"
    folder = Path(os.path.expanduser(path))
    index = folder / "model_index.json"
    if not index.is_file():
        raise SenseflowError(f"teacher {path!r} is not a diffusers folder (expected FOLDER/model_index.json with "
                             f"transformer/ or unet/, text_encoder*/, tokenizer*/, vae/, scheduler/; download it "
                             f"with `huggingface-cli download <repo> --local-dir FOLDER`), or use builtin:toy")
    try:
        name = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, ValueError):
        raise SenseflowError(f"{index} is not valid JSON: re-download the teacher folder") from None
    if name not in PIPELINE_FAMILIES:
        raise SenseflowError(f"teacher {path!r}: pipeline {name!r} is not a known teacher family "
                             f"({', '.join(sorted(PIPELINE_FAMILIES))}); pass --teacher-family")
    return PIPELINE_FAMILIES[name]


class TeacherSource(ImageSource):
    """The teacher at ``steps`` Euler steps with guidance ``cfg`` (embedded guidance for FLUX-like models)."""

    kind = "teacher"

    def __init__(self, path: str, *, family: str | None = None, steps: int = 32, cfg: float = 1.0,
                 sampler: str = "euler", resolution: int | None = None, dtype: str = "float32",
                 options: dict[str, Any] | None = None, label: str = "teacher") -> None:
        from ..config import validate

        if not path.startswith("builtin:") and not Path(os.path.expanduser(path)).is_dir():
            raise SenseflowError(f"teacher {path!r} does not exist: pass a local diffusers folder (FOLDER/"
                                 f"model_index.json; `huggingface-cli download <repo> --local-dir FOLDER`) or builtin:toy")
        self.path = path
        self.family = family or teacher_family(path)
        if steps < 1:
            raise SenseflowError(f"--teacher-steps must be >= 1, got {steps}")
        if sampler not in TEACHER_SAMPLERS:
            raise SenseflowError(f"--teacher-sampler must be one of {', '.join(TEACHER_SAMPLERS)}, got {sampler!r}")
        self.steps, self.cfg, self.sampler = int(steps), float(cfg), sampler
        self.resolution = int(resolution or DEFAULT_RESOLUTION.get(self.family, 1024))
        self.config = validate({"paths": {"teacher": path},
                                "teacher": {"family": self.family, "resolution": self.resolution, "dtype": dtype,
                                            "options": dict(options or {})},
                                "method": {"name": "dmd2"}})
        folder = self._folder()
        self._fingerprint = fingerprint(folder) if folder is not None else path
        super().__init__(label)
        self.denoiser = None
        self.device = torch.device("cpu")
        self.pipeline: PipelineSource | None = None
        if sampler == "pipeline":
            if self.family == "toy" or folder is None:
                raise SenseflowError("--teacher-sampler pipeline needs a diffusers teacher folder with its VAE (the toy "
                                     "teacher has no stock pipeline): use --teacher-sampler euler")
            self.pipeline = PipelineSource(folder, label=label, steps=self.steps, cfg=self.cfg,
                                           resolution=self.resolution, dtype=dtype)

    def _folder(self) -> Path | None:
        if self.path == "builtin:toy":
            from ..toy.teacher import TEACHER_ASSET
            return TEACHER_ASSET
        return None if self.path.startswith("builtin:") else Path(os.path.expanduser(self.path))

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "family": self.family, "steps": self.steps, "cfg": self.cfg,
                "sampler": self.sampler, "resolution": self.resolution, "fingerprint": self._fingerprint}

    def cache_fields(self) -> dict[str, Any]:
        return {"teacher": self._fingerprint, "steps": self.steps, "cfg": self.cfg, "sampler": self.sampler,
                "resolution": self.resolution, "family": self.family}

    def guidance(self):
        from ..teachers.base import Guidance
        kinds = self.denoiser.adapter.guidance_kinds
        if "cfg" in kinds:
            return Guidance(cfg=self.cfg)
        return Guidance(embedded=self.cfg)

    def load(self, device: torch.device) -> None:
        if self.pipeline is not None:
            self.pipeline.load(device)
            return
        if self.denoiser is None:
            from ..build import load_teacher
            from ..teachers.base import Denoiser, freeze
            adapter, backbone = load_teacher(self.config, device)
            self.denoiser = Denoiser(freeze(backbone), adapter)
            self.device = torch.device(device)

    @torch.no_grad()
    def render(self, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        from ..generate import ImageNoise
        from ..sampling import sample_ode

        if self.pipeline is not None:
            return self.pipeline.render(prompts, seeds)
        from ..teachers.loading import module_dtype

        adapter = self.denoiser.adapter
        dtype = module_dtype(self.denoiser.backbone)
        shape = adapter.latent_shape()
        noise = torch.cat([ImageNoise(self.family, s, shape, self.device, dtype).initial() for s in seeds]).float()
        cond = adapter.encode_prompts(list(prompts)).to(self.device)
        x0 = sample_ode(self.denoiser, noise, cond, self.steps, self.guidance())
        return images_to_uint8(adapter.decode(x0).float().cpu())

    def unload(self) -> None:
        self.denoiser = None
        if self.pipeline is not None:
            self.pipeline.unload()


# -------------------------------------------------------------------------------------------------
class PipelineSource(ImageSource):
    """Any diffusers pipeline folder, called as its model card says (``senseflow_export.json`` when present).

    Seeding follows the family's stock convention (:data:`senseflow.generate.RECIPES`): SD3 / FLUX
    draw from the global RNG (one image per call, ``torch.manual_seed(seed)``), the others from a
    per-image CPU ``torch.Generator`` -- the same streams ``senseflow generate`` and the teacher use.
    """

    kind = "pipeline"

    def __init__(self, folder: str | os.PathLike, *, label: str | None = None, steps: int | None = None,
                 cfg: float | None = None, resolution: int | None = None, dtype: str = "float32",
                 call: dict[str, Any] | None = None) -> None:
        from ..export_diffusers import EXPORT_META

        self.folder = Path(os.path.expanduser(str(folder)))
        index = self.folder / "model_index.json"
        if not index.is_file():
            raise SenseflowError(f"pipeline {str(folder)!r} is not a diffusers folder (expected FOLDER/model_index.json "
                                 f"and one subfolder per component; `huggingface-cli download <repo> --local-dir "
                                 f"FOLDER`, or `senseflow export`)")
        try:
            self.pipeline_class = json.loads(index.read_text()).get("_class_name", "")
        except (OSError, ValueError):
            raise SenseflowError(f"{index} is not valid JSON: re-download the pipeline folder") from None
        self.export = None
        if (self.folder / EXPORT_META).is_file():
            self.export = json.loads((self.folder / EXPORT_META).read_text())
        self.family = PIPELINE_FAMILIES.get(self.pipeline_class, (self.export or {}).get("family", "other"))
        kwargs: dict[str, Any] = dict((self.export or {}).get("call", {}))
        kwargs.update(call or {})
        if steps is not None:
            kwargs["num_inference_steps"] = int(steps)
            if self.export is not None and steps != self.export.get("steps"):
                kwargs.pop("sigmas", None)
                kwargs.pop("timesteps", None)
        if cfg is not None:
            kwargs["guidance_scale"] = float(cfg)
        if resolution is not None:
            kwargs["height"] = kwargs["width"] = int(resolution)
        self.call = kwargs
        self.resolution = kwargs.get("height")
        self.dtype = dtype
        super().__init__(label or self.folder.name)
        self._fingerprint = fingerprint(self.folder)
        self.pipe = None
        self.device = torch.device("cpu")

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.folder.resolve()), "pipeline": self.pipeline_class,
                "family": self.family, "call": self.call, "fingerprint": self._fingerprint}

    def load(self, device: torch.device) -> None:
        if self.pipe is None:
            from diffusers import DiffusionPipeline

            from ..build import DTYPES
            self.pipe = DiffusionPipeline.from_pretrained(str(self.folder), local_files_only=True,
                                                          torch_dtype=DTYPES[self.dtype]).to(device)
            self.pipe.set_progress_bar_config(disable=True)
            self.device = torch.device(device)

    @torch.no_grad()
    def render(self, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        from ..generate import DEFAULT_RECIPE, RECIPES

        if RECIPES.get(self.family, DEFAULT_RECIPE).stream == "global":
            outs = []
            for prompt, seed in zip(prompts, seeds):
                torch.manual_seed(int(seed))
                outs.append(self.pipe(prompt=[prompt], output_type="np", **self.call).images)
            images = np.concatenate(outs)
        else:
            gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
            images = self.pipe(prompt=list(prompts), generator=gens, output_type="np", **self.call).images
        return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)

    def unload(self) -> None:
        self.pipe = None


# -------------------------------------------------------------------------------------------------
def parse_spec(spec: str) -> tuple[str | None, str, dict[str, str]]:
    """``[LABEL=]PATH[,key=value...]`` -> (label, path, options) for --student / --pipeline."""
    head, *rest = spec.split(",")
    label = None
    if "=" in head:
        label, head = head.split("=", 1)
        if not label:
            raise SenseflowError(f"{spec!r}: empty label before '='")
    options: dict[str, str] = {}
    for item in rest:
        if "=" not in item:
            raise SenseflowError(f"{spec!r}: expected key=value after ',', got {item!r} (e.g. PATH,steps=2,sampler=euler)")
        k, v = item.split("=", 1)
        options[k.strip()] = v.strip()
    return label, head, options


def _int(spec: str, options: dict[str, str], key: str) -> int | None:
    if key not in options:
        return None
    try:
        return int(options.pop(key))
    except ValueError:
        raise SenseflowError(f"{spec!r}: {key} must be an integer") from None


def _float(spec: str, options: dict[str, str], key: str) -> float | None:
    if key not in options:
        return None
    try:
        return float(options.pop(key))
    except ValueError:
        raise SenseflowError(f"{spec!r}: {key} must be a number") from None


def student_from_spec(spec: str, teacher: str | None = None, dtype: str | None = None) -> StudentSource:
    label, path, options = parse_spec(spec)
    steps = _int(spec, options, "steps")
    sampler = options.pop("sampler", None)
    if options:
        raise SenseflowError(f"--student {spec!r}: unknown option(s) {', '.join(options)} (known: steps, sampler)")
    return StudentSource(path, label=label, steps=steps, sampler=sampler, teacher=teacher, dtype=dtype)


def pipeline_from_spec(spec: str, dtype: str = "float32", resolution: int | None = None) -> PipelineSource:
    label, path, options = parse_spec(spec)
    steps = _int(spec, options, "steps")
    cfg = _float(spec, options, "cfg")
    res = _int(spec, options, "resolution") or resolution
    if options:
        raise SenseflowError(f"--pipeline {spec!r}: unknown option(s) {', '.join(options)} (known: steps, cfg, "
                             f"resolution)")
    return PipelineSource(path, label=label, steps=steps, cfg=cfg, resolution=res, dtype=dtype)
