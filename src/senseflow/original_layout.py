"""Building blocks for the families' original-layout exports (single-file checkpoints, kohya LoRAs).

diffusers only ships original -> diffusers converters (``loaders/single_file_utils.py``,
``loaders/lora_conversion_utils.py``).  Each family writes the inverse in its own file
(``teachers/<family>.py``, :class:`~senseflow.teachers.registry.SingleFileRecipe` /
:class:`~senseflow.teachers.registry.KohyaLoraRecipe`) with these helpers, which make a mapping
either complete or a one-line error: every diffusers weight must be placed exactly once
(:meth:`KeyMap.finish`), so a variant the original layout cannot hold is refused instead of being
written with weights silently missing.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch

from .teachers.base import SenseflowError

#: one LoRA adapter: ``delta W = scale * up @ down`` (``down``: [rank, in], ``up``: [out, rank])
LoraPair = tuple[torch.Tensor, torch.Tensor, float]


class KeyMap:
    """A diffusers state dict being moved into another layout: ``take`` each key once, then ``finish``."""

    def __init__(self, state: Mapping[str, torch.Tensor], what: str) -> None:
        self.state = dict(state)
        self.what = what
        self.out: dict[str, torch.Tensor] = {}

    def has(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise SenseflowError(f"{self.what}: the student has no {key!r}, which the original layout needs "
                                 f"(a backbone variant this layout does not describe; use --format diffusers)")
        return self.state.pop(key)

    def put(self, key: str, value: torch.Tensor) -> None:
        self.out[key] = value

    def move(self, src: str, dst: str) -> None:
        """``dst`` <- ``src`` (``.weight`` and ``.bias`` when ``src`` names a module that has them)."""
        if src in self.state:
            self.put(dst, self.take(src))
            return
        found = False
        for suffix in (".weight", ".bias"):
            if src + suffix in self.state:
                self.put(dst + suffix, self.take(src + suffix))
                found = True
        if not found:
            self.take(src + ".weight")   # raises the one-line error

    def move_if(self, src: str, dst: str) -> bool:
        """:meth:`move` when the module exists; returns whether it did."""
        if any(k in self.state for k in (src, src + ".weight", src + ".bias")):
            self.move(src, dst)
            return True
        return False

    def fuse(self, srcs: Sequence[str], dst: str, bias: bool | None = None) -> None:
        """``dst.weight`` (and ``.bias``) = the row-wise concatenation of the ``srcs`` modules (fused qkv)."""
        self.put(dst + ".weight", torch.cat([self.take(s + ".weight") for s in srcs], dim=0))
        with_bias = all(s + ".bias" in self.state for s in srcs) if bias is None else bias
        if with_bias:
            self.put(dst + ".bias", torch.cat([self.take(s + ".bias") for s in srcs], dim=0))

    def finish(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The original state dict (keys under ``prefix``); a one-line error if a weight found no place."""
        if self.state:
            left = sorted(self.state)
            more = f" and {len(left) - 3} more" if len(left) > 3 else ""
            raise SenseflowError(f"{self.what}: the original layout has no place for {', '.join(left[:3])}{more} "
                                 f"(a backbone variant diffusers' from_single_file does not read back; use "
                                 f"--format diffusers)")
        return {prefix + k: v for k, v in self.out.items()}


def swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """``[a, b] -> [b, a]`` along dim 0: diffusers' ``AdaLayerNormContinuous`` is (scale, shift), the originals
    (SD3, FLUX) are (shift, scale); diffusers' converters apply this swap, which is its own inverse."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


# -------------------------------------------------------------------------------------------------
# kohya LoRA
# -------------------------------------------------------------------------------------------------
def kohya_name(module: str, prefix: str = "lora_unet_") -> str:
    """kohya-ss' module name: the original module path with ``.`` -> ``_`` under ``lora_unet_``."""
    return prefix + module.replace(".", "_")


def put_kohya(out: dict[str, torch.Tensor], name: str, down: torch.Tensor, up: torch.Tensor, scale: float) -> None:
    """``name.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``: kohya scales by ``alpha / rank``, so
    ``alpha = scale * rank`` keeps ``delta W = scale * up @ down`` with the weights untouched."""
    if name + ".lora_down.weight" in out:
        raise SenseflowError(f"two LoRA adapters map to the kohya module {name!r}")
    rank = down.shape[0]
    out[name + ".lora_down.weight"] = down.contiguous()
    out[name + ".lora_up.weight"] = up.contiguous()
    out[name + ".alpha"] = torch.tensor(float(scale) * rank, dtype=torch.float32)


