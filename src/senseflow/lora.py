"""LoRA students and fake scores: only low-rank adapter weights train, the backbone stays frozen.

The adapters are PEFT's LoRA layers, injected the way diffusers' own LoRA trainers inject them
(``ModelMixin.add_adapter`` for diffusers models, :func:`peft.inject_adapter_in_model` for any
other ``nn.Module``), so that

* the trained student's ``state_dict`` has PEFT's key layout (``...to_q.base_layer.weight``,
  ``...to_q.lora_A.default.weight``) and is restored by applying the same :class:`LoRAConfig` to a
  fresh copy of the base and loading strictly (:func:`senseflow.student.load_student` does this);
* the adapter weights export with the family pipeline's ``save_lora_weights`` and reload with the
  stock ``pipe.load_lora_weights(folder)`` (:func:`save_diffusers_lora`).

Wiring (the builder): ``student = shared_base.lora_network(adapter.make_student, backbone,
config.generator.lora, share)`` -- ``make_student`` then :func:`maybe_apply_lora`, and with
``lora.shared_base`` the frozen base tensors ARE the teacher's (:mod:`senseflow.shared_base`) --
and the same for the fake score with ``config.fake_score.lora``.  The trainer collects the parameters that require grad when
it is built, so only the adapter weights get an optimizer state.  SenseFlow's IDA matches the
generator's and fake score's parameters by NAME: give both the same LoRA setting (or none), else
the adapted layers are not aligned.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import torch
from pydantic import Field, field_validator
from torch import nn

from .configbase import StrictModel
from .teachers.base import SenseflowError

#: PEFT's default adapter name (it appears in the trained state dict's keys)
ADAPTER_NAME = "default"
#: file name diffusers' ``save_lora_weights`` writes and ``load_lora_weights`` looks for
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

class LoRAConfig(StrictModel):
    """``generator.lora`` / ``fake_score.lora``: train low-rank adapters instead of the full backbone."""

    rank: int = Field(16, ge=1, le=4096, description="LoRA rank r")
    alpha: float | None = Field(None, gt=0.0, description="LoRA alpha (scale alpha / r); default: alpha = rank")
    target_modules: list[str] | Literal["auto", "all-linear"] = Field(
        "auto", description="module names (suffix match, e.g. to_q, attn.to_out.0); auto: the family's attention "
                            "projections; all-linear: every nn.Linear")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA branch")
    shared_base: bool = Field(
        True, description="single-process runs: this network's frozen base IS the teacher's weights (one copy "
                          "of the base for teacher, generator and fake score, not three; same maths); false = "
                          "its own copy.  Multi-process (FSDP2) runs always keep a copy (docs/performance.md)")

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v or any(not isinstance(x, str) or not x.strip() for x in v):
                raise ValueError("target_modules must be a non-empty list of module names, 'auto' or 'all-linear'")
        return v

    @property
    def resolved_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def adapter_settings(self) -> dict[str, Any]:
        """The settings that shape the adapters (IDA needs the generator's and fake score's to agree)."""
        return self.model_dump(exclude={"shared_base"})


def same_adapters(a: LoRAConfig | None, b: LoRAConfig | None) -> bool:
    """Whether two networks get the same adapters (``shared_base`` aside): IDA then matches every adapter by name."""
    if a is None or b is None:
        return a is b
    return a.adapter_settings() == b.adapter_settings()


# -------------------------------------------------------------------------------------------------
# applying
# -------------------------------------------------------------------------------------------------
def _linear_names(module: nn.Module) -> list[str]:
    return [name for name, sub in module.named_modules() if name and isinstance(sub, nn.Linear)]


def resolve_targets(backbone: nn.Module, target_modules: Sequence[str] | str = "auto") -> list[str]:
    """The ``target_modules`` list for ``backbone`` (``auto`` / ``all-linear`` expanded); one-line error if none match."""
    names = _linear_names(backbone)
    if target_modules == "all-linear":
        targets = sorted(names)
    elif target_modules == "auto":
        from .teachers.registry import family_of_backbone_class

        family = family_of_backbone_class(type(backbone).__name__)   # its descriptor's lora_targets
        if family is not None and family.lora_targets:
            targets = list(family.lora_targets)
        else:       # a user's own network: every linear layer
            targets = sorted(names)
    elif isinstance(target_modules, str):
        targets = [target_modules]
    else:
        targets = list(target_modules)
    if not targets:
        raise SenseflowError(f"{type(backbone).__name__} has no nn.Linear layers to put LoRA adapters on")
    matched = [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]
    if not matched:
        raise SenseflowError(f"lora.target_modules {targets[:4]} match no nn.Linear in {type(backbone).__name__} "
                             f"(e.g. {sorted(names)[:4]}): use module names such as to_q / attn.to_out.0")
    return targets


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def count_lora_parameters(backbone: nn.Module, rank: int,
                          target_modules: Sequence[str] | str = "auto") -> tuple[int, int]:
    """``(elements, tensors)`` of the LoRA adapters :func:`apply_lora` would add to ``backbone`` (no PEFT needed).

    Each adapted ``nn.Linear(in, out)`` gets ``A: rank x in`` and ``B: out x rank``; works on a
    ``meta``-device build (the memory estimate counts a 12B model without allocating it).
    """
    targets = resolve_targets(backbone, target_modules)
    elements = tensors = 0
    for name, sub in backbone.named_modules():
        if name and isinstance(sub, nn.Linear) and _matches(name, targets):
            elements += rank * (sub.in_features + sub.out_features)
            tensors += 2
    return elements, tensors


def peft_available() -> bool:
    """Whether PEFT (the ``[lora]`` extra) can be imported; plain students never need it."""
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def require_peft(what: str = "LoRA adapters") -> None:
    """One line naming the extra to install when PEFT is missing."""
    if not peft_available():
        raise SenseflowError(f"{what} need the peft package, which is not installed: pip install 'senseflow[lora]'")


def _peft_config(cfg: LoRAConfig, targets: list[str]):
    require_peft()
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.resolved_alpha, target_modules=targets, lora_dropout=cfg.dropout,
                      init_lora_weights=True)


def apply_lora(backbone: nn.Module, rank: int | LoRAConfig = 16, alpha: float | None = None,
               target_modules: Sequence[str] | str = "auto", dropout: float = 0.0) -> nn.Module:
    """Inject LoRA adapters into ``backbone`` IN PLACE and freeze everything else; returns ``backbone``.

    ``rank`` may be a :class:`LoRAConfig` (then the other arguments are ignored).  ``B`` starts at
    zero, so the adapted network initially equals the base.  Afterwards exactly the ``lora_A`` /
    ``lora_B`` weights require grad.
    """
    cfg = rank if isinstance(rank, LoRAConfig) else LoRAConfig(
        rank=rank, alpha=alpha, target_modules=list(target_modules) if not isinstance(target_modules, str)
        else target_modules, dropout=dropout)
    require_peft()
    if has_lora(backbone):
        raise SenseflowError(f"{type(backbone).__name__} already has LoRA adapters")
    targets = resolve_targets(backbone, cfg.target_modules)
    peft_cfg = _peft_config(cfg, targets)
    backbone.requires_grad_(False)
    try:
        if hasattr(backbone, "add_adapter") and hasattr(backbone, "_hf_peft_config_loaded"):
            backbone.add_adapter(peft_cfg, adapter_name=ADAPTER_NAME)       # diffusers ModelMixin
        else:
            from peft import inject_adapter_in_model
            inject_adapter_in_model(peft_cfg, backbone, adapter_name=ADAPTER_NAME)
            object.__setattr__(backbone, "_senseflow_peft_config", {ADAPTER_NAME: peft_cfg})
    except (ValueError, TypeError) as exc:
        raise SenseflowError(f"cannot apply LoRA to {type(backbone).__name__}: {' '.join(str(exc).split())[:200]}") \
            from None
    for name, p in backbone.named_parameters():
        p.requires_grad_(is_lora_name(name))
    return backbone


def maybe_apply_lora(backbone: nn.Module, cfg: LoRAConfig | Mapping[str, Any] | None) -> nn.Module:
    """The builder's hook: ``backbone`` unchanged when ``cfg`` is ``None``, else :func:`apply_lora`."""
    if cfg is None:
        return backbone
    if not isinstance(cfg, LoRAConfig):
        cfg = LoRAConfig.model_validate(dict(cfg))
    return apply_lora(backbone, cfg)


