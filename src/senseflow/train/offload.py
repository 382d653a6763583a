"""CPU offload of frozen networks in a single-process run (``teacher.cpu_offload``).

The frozen teacher backbone and the text encoders never train, so their weights can live in
host memory and visit the GPU only for their own forwards: accelerate's ``cpu_offload`` (the
mechanism behind diffusers' ``enable_sequential_cpu_offload``; accelerate is already a
dependency) keeps ONE copy of the weights on the CPU, leaves the module's own tensors on the
``meta`` device between calls, and a hook on every submodule that holds weights copies them
to the execution device right before its forward and drops them right after.

Why accelerate's hooks and not diffusers' group offloading: SiD backpropagates THROUGH the
teacher (input gradients), so the weights a forward used must still be there in backward.
accelerate puts a NEW parameter object on the module for each forward, so autograd keeps the
onloaded copy it saved alive until backward (then frees it); diffusers' group offloading
(``diffusers/hooks/group_offloading.py``) swaps ``param.data`` in place, which would leave backward
holding the host copy.  ``tests/unit/test_offload.py`` checks input gradients against the plain module.

Cost: every teacher forward copies the teacher's weights host -> device (a 12B bf16 teacher:
24 GB per forward, ~1 s on PCIe 4 x16); use it when the run does not fit otherwise.  The
distributed alternative is ``parallel.cpu_offload`` (FSDP2's CPUOffloadPolicy on the shards).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def offload_module(module: nn.Module, compute_device: torch.device | str, offload_buffers: bool = True) -> nn.Module:
    """Keep ``module``'s weights on the CPU; each submodule's forward runs with them on ``compute_device``.

    ``offload_buffers``: buffers too (the fp8 teacher keeps its weights in buffers).  The
    module must be frozen (no trainable parameter): an optimizer could not step meta tensors.
    """
    from accelerate import cpu_offload

    if any(p.requires_grad for p in module.parameters()):
        raise ValueError("offload_module: the module has trainable parameters; only frozen networks are offloaded")
    return cpu_offload(module, execution_device=torch.device(compute_device), offload_buffers=offload_buffers)


def is_offloaded(module: nn.Module) -> bool:
    """Whether accelerate's offload hooks hold ``module``'s weights (its own tensors are on ``meta``)."""
    return hasattr(module, "_hf_hook")


def offload_text_encoders(encoders: Iterable, compute_device: torch.device | str) -> int:
    """Offload the ``.model`` of every text-encoder record (``adapter.text_encoders()``); returns how many."""
    count = 0
    for enc in encoders:
        model = enc.model if hasattr(enc, "model") else enc
        if not is_offloaded(model):
            offload_module(model, compute_device, offload_buffers=False)
            count += 1
    return count


def onloaded_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s own (non-meta) parameters and buffers: what it holds outside its offload copy."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()) if not t.is_meta)


__all__ = ["is_offloaded", "offload_module", "offload_text_encoders", "onloaded_bytes"]
