"""Assemble a run from a validated :class:`~senseflow.config.Config`: teacher, networks, method, data."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .config import BUILTIN_PREFIX, TOY_WORLDS, Config
from .data.prompts import PromptStream, load_prompts
from .generator import FewStepGenerator
from .methods import DistillationModels, Method, build_method
from .methods.base import Batch
from .rng import RandomStreams, derive_seed
from .teachers.base import Denoiser, ModelAdapter, SenseflowError, freeze
from .train.trainer import SampleSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

TeacherLoader = Callable[[Config, torch.device], tuple[ModelAdapter, nn.Module]]
_LOADERS: dict[str, TeacherLoader] = {}


def register_family(name: str) -> Callable[[TeacherLoader], TeacherLoader]:
    """Register a loader ``(config, device) -> (adapter, teacher_backbone)`` for a teacher family."""
    def deco(fn: TeacherLoader) -> TeacherLoader:
        _LOADERS[name] = fn
        return fn
    return deco


@register_family("custom")
def _load_custom(config: Config, device: torch.device) -> tuple[ModelAdapter, nn.Module]:
    from .teachers.custom import call_factory, load_factory

    path = None if config.paths.teacher.startswith(BUILTIN_PREFIX) else config.paths.teacher
    kwargs = {"path": path, "resolution": config.teacher.resolution, "device": device}
    if config.teacher.shift is not None:
        kwargs["shift"] = config.teacher.shift
    spec = config.teacher.factory
    fixed = sorted(set(config.teacher.options) & set(kwargs))
    if fixed:
        raise SenseflowError(f"teacher.options.{fixed[0]}: set by senseflow (paths.teacher, teacher.resolution, "
                             f"train.device, teacher.shift); remove it from teacher.options")
    kwargs.update(config.teacher.options)
    return call_factory(load_factory(spec), spec, kwargs)


def _loader_kwargs(config: Config, device: torch.device, **family_defaults) -> dict:
    """Arguments every family loader takes, plus ``teacher.options`` (which win over the defaults)."""
    if config.paths.cache is not None:  # conditioning comes from the cache: no text encoders in the training loop
        family_defaults["load_text_encoders"] = False
    return {"resolution": config.teacher.resolution, "device": device, "dtype": DTYPES[config.teacher.dtype],
            **family_defaults, **config.teacher.options}


@register_family("sd3")
def _load_sd3(config: Config, device: torch.device) -> tuple[ModelAdapter, nn.Module]:
    from .teachers.sd3 import SD3Adapter

    return SD3Adapter.from_pretrained(config.paths.teacher, **_loader_kwargs(config, device, shift=config.teacher.shift))


@register_family("flux")
def _load_flux(config: Config, device: torch.device) -> tuple[ModelAdapter, nn.Module]:
    """FLUX.1: dynamic ``mu`` from the scheduler config; ``teacher.shift`` (if set) replaces it by a static shift."""
    from .teachers.flux import FluxAdapter

    return FluxAdapter.from_pretrained(config.paths.teacher, **_loader_kwargs(config, device, shift=config.teacher.shift))


@register_family("sdxl")
def _load_sdxl(config: Config, device: torch.device) -> tuple[ModelAdapter, nn.Module]:
    """SDXL: DDPM schedule from the scheduler config (``teacher.shift`` does not apply and is refused)."""
    from .teachers.sdxl import SDXLAdapter

    if config.teacher.shift is not None:
        raise SenseflowError("teacher.shift is a rectified-flow setting; SDXL (DDPM) has no shift: remove it")
    return SDXLAdapter.from_pretrained(config.paths.teacher, **_loader_kwargs(config, device))


@register_family("sana")
def _load_sana(config: Config, device: torch.device) -> tuple[ModelAdapter, nn.Module]:
    """SANA / SANA-Sprint: flow or TrigFlow detected from the scheduler; ``teacher.shift`` overrides ``flow_shift``."""
    from .teachers.sana import SanaAdapter

    return SanaAdapter.from_pretrained(config.paths.teacher, **_loader_kwargs(config, device, shift=config.teacher.shift))


def load_teacher(config: Config, device: torch.device, meta: bool = False) -> tuple[ModelAdapter, nn.Module]:
    """The teacher's adapter and backbone on ``device``.

    ``meta``: the backbone is wanted WITHOUT weights (a non-zero rank under
    ``parallel.broadcast_from_rank0``; rank 0 sends the weights after sharding).  A ``custom``
    factory is called with ``device="meta"`` (a factory that builds ``Module().to(device)`` then
    allocates no weights); the diffusers families load as usual and the backbone is moved to
    ``meta`` at once, which frees it before the student and fake-score copies are made (peak: one
    copy per rank instead of three).  The adapter (text encoders, VAE) stays on ``device``.
    """
    if meta:
        if config.teacher.family == "custom":
            adapter, backbone = load_teacher(config, torch.device("meta"))
        else:
            adapter, backbone = load_teacher(config, device)
        return adapter, backbone.to("meta")
    family = config.teacher.family
    if family not in _LOADERS:
        _import_family(family)
    if family not in _LOADERS:
        raise SenseflowError(f"teacher.family {family!r} is not available in this version of senseflow")
    try:
        adapter, backbone = _LOADERS[family](config, device)
    except TypeError as exc:  # an unknown key in teacher.options
        if "unexpected keyword argument" in str(exc):
            raise SenseflowError(f"teacher.options: {exc}".replace("from_pretrained() ", "")) from None
        raise
    dtype = DTYPES[config.teacher.dtype]
    param = next(backbone.parameters(), None)
    if param is not None and (param.dtype != dtype or param.device != torch.device(device)):
        backbone = backbone.to(device=device, dtype=dtype)
    return adapter, backbone


def _import_family(family: str) -> None:
    """Family modules register themselves on import; import lazily so unused families cost nothing."""
    import importlib

    module = {"toy": "senseflow.toy.family",
              "flux": "senseflow.teachers.flux", "sdxl": "senseflow.teachers.sdxl",
              "sana": "senseflow.teachers.sana"}.get(family)
    if module is None:
        return
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module.startswith(exc.name):
            raise


def build_models(config: Config, device: torch.device, rank: int = 0, meta: bool = False) -> DistillationModels:
    """``meta``: teacher, student and fake score without weights (see :func:`load_teacher`); they are
    filled from rank 0 by :func:`senseflow.train.distributed.parallelize` (``broadcast_from_rank0``)."""
    adapter, backbone = load_teacher(config, device, meta=meta)
    teacher = Denoiser(freeze(backbone), adapter)
    from .lora import maybe_apply_lora

    student = maybe_apply_lora(adapter.make_student(backbone).requires_grad_(True).train(), config.generator.lora)
    generator = FewStepGenerator(Denoiser(student, adapter),
                                 config.method.native_anchors(adapter.schedule, config.generator.anchors))
    fake = Denoiser(maybe_apply_lora(adapter.make_fake_score(backbone).requires_grad_(True).train(),
                                     config.fake_score.lora), adapter)
    gan_head = getattr(config.method, "gan_head", None)
    if gan_head is not None and gan_head.enabled:  # before parallelize: it is sharded with the fake score
        from .discriminators.dmd2_head import attach_gan_head, check_gan_data
        check_gan_data(config)
        attach_gan_head(fake, gan_head, device)
    discriminator = None
    if config.discriminator is not None and getattr(config.method, "adversarial_weight", 0.0) > 0 \
            and config.method.name != "sid":
        from .discriminators.config import build_vfm_discriminator
        cfg = config.discriminator if config.discriminator.seed is not None else \
            config.discriminator.model_copy(update={"seed": config.train.seed})
        discriminator = build_vfm_discriminator(cfg, adapter, device, rank=rank)
    return DistillationModels(teacher=teacher, generator=generator, fake_score=fake, discriminator=discriminator)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SenseflowError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


class PromptBatches:
    """Prompt-only batches (data-free training): prompts -> conditioning via the teacher's encoders."""

    def __init__(self, stream: PromptStream, adapter: ModelAdapter, device: torch.device) -> None:
        self.stream, self.adapter, self.device = stream, adapter, device

    def next_batch(self) -> Batch:
        prompts = self.stream.next_prompts()
        return Batch(prompts, self.adapter.encode_prompts(prompts).to(self.device))

    def state_dict(self) -> dict[str, int]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.stream.load_state_dict(state)


