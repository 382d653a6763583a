"""fp8 weight-only storage for the FROZEN teacher (``teacher.weight_dtype: fp8_e4m3``).

Why: the teacher is the one network of a distillation run that never changes, so its weights
can be stored in one byte each (``torch.float8_e4m3fn``) -- a quarter of fp32, half of bf16 --
and dequantised to the activations' dtype inside each forward.  The generator and the fake score
train and keep their own full-precision weights: :func:`quantize_linears` refuses a module with
trainable parameters, and the run quantises the teacher only AFTER the student and fake-score
copies were made from it (:func:`senseflow.train.frozen.apply_teacher_storage`), so nothing
in fp8 ever reaches a student, a checkpoint or an export.

Scheme (the usual weight-only fp8 recipe, e.g. torchao's ``Float8WeightOnlyConfig`` and
vLLM's fp8 checkpoints): one fp32 scale per output channel, ``scale = amax(|W[row]|) / 448``
(448 = the largest finite e4m3 value), ``q = round_e4m3(W / scale)``, ``W ~= q * scale``.
e4m3 keeps 3 mantissa bits, so each weight is rounded to within half a step: relative error
<= 2^-4 for |W / scale| >= 2^-6 (the smallest normal), absolute error <= scale * 2^-10 below
it (subnormal spacing 2^-9).  Only ``nn.Linear`` layers are swapped (a DiT's weight is ~all
linear; SDXL's convolutions stay in ``teacher.dtype``); biases stay in ``teacher.dtype``.

Written here rather than taken from torchao: torchao is a new dependency tied to exact torch
releases (its wheels are built per torch version; this project pins torch 2.13 on CPU), and
the scheme is ~40 lines of plain torch ops that run on every device (CPU included, which the
tests and the toy world need).  The matmul itself runs in the compute dtype: this saves weight
MEMORY, not time (fp8 tensor-core matmuls need scaled-mm kernels and fp8 activations).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..teachers.base import SenseflowError

FP8_DTYPE = torch.float8_e4m3fn
#: the largest finite e4m3fn value
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)   # 448.0


def quantize_fp8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``weight [out, in]`` -> ``(q [out, in] float8_e4m3fn, scale [out, 1] float32)``, ``weight ~= q * scale``.

    Per output channel: ``scale = amax(|row|) / 448``; an all-zero row gets scale 1 (q = 0).
    """
    if weight.ndim != 2:
        raise ValueError(f"quantize_fp8 expects a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise SenseflowError("teacher.weight_dtype: fp8_e4m3: the teacher has non-finite weights; "
                             "check the teacher folder")
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_fp8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``q * scale`` in ``dtype`` (the compute dtype of the forward)."""
    return q.to(dtype) * scale.to(dtype)


class Float8Linear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is stored in fp8 with a per-output-channel scale.

    The fp8 weight and its scale are (persistent) buffers, not parameters: they are no
    network's trainable state, and ``parameters()`` -- which ``storage_autocast`` and the
    adapters read for the model's dtype -- keeps reporting the teacher's compute dtype.
    The forward dequantises to the INPUT's dtype, so it computes in whatever dtype the
    activations have (``teacher.dtype``, or bf16 under ``train.precision: amp_bf16`` autocast).
    """

    def __init__(self, in_features: int, out_features: int, bias: Tensor | None, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.register_buffer("weight_fp8", torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Float8Linear":
        if linear.weight.requires_grad or (linear.bias is not None and linear.bias.requires_grad):
            raise SenseflowError("fp8 weight storage is for the frozen teacher only: this nn.Linear has trainable "
                                 "weights (a generator / fake score)")
        out = cls(linear.in_features, linear.out_features, linear.bias, device=linear.weight.device)
        q, scale = quantize_fp8(linear.weight)
        out.weight_fp8.copy_(q)
        out.weight_scale.copy_(scale)
        return out

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_fp8(self.weight_fp8, self.weight_scale, dtype)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"weight=float8_e4m3fn (per-channel scale)"


def quantize_linears(module: nn.Module) -> int:
    """Replace every ``nn.Linear`` in ``module`` by a :class:`Float8Linear` in place; returns how many.

    Refuses (one line, nothing changed) a module with ANY trainable parameter: only the frozen
    teacher may be stored in fp8; the generator and fake score keep their full-precision weights.
    """
    if any(p.requires_grad for p in module.parameters()):
        raise SenseflowError("teacher.weight_dtype: fp8 storage is refused on a network with trainable parameters "
                             "(generator / fake score): only the frozen teacher can be stored in fp8")
    targets = [(name, sub) for name, sub in module.named_modules() if isinstance(sub, nn.Linear)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, Float8Linear.from_linear(linear))
    return len(targets)


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by ``module``'s parameters and buffers (what its weights cost in memory)."""
    seen: set[int] = set()
    total = 0
    for t in (*module.parameters(), *module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def fp8_weight_bytes(module: nn.Module) -> int:
    """The bytes :func:`weight_bytes` would report after :func:`quantize_linears` (works on ``meta`` modules).

    Each ``nn.Linear`` weight costs 1 byte per entry + a 4-byte scale per output row instead of its
    dtype's size; everything else (biases, norms, convolutions, embeddings) is unchanged.
    """
    total = weight_bytes(module)
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            total += sub.weight.numel() * (1 - sub.weight.element_size()) + 4 * sub.out_features
    return total


__all__ = ["FP8_DTYPE", "FP8_MAX", "Float8Linear", "dequantize_fp8", "fp8_weight_bytes", "quantize_fp8", "quantize_linears",
           "weight_bytes"]
