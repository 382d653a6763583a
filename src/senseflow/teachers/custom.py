"""Distil your own model: wrap ANY ``nn.Module`` that predicts velocity, eps, v or x0.

The backbone is called as ``backbone(x_t, t_net, **cond.tensors)`` (plus ``guidance=g`` when the
model has a guidance embedding), where ``t_net = time_scale * t`` in the schedule's native time.
Prompt encoding is any callable ``list[str] -> dict[str, Tensor]``.

From a YAML config, point ``teacher.factory`` at ``"my_package.my_module:build"``, a function
``build(path, resolution, device, **options) -> (ModelAdapter, nn.Module)``; :func:`tiny_example` is a
complete, runnable example of such a factory.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..schedules import NoiseSchedule, RectifiedFlow
from . import registry
from .base import Conditioning, FeatureTap, ModelAdapter, SenseflowError

PromptEncoder = Callable[[Sequence[str]], Mapping[str, Tensor]]


class CallableAdapter(ModelAdapter):
    """Adapter for a user network with a plain ``(x_t, t, **cond)`` signature."""

    def __init__(self, schedule: NoiseSchedule, latent_shape: Sequence[int], *, time_scale: float = 1.0,
                 prompt_encoder: PromptEncoder | None = None, guidance_kwarg: str | None = None,
                 decode: Callable[[Tensor], Tensor] | None = None, encode: Callable[[Tensor], Tensor] | None = None,
                 blocks: Sequence[str] = (), output_norm: str | None = None, images: bool | None = None,
                 feature_tap: FeatureTap | None = None) -> None:
        """``images``: whether ``decode`` returns pictures (sample grids, PNG output).  ``None``
        decides from the shapes: with a ``decode`` function, yes (its contract is images); without
        one, the latent itself must look like a picture, ``(1|3, H, W)`` with ``H, W > 1`` -- so a
        ``(D,)`` or ``(D, 1, 1)`` model gets raw latents instead of a crash."""
        self.schedule = schedule
        self._latent_shape = tuple(int(s) for s in latent_shape)
        self.time_scale = float(time_scale)
        self.prompt_encoder = prompt_encoder
        self.guidance_kwarg = guidance_kwarg
        self.guidance_kinds = frozenset({"cfg", "embedded"} if guidance_kwarg else {"cfg"})
        self._decode, self._encode = decode, encode
        self._blocks = list(blocks)
        self._output_norm = output_norm
        self._feature_tap = feature_tap
        self._uncond: Conditioning | None = None
        self._images = images

    def predict(self, backbone: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning,
                embedded_guidance: Tensor | None = None) -> Tensor:
        param = next(backbone.parameters(), None)
        dtype = x_t.dtype if param is None else param.dtype  # pure-bf16 students take bf16 inputs
        kwargs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in cond.tensors.items()}
        if embedded_guidance is not None:
            kwargs[self.guidance_kwarg] = embedded_guidance.to(dtype)
        out = backbone(x_t.to(dtype), (t * self.time_scale).to(dtype), **kwargs)
        return out.to(x_t.dtype)

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        if self.prompt_encoder is None:
            raise SenseflowError("this custom teacher has no prompt encoder: pass prompt_encoder= to CallableAdapter")
        with torch.no_grad():
            return Conditioning(dict(self.prompt_encoder(list(prompts))))

    def unconditional(self, batch_size: int) -> Conditioning:
        if self._uncond is None:
            self._uncond = self.encode_prompts([""])
        return self._uncond.expand(batch_size)

    def latent_shape(self) -> tuple[int, ...]:
        return self._latent_shape

    def decode(self, latents: Tensor) -> Tensor:
        return latents if self._decode is None else self._decode(latents)

    def encode(self, images: Tensor) -> Tensor:
        return images if self._encode is None else self._encode(images)

    def decodes_to_images(self) -> bool:
        if self._images is not None:
            return bool(self._images)
        if self._decode is not None:
            return True
        shape = self._latent_shape
        return len(shape) == 3 and shape[0] in (1, 3) and shape[1] > 1 and shape[2] > 1

    def block_names(self, backbone: nn.Module) -> list[str]:
        return list(self._blocks)

    def output_norm_name(self, backbone: nn.Module) -> str | None:
        return self._output_norm

    def feature_tap(self, backbone: nn.Module, layer: str | None = None) -> FeatureTap | None:
        """``feature_tap=`` as given (DMD2's GAN head); ``method.gan_head.feature_*`` can name one from YAML."""
        if layer is not None and self._feature_tap is not None and layer != self._feature_tap.name:
            return None
        return self._feature_tap


def load_factory(spec: str) -> Callable[..., tuple[ModelAdapter, nn.Module]]:
    """Import ``"package.module:function"``; a one-line error if it does not resolve."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SenseflowError(f"teacher.factory must look like 'package.module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SenseflowError(f"teacher.factory: cannot import {module_name!r} ({exc})") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise SenseflowError(f"teacher.factory: {module_name!r} has no callable {attr!r}")
    return fn


def check_factory_call(factory: Callable[..., object], spec: str, kwargs: Mapping[str, object]) -> None:
    """One-line error, before the factory runs, when it cannot take ``build(path, resolution, device,
    **teacher.options)`` -- a missing parameter or an option it does not know -- naming both."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check ahead of the call
        return
    try:
        sig.bind(**kwargs)
    except TypeError:
        params = sig.parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        keyword = {n for n, p in params.items() if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                             inspect.Parameter.KEYWORD_ONLY)}
        known = ", ".join(n for n in params if n in keyword) or "none"
        for name in kwargs:
            if name not in keyword and not takes_any:
                where = "teacher.options" if name not in ("path", "resolution", "device", "shift") else "senseflow"
                raise SenseflowError(f"teacher.factory {spec!r} takes no argument {name!r} (passed by {where}; "
                                     f"it takes: {known}): remove the option or add the parameter to the "
                                     f"factory") from None
        missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in kwargs
                   and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
        raise SenseflowError(f"teacher.factory {spec!r} needs argument {missing[0] if missing else '?'!r}, which "
                             f"senseflow does not pass: a factory is build(path, resolution, device, **options); "
                             f"give it a default or set it in teacher.options") from None


