"""The teacher-family registry: one :class:`FamilyDescriptor` per family, defined in the family's own file.

A family's knowledge used to be spread over tables in ``config.py``, ``build.py``, ``lora.py``,
``teachers/loading.py``, ``generate.py``, ``student.py`` and ``export_diffusers.py``; adding a
teacher meant editing all of them.  Now each adapter file (``teachers/<family>.py``) defines
``FAMILY = FamilyDescriptor(...)``: its name, backbone and pipeline classes, how to load it from a
run config, its LoRA target modules, how its stock pipeline draws noise and how a student exports
to that pipeline.  Everything else asks this registry (:func:`get`, :func:`names`,
:func:`family_of_backbone_class`, :func:`family_of_pipeline`).

Where descriptors come from:

* the built-in families (:data:`BUILTIN_MODULES`: imported lazily, on first use of that family);
* the entry-point group ``senseflow.families`` (:data:`ENTRY_POINT_GROUP`): a third-party package
  adds a family without editing senseflow by declaring, in its ``pyproject.toml``,
  ``[project.entry-points."senseflow.families"] myfam = "mypkg.myfam:FAMILY"`` (the object may be
  a :class:`FamilyDescriptor`, a module holding ``FAMILY``, or a callable returning a descriptor);
* :func:`register` (tests, notebooks, :func:`senseflow.build.register_family`).

Family names are known WITHOUT importing anything (built-ins + entry-point names), so config
validation stays cheap.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .base import SenseflowError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from ..config import Config
    from .base import ModelAdapter

ENTRY_POINT_GROUP = "senseflow.families"
#: built-in family -> the module that defines its ``FAMILY`` descriptor
BUILTIN_MODULES: dict[str, str] = {
    "toy": "senseflow.toy.family",
    "sd3": "senseflow.teachers.sd3",
    "flux": "senseflow.teachers.flux",
    "flux2": "senseflow.teachers.flux2",
    "sdxl": "senseflow.teachers.sdxl",
    "sana": "senseflow.teachers.sana",
    "custom": "senseflow.teachers.custom",
    "qwenimage": "senseflow.teachers.qwenimage",
    "zimage": "senseflow.teachers.zimage",
}

TeacherLoader = Callable[["Config", "torch.device"], "tuple[ModelAdapter, nn.Module]"]


@dataclass(frozen=True)
class NoiseRecipe:
    """How the family's stock pipeline draws noise (see :mod:`senseflow.generate`).

    ``renoise``: draws one stochastic step's noise in the pipeline's own layout,
    ``renoise(draw, latent_shape, dtype) -> [1, *latent_shape]`` where ``draw(shape, dtype)`` takes
    from the image's stream (FLUX: the packed token layout, then unpacked); ``None``: latent-shaped.
    """

    stream: str            # "global": the device's global RNG; "generator": the pipeline's CPU generator
    renoise: Callable[..., Any] | None = None
    renoise_float32: bool = True   # FlowMatch upcasts the sample (float32 draws); LCM draws in the model dtype

    @property
    def packed(self) -> bool:
        return self.renoise is not None


DEFAULT_NOISE = NoiseRecipe("generator")


@dataclass(frozen=True)
class SingleFileRecipe:
    """The family's original single-file layout (ComfyUI / A1111 / the model's own repo), ``--format single-file``.

    ``to_original(state, config) -> dict``: the backbone's diffusers state dict (and its config) in the
    original key layout, the exact inverse of the converter diffusers' ``<model_class>.from_single_file``
    applies (``diffusers/loaders/single_file_utils.py``); it raises ``SenseflowError`` for a weight the
    layout has no place for.  ``loader``: the diffusers class that reads the file back;
    ``where``: one line on where UIs load it (shown in the export's README).

    ``checkpoint(backbone_original, components) -> dict`` (optional, ``--format checkpoint``): the
    whole-model file (backbone + the teacher's ``checkpoint_components``, e.g. text encoders and VAE)
    that ``checkpoint_loader.from_single_file`` (a pipeline class) reads; ``checkpoint_where`` as ``where``.
    """

    to_original: Callable[..., dict[str, Any]]
    loader: str
    where: str = ""
    checkpoint: Callable[..., dict[str, Any]] | None = None
    checkpoint_components: tuple[str, ...] = ()
    checkpoint_loader: str | None = None
    checkpoint_where: str = ""


@dataclass(frozen=True)
class KohyaLoraRecipe:
    """The family's kohya-ss / A1111 LoRA key layout, ``--format kohya-lora``.

    ``to_kohya(pairs, config) -> dict``: the student's adapters, ``pairs[module] = (down, up, scale)``
    with ``delta W = scale * up @ down`` (diffusers module names), as kohya tensors
    (``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``) that the family pipeline's
    own ``load_lora_weights`` converts back.  ``where``: one line on where UIs load it.
    """

    to_kohya: Callable[..., dict[str, Any]]
    where: str = ""


@dataclass(frozen=True)
class ExportRecipe:
    """How a student becomes a folder the family's stock diffusers pipeline runs (``senseflow export``).

    * ``scheduler(student, sampler, teacher_scheduler_config)``: the stock scheduler whose step IS
      the student's sampler;
    * ``step_kwargs(student, sampler)``: the call's step arguments (``sigmas=`` / ``timesteps=``);
    * ``call_kwargs(student, call)``: adds the family's other arguments to ``call`` in place
      (after the common ``guidance_scale``/``height``/``width``);
    * ``check(student)``: refuses (one line) a student the stock pipeline cannot reproduce;
    * ``seeding``: ``"global"`` (the pipeline draws from the global RNG) or ``"generator"``;
    * ``single_file`` / ``kohya_lora``: the original layouts UIs load (``None``: the family has none
      that diffusers reads back, so ``senseflow export`` refuses that format).
    """

    scheduler: Callable[..., Any]
    step_kwargs: Callable[..., dict[str, Any]]
    call_kwargs: Callable[..., None] | None = None
    check: Callable[..., None] | None = None
    seeding: str = "generator"
    single_file: SingleFileRecipe | None = None
    kohya_lora: KohyaLoraRecipe | None = None


@dataclass(frozen=True)
class BenchRecipe:
    """The family's part of a ``senseflow bench`` preset (:class:`senseflow.bench.presets.Preset`).

    Each callable takes the preset first: ``resolution_multiple(preset)``,
    ``image_tokens(preset, resolution)``, ``make_adapter(preset, resolution, device, dtype)`` (the real
    adapter on latent-space inputs and random cached prompts), ``backbone_inputs(preset, x, t, cond,
    resolution, device, dtype, config)`` (one backbone forward's kwargs, as the adapter builds them),
    ``student_config(preset)`` (the trainable copies' config).  ``model_cls`` / ``from_config``: how
    the backbone is built (default: ``getattr(diffusers, preset.model_class).from_config``).
    """

    resolution_multiple: Callable[..., int]
    image_tokens: Callable[..., int]
    make_adapter: Callable[..., Any]
    backbone_inputs: Callable[..., dict[str, Any]]
    student_config: Callable[..., dict[str, Any]] | None = None
    conditioning: Callable[..., Any] | None = None   # (preset, batch, generator, device, dtype); default: embeds
    method_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)   # method -> config defaults
    model_cls: Callable[[], Any] | None = None
    from_config: bool = True


@dataclass(frozen=True)
class FamilyDescriptor:
    """Everything senseflow needs to know about one teacher family (see module docstring)."""

    name: str
    load: TeacherLoader                        # (config, device) -> (adapter, teacher backbone)
    label: str = ""
    backbone_classes: tuple[str, ...] = ()    # diffusers class names of the backbone
    pipeline_class: str | None = None          # the stock diffusers pipeline
    pipeline_prefixes: tuple[str, ...] = ()   # model_index.json ``_class_name`` prefixes that mean this family
    backbone_folder: str = "transformer"      # the pipeline component (and subfolder) holding the backbone
    lora_targets: tuple[str, ...] = ()        # ``target_modules: auto`` (diffusers' LoRA scripts' choice)
    noise: NoiseRecipe = DEFAULT_NOISE
    export: ExportRecipe | None = None
    bench: BenchRecipe | None = None
    factory: bool = False                      # built by ``teacher.factory`` (paths.teacher need not be a folder)
    builds_on_meta: bool = False               # the loader itself can build the backbone on the meta device
    reads_folders_of: tuple[str, ...] = ()    # other families whose pipeline folders this one loads (toy: sd3)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def exports_to_diffusers(self) -> bool:
        return self.export is not None and self.pipeline_class is not None


_REGISTRY: dict[str, FamilyDescriptor] = {}
_ENTRY_POINTS: dict[str, Any] | None = None


def register(descriptor: FamilyDescriptor) -> FamilyDescriptor:
    """Add (or replace) a family; returns the descriptor."""
    if not isinstance(descriptor, FamilyDescriptor):
        raise TypeError(f"register() takes a FamilyDescriptor, got {type(descriptor).__name__}")
    _REGISTRY[descriptor.name] = descriptor
    return descriptor


def registered(name: str) -> FamilyDescriptor | None:
    """The descriptor registered so far under ``name`` (imports nothing)."""
    return _REGISTRY.get(name)


def _entry_points() -> dict[str, Any]:
    global _ENTRY_POINTS
    if _ENTRY_POINTS is None:
        from importlib.metadata import entry_points

        _ENTRY_POINTS = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return _ENTRY_POINTS


def names() -> list[str]:
    """Every family name senseflow can load (nothing is imported): built-ins, entry points, registered."""
    out = list(BUILTIN_MODULES)
    for name in [*_entry_points(), *_REGISTRY]:
        if name not in out:
            out.append(name)
    return out


def _as_descriptor(obj: Any, where: str) -> FamilyDescriptor:
    if isinstance(obj, FamilyDescriptor):
        return obj
    fam = getattr(obj, "FAMILY", None)
    if isinstance(fam, FamilyDescriptor):
        return fam
    if callable(obj):
        fam = obj()
        if isinstance(fam, FamilyDescriptor):
            return fam
    raise SenseflowError(f"{where} does not provide a senseflow FamilyDescriptor (FAMILY)")


def _import(name: str) -> None:
    module = BUILTIN_MODULES.get(name)
    if module is not None:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module.startswith(exc.name):
                raise
            return
        fam = getattr(mod, "FAMILY", None)
        if isinstance(fam, FamilyDescriptor) and name not in _REGISTRY:
            register(fam)
        return
    ep = _entry_points().get(name)
    if ep is not None:
        desc = _as_descriptor(ep.load(), f"entry point {ENTRY_POINT_GROUP}:{name} ({ep.value})")
        if desc.name != name:
            raise SenseflowError(f"entry point {ENTRY_POINT_GROUP}:{name} ({ep.value}) defines family "
                                 f"{desc.name!r}; the entry point's name must be the family's name")
        register(desc)


def get(name: str) -> FamilyDescriptor:
    """The descriptor of family ``name``; one-line error listing the known families."""
    if name not in _REGISTRY:
        _import(name)
    if name not in _REGISTRY:
        known = ", ".join(names())
        if name in names():
            raise SenseflowError(f"teacher.family {name!r} is not available in this installation of senseflow")
        raise SenseflowError(f"unknown teacher family {name!r}; known families: {known}")
    return _REGISTRY[name]


def find(name: str) -> FamilyDescriptor | None:
    """Like :func:`get`, but ``None`` for an unknown family."""
    try:
        return get(name)
    except SenseflowError:
        return None


def descriptors() -> list[FamilyDescriptor]:
    """Every loadable family's descriptor (imports each family's module)."""
    return [d for d in (find(n) for n in names()) if d is not None]


def family_of_backbone_class(class_name: str | None) -> FamilyDescriptor | None:
    """The family whose backbone is the diffusers class ``class_name`` (None if none)."""
    if not class_name:
        return None
    return next((d for d in descriptors() if class_name in d.backbone_classes), None)


def family_of_pipeline(class_name: str | None) -> str | None:
    """The family whose pipeline class ``model_index.json``'s ``_class_name`` names (longest prefix wins)."""
    if not class_name:
        return None
    best: tuple[int, str] | None = None
    for d in descriptors():
        for prefix in d.pipeline_prefixes:
            if class_name.startswith(prefix) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), d.name)
    return None if best is None else best[1]


def diffusers_families() -> tuple[str, ...]:
    """Families whose students export to a stock diffusers pipeline."""
    return tuple(d.name for d in descriptors() if d.exports_to_diffusers)
