"""Speed switches that leave the maths alone: regional ``torch.compile`` and fused/foreach optimisers.

Regional compilation (``train.compile: true`` / ``"blocks"``) compiles each transformer block the
adapter names (:meth:`ModelAdapter.block_names`) instead of the whole backbone: the blocks of a
DiT share one structure, so the compiler traces one block once and reuses the code for all of
them -- compile time stays minutes for 12B models where compiling the whole backbone (60 blocks
inlined) takes far longer and recompiles whenever the glue around the blocks changes.
Each block's ``forward`` is replaced by its compiled version in place: parameter names (IDA,
checkpoints, export), FSDP2 sharding hooks, activation checkpointing (the wrapped ``forward`` is
what is compiled) and forward hooks stay as they are.
"""

from __future__ import annotations

from typing import Any, Literal, Union

import torch
from torch import nn

CompileMode = Union[bool, Literal["blocks"]]


def compile_enabled(setting: CompileMode) -> bool:
    return setting is True or setting == "blocks"


def compile_blocks(backbone: nn.Module, block_names: list[str], **options: Any) -> int:
    """``torch.compile`` each named block of ``backbone`` in place; returns how many were compiled.

    Without block names (an adapter that names none) the whole backbone is compiled instead.
    """
    modules = dict(backbone.named_modules())
    targets = [modules[name] for name in block_names] if block_names else [backbone]
    for module in targets:
        if not getattr(module, "_senseflow_compiled", False):
            # the module's ``forward`` (already activation-checkpointed when that is on), not its
            # ``__call__``: FSDP2's per-block hooks stay outside the compiled region, the order
            # checkpoint -> compile -> shard that torchtitan uses
            module.forward = torch.compile(module.forward, **options)
            module._senseflow_compiled = True
    return len(targets)


def compile_models(models: Any, setting: CompileMode, **options: Any) -> int:
    """Compile the blocks of the teacher, generator and fake-score backbones (``DistillationModels``)."""
    if not compile_enabled(setting):
        return 0
    # one block code object serves every block of all three networks, each in several variants
    # (grad / no-grad, CFG-doubled batch, trainable / frozen parameters): the default limit of 8
    # compiled variants would silently send the rest back to eager
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
    adapter = models.teacher.adapter
    nets = [models.teacher.backbone, models.generator.denoiser.backbone]
    if models.fake_score is not None:
        nets.append(models.fake_score.backbone)
    return sum(compile_blocks(net, adapter.block_names(net), **options) for net in nets)


def optimizer_kernels(params: list[nn.Parameter]) -> dict[str, bool]:
    """``fused=True`` when every parameter is a floating CUDA tensor (one kernel for the whole step),
    else ``foreach=True`` (batched per-tensor ops; the CPU path).  Same update rule either way."""
    if params and all(p.is_cuda and p.is_floating_point() for p in params):
        return {"fused": True}
    return {"foreach": True}


__all__ = ["CompileMode", "compile_blocks", "compile_enabled", "compile_models", "optimizer_kernels"]