# -------------------------------------------------------------------------------------------------
# inspecting
# -------------------------------------------------------------------------------------------------
def is_lora_name(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or name.startswith(("lora_A.", "lora_B.")) \
        or ".lora_embedding_" in name or ".lora_magnitude_vector" in name


def is_lora_state_dict(keys: Iterable[str]) -> bool:
    return any(is_lora_name(k) for k in keys)


def has_lora(module: nn.Module) -> bool:
    if not peft_available():  # without PEFT no module can hold PEFT layers
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in module.named_parameters() if is_lora_name(n)]


def _peft_config_of(module: nn.Module):
    cfgs = getattr(module, "peft_config", None) or getattr(module, "_senseflow_peft_config", None)
    if not cfgs or ADAPTER_NAME not in cfgs:
        return None
    return cfgs[ADAPTER_NAME]


def lora_meta(module: nn.Module) -> dict[str, Any] | None:
    """The :class:`LoRAConfig` of an adapted module as a plain dict (for ``student.json``), or ``None``."""
    cfg = _peft_config_of(module)
    if cfg is None:
        return None
    targets = cfg.target_modules
    targets = sorted(targets) if isinstance(targets, (set, frozenset, list, tuple)) else targets
    return {"rank": int(cfg.r), "alpha": float(cfg.lora_alpha), "target_modules": targets,
            "dropout": float(cfg.lora_dropout)}