def training_prompts(config: Config) -> list[str]:
    if config.paths.prompts is None:
        raise SenseflowError("paths.prompts is not set: give a prompt file (one prompt per line)")
    if config.paths.prompts in TOY_WORLDS:
        from .toy.data import world_prompts
        return world_prompts(config.paths.prompts)
    return load_prompts(config.paths.prompts)


def build_data(config: Config, adapter: ModelAdapter, device: torch.device, rank: int = 0, world_size: int = 1):
    """Prompt files give prompt-only (data-free) batches; ``builtin:toy-world`` gives prompts + real images;
    ``paths.cache`` / ``paths.image_text`` / ``paths.lmdb`` are served by :mod:`senseflow.data.sources`."""
    from .data.sources import data_source

    source = data_source(config, adapter, device, rank, world_size)
    if source is not None:
        return source
    if config.paths.prompts in TOY_WORLDS:
        from .toy.data import ToyWorldBatches
        return ToyWorldBatches(adapter, config.train.batch_size, config.train.seed, device, rank, world_size,
                               open_positions=TOY_WORLDS[config.paths.prompts])
    stream = PromptStream(training_prompts(config), config.train.batch_size, derive_seed(config.train.seed, "data"),
                          rank, world_size)
    return PromptBatches(stream, adapter, device)


def build_samples(config: Config, adapter: ModelAdapter, device: torch.device) -> SampleSpec | None:
    """Fixed prompts + noise for sample grids; None (no grids) when ``train.num_samples`` is 0."""
    from .data.sources import sample_spec

    if config.train.num_samples == 0:
        return None

    spec = sample_spec(config, adapter, device)  # from the cache (no text encoders) / image-text / LMDB data
    if spec is not None:
        return spec
    if config.paths.eval_prompts and config.paths.eval_prompts not in TOY_WORLDS:
        prompts = load_prompts(config.paths.eval_prompts)
    else:
        prompts = training_prompts(config)
    prompts = prompts[: config.train.num_samples]
    g = torch.Generator().manual_seed(derive_seed(config.train.seed, "grid-noise"))
    noise = torch.randn((len(prompts), *adapter.latent_shape()), generator=g).to(device)
    return SampleSpec(prompts, adapter.encode_prompts(prompts).to(device), noise)


def build_method_from(config: Config, models: DistillationModels, world_size: int = 1) -> Method:
    return build_method(models, config.method, images_per_iteration=config.train.batch_size * world_size)


def run_directory(config: Config) -> Path:
    return Path(config.paths.output)
