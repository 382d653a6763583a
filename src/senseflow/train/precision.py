"""The dtype trainable weights live in: fp32 masters whatever the frozen teacher is stored in.

``teacher.dtype: float16`` halves the teacher's memory, but the student and the fake score start
as copies of the teacher backbone, and an fp16 network trained with Adam overflows within a step
(99% NaN after one finite-gradient update on the tiny teacher and an SD3.5-like folder).  So
trainable parameters are cast to the master dtype -- float32, or bfloat16 under
``train.precision: bf16`` -- and the optimiser state, created like the parameters, follows.
"""

from __future__ import annotations

import torch
from torch import nn


def master_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def cast_trainable(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Put ``net``'s trainable weights in ``dtype`` (in place; returns ``net``).

    A fully trainable network is cast whole (buffers too, so its layers see one dtype); in a LoRA
    network only the adapter weights are, the frozen base keeps the teacher's storage dtype (PEFT
    casts the adapter branch's input itself).
    """
    floats = [p for p in net.parameters() if p.is_floating_point()]
    if not floats or all(p.dtype == dtype for p in floats if p.requires_grad):
        return net
    if all(p.requires_grad for p in floats):
        return net.to(dtype)
    for p in floats:
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return net