def config_from_state_dict(state: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> LoRAConfig:
    """The :class:`LoRAConfig` that recreates a saved adapted backbone (``meta`` wins; else inferred).

    Without ``meta`` the rank is read from the ``lora_A`` shapes, the targets are the adapted modules'
    full names, and alpha is assumed equal to the rank (the default) -- with a warning.
    """
    if meta:
        return LoRAConfig.model_validate(dict(meta))
    ranks: set[int] = set()
    targets: set[str] = set()
    marker = f".lora_A.{ADAPTER_NAME}.weight"
    for key, value in state.items():
        if key.endswith(marker):
            ranks.add(int(value.shape[0]))
            targets.add(key[: -len(marker)])
    if not ranks:
        raise SenseflowError("the student weights hold no LoRA adapters (no *.lora_A.default.weight keys)")
    if len(ranks) != 1:
        raise SenseflowError(f"the student's LoRA adapters have different ranks {sorted(ranks)}: record the LoRA "
                             f"config as 'lora' in student.json")
    warnings.warn("student.json records no 'lora' settings: assuming alpha = rank", stacklevel=2)
    return LoRAConfig(rank=ranks.pop(), target_modules=sorted(targets))


# -------------------------------------------------------------------------------------------------
# merging and exporting
# -------------------------------------------------------------------------------------------------
def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and remove the LoRA layers (in place); returns ``module``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(name, sub) for name, sub in module.named_modules() if isinstance(sub, BaseTunerLayer)]
    for name, layer in layers:
        layer.merge(safe_merge=False)
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())
    for attr in ("peft_config", "_senseflow_peft_config"):
        if attr in module.__dict__:
            del module.__dict__[attr]
    if getattr(module, "_hf_peft_config_loaded", None):
        module._hf_peft_config_loaded = False
    return module


def adapter_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in PEFT's saved layout (``...to_q.lora_A.weight``, no adapter name)."""
    from peft import get_peft_model_state_dict

    if not has_lora(module):
        raise SenseflowError(f"{type(module).__name__} has no LoRA adapters to export")
    state = get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_diffusers_lora(module: nn.Module, folder: str | os.PathLike, family: str,
                        weight_name: str = LORA_WEIGHT_NAME) -> Path:
    """Write the adapters with the family pipeline's ``save_lora_weights`` (reload: ``pipe.load_lora_weights``).

    The LoRA settings travel in the file's metadata, so alpha != rank reloads correctly.
    """
    import diffusers

    from .teachers import registry

    desc = registry.find(family)
    if desc is None or desc.pipeline_class is None:
        supported = sorted(d.name for d in registry.descriptors() if d.pipeline_class is not None)
        raise SenseflowError(f"LoRA export to diffusers supports {supported}, not {family!r}")
    pipe_name, component = desc.pipeline_class, desc.backbone_folder   # save_lora_weights' <component>_lora_layers
    state = adapter_state_dict(module)
    meta = lora_meta(module)
    peft_cfg = _peft_config_of(module)
    metadata = None
    if peft_cfg is not None:
        metadata = json.loads(json.dumps(peft_cfg.to_dict(), default=lambda o: sorted(o) if isinstance(
            o, (set, frozenset)) else str(o)))
    elif meta is not None:
        metadata = {"r": meta["rank"], "lora_alpha": meta["alpha"], "target_modules": meta["target_modules"]}
    pipe_cls = getattr(diffusers, pipe_name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = {f"{component}_lora_layers": state, f"{component}_lora_adapter_metadata": metadata}
    pipe_cls.save_lora_weights(str(folder), weight_name=weight_name, safe_serialization=True, **kwargs)
    return folder / weight_name