def call_factory(fn: Callable[..., tuple[ModelAdapter, nn.Module]], spec: str,
                 kwargs: dict) -> tuple[ModelAdapter, nn.Module]:
    """Call a factory, with a wrong signature or a wrong return value reported as one line.

    The arguments are bound against the signature BEFORE the call (:func:`check_factory_call`), so a
    ``TypeError`` raised inside a correct factory stays a traceback (a bug in the user's code, not a
    config problem).
    """
    check_factory_call(fn, spec, kwargs)
    result = fn(**kwargs)
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], ModelAdapter)
            and isinstance(result[1], nn.Module)):
        raise SenseflowError(f"teacher.factory {spec!r} must return (ModelAdapter, nn.Module), got "
                             f"{type(result).__name__}")
    return result


# -------------------------------------------------------------------------------------------------
# A tiny, self-contained example teacher (random weights): what a user model looks like.
# -------------------------------------------------------------------------------------------------
class HashedWordEncoder:
    """Bag-of-words prompt embedding via hashed random word vectors (no tokenizer files needed)."""

    def __init__(self, dim: int = 32, seed: int = 0) -> None:
        self.dim, self.seed = dim, seed

    def word_vector(self, word: str) -> Tensor:
        h = int.from_bytes(hashlib.sha256(f"{self.seed}/{word}".encode()).digest()[:8], "little")
        return torch.randn(self.dim, generator=torch.Generator().manual_seed(h & ((1 << 63) - 1)))

    def __call__(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        out = torch.zeros(len(prompts), self.dim)
        for i, p in enumerate(prompts):
            words = p.lower().split()
            if words:
                out[i] = torch.stack([self.word_vector(w) for w in words]).mean(0)
        return {"text": out}


class TinyConditionalNet(nn.Module):
    """A small conv net ``(x_t, t, text) -> prediction`` with FiLM conditioning on time and text."""

    def __init__(self, channels: int = 3, width: int = 32, text_dim: int = 32, depth: int = 3) -> None:
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.cond = nn.Sequential(nn.Linear(text_dim + 16, width * 2), nn.SiLU(), nn.Linear(width * 2, 2 * width))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.GroupNorm(4, width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1)) for _ in range(depth))
        self.norm_out = nn.GroupNorm(4, width)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, text: Tensor) -> Tensor:
        freqs = torch.exp(torch.arange(8, device=x.device, dtype=x.dtype) * (-math.log(1000.0) / 8))
        ang = t.to(x.dtype)[:, None] * freqs[None] * 1000.0
        temb = torch.cat([ang.sin(), ang.cos()], dim=1)
        scale, shift = self.cond(torch.cat([text.to(x.dtype), temb], dim=1)).chunk(2, dim=1)
        h = self.inp(x) * (1 + scale[..., None, None]) + shift[..., None, None]
        for block in self.blocks:
            h = h + block(h)
        return self.out(torch.nn.functional.silu(self.norm_out(h)))


