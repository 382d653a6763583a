"""Assemble a run from a validated :class:`~senseflow.config.Config`: teacher, networks, method, data."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .config import TOY_WORLDS, Config
from .data.prompts import PromptStream, load_prompts
from .generator import FewStepGenerator
from .methods import DistillationModels, Method, build_method
from .methods.base import Batch
from .rng import RandomStreams, derive_seed
from .schedules import NoiseSchedule
from .teachers.base import Denoiser, ModelAdapter, SenseflowError, freeze
from .train.trainer import SampleSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

TeacherLoader = Callable[[Config, torch.device], tuple[ModelAdapter, nn.Module]]


def register_family(name: str) -> Callable[[TeacherLoader], TeacherLoader]:
    """Register a loader ``(config, device) -> (adapter, teacher_backbone)`` for a teacher family.

    Kept for code written before :mod:`senseflow.teachers.registry`: it registers a
    :class:`~senseflow.teachers.registry.FamilyDescriptor` holding only the loader (a family with
    a full descriptor -- pipeline, LoRA targets, export -- registers that instead).
    """
    from dataclasses import replace

    from .teachers import registry

    def deco(fn: TeacherLoader) -> TeacherLoader:
        old = registry.registered(name)
        registry.register(replace(old, load=fn) if old is not None else registry.FamilyDescriptor(name, load=fn))
        return fn
    return deco


def loader_kwargs(config: Config, device: torch.device, **family_defaults) -> dict:
    """Arguments every family loader takes, plus ``teacher.options`` (which win over the defaults)."""
    if config.paths.cache is not None:  # conditioning comes from the cache: no text encoders in the training loop
        family_defaults["load_text_encoders"] = False
    return {"resolution": config.teacher.resolution, "device": device, "dtype": DTYPES[config.teacher.dtype],
            **family_defaults, **config.teacher.options}


_loader_kwargs = loader_kwargs


def load_teacher(config: Config, device: torch.device, meta: bool = False) -> tuple[ModelAdapter, nn.Module]:
    """The teacher's adapter and backbone on ``device``.

    ``meta``: the backbone is wanted WITHOUT weights (a non-zero rank under
    ``parallel.broadcast_from_rank0``; rank 0 sends the weights after sharding).  A ``custom``
    factory is called with ``device="meta"`` (a factory that builds ``Module().to(device)`` then
    allocates no weights); the diffusers families load as usual and the backbone is moved to
    ``meta`` at once, which frees it before the student and fake-score copies are made (peak: one
    copy per rank instead of three).  The adapter (text encoders, VAE) stays on ``device``.
    """
    from .teachers import registry

    family = registry.get(config.teacher.family)
    if meta:
        if family.builds_on_meta:
            adapter, backbone = load_teacher(config, torch.device("meta"))
        else:
            adapter, backbone = load_teacher(config, device)
        return adapter, backbone.to("meta")
    try:
        adapter, backbone = family.load(config, device)
    except TypeError as exc:  # an unknown key in teacher.options
        if "unexpected keyword argument" in str(exc):
            raise SenseflowError(f"teacher.options: {exc}".replace("from_pretrained() ", "")) from None
        raise
    dtype = DTYPES[config.teacher.dtype]
    param = next(backbone.parameters(), None)
    if param is not None and (param.dtype != dtype or param.device != torch.device(device)):
        backbone = backbone.to(device=device, dtype=dtype)
    return adapter, backbone


def native_first_input_time(config: Config, schedule: NoiseSchedule) -> float | None:
    """``generator.first_input_time`` (unit time) as native time, through the map the anchors take.

    The config checks ``0 < T < anchors[0]`` in unit time; a schedule that rounds (DDPM's integer
    index) can still land on the first anchor or on clean data, which is refused here."""
    unit = config.generator.first_input_time
    if unit is None:
        return None
    native = config.method.native_anchors(schedule, [config.generator.anchors[0], unit])
    first, t = float(native[0]), float(native[1])
    if not schedule.t_clean < t < first:
        raise SenseflowError(f"generator.first_input_time {unit:g} maps to native time {t:g} on this teacher's "
                             f"schedule, not strictly between clean data ({schedule.t_clean:g}) and the first anchor "
                             f"({first:g}): choose a value further from both")
    return t


def build_models(config: Config, device: torch.device, rank: int = 0, meta: bool = False,
                 sharded: bool | None = None) -> DistillationModels:
    """``meta``: teacher, student and fake score without weights (see :func:`load_teacher`); they are
    filled from rank 0 by :func:`senseflow.train.distributed.parallelize` (``broadcast_from_rank0``).
    ``sharded``: the networks will be FSDP2-sharded (multi-process), so a LoRA network keeps its own
    base copy even with ``lora.shared_base`` (:mod:`senseflow.shared_base`); ``None``: whenever a
    process group of more than one rank is initialised.

    Everything initialised at random here (LoRA adapters, discriminator heads) draws from the global RNG seeded
    with ``train.seed``, inside ``fork_rng``: the same seed builds the same networks in every run and on every
    rank, and the caller's global RNG is left as it was."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(derive_seed(config.train.seed, "model-init"))
        return _build_models(config, device, rank, meta, sharded)


def _build_models(config: Config, device: torch.device, rank: int, meta: bool,
                  sharded: bool | None) -> DistillationModels:
    adapter, backbone = load_teacher(config, device, meta=meta)
    teacher = Denoiser(freeze(backbone), adapter)
    from .shared_base import lora_network, wants_shared_base

    if sharded is None:
        import torch.distributed as dist
        sharded = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    sharded = sharded or meta
    student = lora_network(adapter.make_student, backbone, config.generator.lora,
                           wants_shared_base(config.generator.lora, "generator", sharded))
    generator = FewStepGenerator(Denoiser(student, adapter),
                                 config.method.native_anchors(adapter.schedule, config.generator.anchors),
                                 first_input_time=native_first_input_time(config, adapter.schedule))
    fake = Denoiser(lora_network(adapter.make_fake_score, backbone, config.fake_score.lora,
                                 wants_shared_base(config.fake_score.lora, "fake_score", sharded)), adapter)
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