def fuse_lora(parts: Sequence[LoraPair | None], out_dims: Sequence[int], in_dim: int, what: str) -> LoraPair:
    """One LoRA on a fused layer (kohya's FLUX ``qkv`` / ``linear1``) equal to separate LoRAs on its parts.

    ``down`` stacks the parts' ``down`` rows, ``up`` is block-diagonal (zero blocks for a part without an
    adapter), so ``up @ down`` is the parts' deltas stacked row-wise -- exact.  kohya's FLUX converter in
    diffusers recognises this block-sparse form and splits it back into per-part adapters.  Parts must
    share one rank (and a scale, else the scales are folded into ``up``).
    """
    present = [p for p in parts if p is not None]
    if not present:
        raise SenseflowError(f"{what}: no adapter to fuse")
    ranks = {p[0].shape[0] for p in present}
    if len(ranks) != 1:
        raise SenseflowError(f"{what}: the fused layer's parts have LoRA ranks {sorted(ranks)}; kohya's fused layout "
                             f"needs one rank (train without rank_pattern)")
    rank = ranks.pop()
    scales = {float(p[2]) for p in present}
    fold = len(scales) != 1
    scale = 1.0 if fold else scales.pop()
    ref = present[0][0]
    downs, ups = [], []
    for part, rows in zip(parts, out_dims):
        if part is None:
            downs.append(torch.zeros(rank, in_dim, dtype=ref.dtype))
            ups.append(torch.zeros(rows, rank, dtype=ref.dtype))
        else:
            down, up, s = part
            if down.shape[1] != in_dim or up.shape[0] != rows:
                raise SenseflowError(f"{what}: adapter shapes {tuple(down.shape)} / {tuple(up.shape)} do not fit the "
                                     f"fused layer's part ({rows} x {in_dim})")
            downs.append(down)
            ups.append(up * s if fold else up)
    down = torch.cat(downs, dim=0)
    up = torch.zeros(sum(out_dims), rank * len(parts), dtype=ref.dtype)
    row = 0
    for j, (block, rows) in enumerate(zip(ups, out_dims)):
        up[row:row + rows, j * rank:(j + 1) * rank] = block
        row += rows
    return down, up, scale


def lora_pairs(backbone: torch.nn.Module) -> dict[str, LoraPair]:
    """The student's PEFT adapters as ``{module: (down, up, scale)}`` (diffusers module names)."""
    from peft.tuners.lora import LoraLayer

    pairs: dict[str, LoraPair] = {}
    for name, module in backbone.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapters = list(module.lora_A.keys())
        if len(adapters) != 1:
            raise SenseflowError(f"LoRA layer {name} holds {len(adapters)} adapters; export needs exactly one")
        key = adapters[0]
        if getattr(module, "use_dora", {}).get(key, False):
            raise SenseflowError(f"LoRA layer {name} is a DoRA adapter, which the kohya layout cannot hold")
        a, b = module.lora_A[key], module.lora_B[key]
        if not isinstance(a, torch.nn.Linear) or not isinstance(b, torch.nn.Linear):
            raise SenseflowError(f"LoRA layer {name} is not a linear adapter ({type(a).__name__}); the kohya export "
                                 f"writes linear adapters only")
        pairs[name] = (a.weight.detach().to("cpu").clone(), b.weight.detach().to("cpu").clone(),
                       float(module.scaling[key]))
    if not pairs:
        raise SenseflowError("the student has no LoRA adapters")
    return pairs


def rename_pairs(pairs: Mapping[str, LoraPair], rename: Any, what: str) -> dict[str, torch.Tensor]:
    """kohya tensors for adapters whose module maps one-to-one: ``rename(module) -> original module or None``."""
    out: dict[str, torch.Tensor] = {}
    for module, (down, up, scale) in pairs.items():
        original = rename(module)
        if original is None:
            raise SenseflowError(f"{what}: no kohya module for the adapter on {module!r}")
        put_kohya(out, kohya_name(original), down, up, scale)
    return out


def block_ids(keys: Iterable[str], prefix: str) -> list[int]:
    """The sorted indices ``i`` of keys ``<prefix>.<i>.…``."""
    head = prefix + "."
    return sorted({int(k[len(head):].split(".", 1)[0]) for k in keys if k.startswith(head)})


def kohya_same_names(pairs: Mapping[str, LoraPair], convert: Any, what: str) -> dict[str, torch.Tensor]:
    """kohya tensors for a family whose kohya names are ``lora_unet_`` + its diffusers module path with ``_``
    (Qwen-Image, Z-Image: musubi-tuner / sd-scripts train on modules named as in diffusers).

    diffusers turns ``_`` back into ``.`` with a per-family list of protected n-grams (``to_q``,
    ``feed_forward``, ...), so a module name outside that list would come back wrong.  Each name is
    therefore passed through ``convert`` (that family's diffusers converter) before anything is written,
    and an adapter that does not land on its own module is a one-line error.
    """
    out: dict[str, torch.Tensor] = {}
    for module, (down, up, scale) in pairs.items():
        name = kohya_name(module)
        probe = {name + ".lora_down.weight": torch.zeros(1, 1), name + ".lora_up.weight": torch.zeros(1, 1),
                 name + ".alpha": torch.tensor(1.0)}
        back = set(convert(probe))
        if back != {f"transformer.{module}.lora_A.weight", f"transformer.{module}.lora_B.weight"}:
            raise SenseflowError(f"{what}: diffusers reads the kohya module {name!r} back as "
                                 f"{sorted(back)[:1] or 'nothing'}, not the adapter's {module!r} (retrain with "
                                 f"generator.lora.target_modules = auto or use --format diffusers)")
        put_kohya(out, name, down, up, scale)
    return out