def tiny_example(path: str | None = None, resolution: int = 16, device: torch.device | str = "cpu", seed: int = 0,
                 shift: float = 1.0) -> tuple[CallableAdapter, TinyConditionalNet]:
    """A randomly initialised tiny velocity teacher in pixel space (examples and tests only).

    It has the factory signature ``(path, resolution, device, **options)``; ``path`` is unused.
    """
    torch.manual_seed(seed)
    backbone = TinyConditionalNet().to(device)
    adapter = CallableAdapter(RectifiedFlow(shift=shift), (3, resolution, resolution),
                              prompt_encoder=HashedWordEncoder(seed=seed),
                              blocks=[f"blocks.{i}" for i in range(len(backbone.blocks))], output_norm="norm_out")
    return adapter, backbone


class TinyVectorNet(nn.Module):
    """A small MLP ``(x_t, t, text) -> velocity`` on flat vectors ``[B, D]`` (or ``[B, D, 1, 1]``)."""

    def __init__(self, dim: int = 8, width: int = 64, text_dim: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(dim + text_dim + 16, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(width, width)) for _ in range(2))
        self.norm_out = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)

    def forward(self, x: Tensor, t: Tensor, text: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        freqs = torch.exp(torch.arange(8, device=x.device, dtype=x.dtype) * (-math.log(1000.0) / 8))
        ang = t.to(x.dtype)[:, None] * freqs[None] * 1000.0
        h = self.inp(torch.cat([flat, text.to(x.dtype), ang.sin(), ang.cos()], dim=1))
        for block in self.blocks:
            h = h + block(h)
        return self.out(torch.nn.functional.silu(self.norm_out(h))).reshape(x.shape)


def tiny_vector_example(path: str | None = None, resolution: int = 16, device: torch.device | str = "cpu",
                        dim: int = 8, width: int = 64, image_shaped: bool = False, seed: int = 0,
                        shift: float = 1.0) -> tuple[CallableAdapter, TinyVectorNet]:
    """A randomly initialised velocity teacher whose samples are vectors, not pictures (examples, tests).

    Latent shape ``(dim,)``, or ``(dim, 1, 1)`` with ``image_shaped``; ``resolution`` and ``path``
    are unused.  ``dim``, ``width``, ``image_shaped`` and ``seed`` come from ``teacher.options``.
    Its adapter answers ``decodes_to_images() == False``: runs save raw latents, not grids.
    """
    torch.manual_seed(seed)
    backbone = TinyVectorNet(dim=dim, width=width).to(device)
    shape = (dim, 1, 1) if image_shaped else (dim,)
    adapter = CallableAdapter(RectifiedFlow(shift=shift), shape, prompt_encoder=HashedWordEncoder(seed=seed),
                              blocks=[f"blocks.{i}" for i in range(len(backbone.blocks))], output_norm="norm_out")
    return adapter, backbone


# -------------------------------------------------------------------------------------------------
# the family descriptor (senseflow.teachers.registry)
# -------------------------------------------------------------------------------------------------
# -- senseflow bench (moved from bench/presets.py Preset methods) ---------------------------------------
def _bench_multiple(preset) -> int:
    return 1


def _bench_tokens(preset, resolution: int) -> int:
    side = resolution // preset.vae_factor
    return side * side


def _bench_adapter(preset, resolution: int, device: torch.device, dtype: torch.dtype) -> CallableAdapter:
    blocks = [f"blocks.{i}" for i in range(int(preset.config.get("depth", 3)))]
    return CallableAdapter(RectifiedFlow(shift=1.0), preset.latent_shape(resolution),
                           prompt_encoder=HashedWordEncoder(dim=preset.text_dim), blocks=blocks,
                           output_norm="norm_out")


def _bench_inputs(preset, x, t, cond, resolution, device, dtype, config) -> dict:
    return {"x": x, "t": t.to(dtype), "text": cond.tensors["text"]}


def _bench_conditioning(preset, batch: int, g: torch.Generator, device, dtype) -> Conditioning:
    return Conditioning({"text": torch.randn(batch, preset.text_dim, generator=g).to(device, dtype)})


def load_from_config(config, device: torch.device) -> tuple[ModelAdapter, nn.Module]:
    """``teacher.factory`` called with the path, resolution, device, shift and ``teacher.options`` (moved from
    ``build._load_custom``)."""
    from ..config import BUILTIN_PREFIX

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


#: a factory called with ``device="meta"`` builds its network without weights (broadcast_from_rank0)
FAMILY = registry.FamilyDescriptor(
    name="custom", label="custom", load=load_from_config, factory=True, builds_on_meta=True,
    bench=registry.BenchRecipe(_bench_multiple, _bench_tokens, _bench_adapter, _bench_inputs,
                               conditioning=_bench_conditioning, model_cls=lambda: TinyConditionalNet,
                               from_config=False),
)
