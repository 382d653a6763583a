"""Distribution on PyTorch's own engine: process groups, device meshes and FSDP2 (``fully_shard``).

Strategies (``parallel.strategy``):
  * ``none``  -- one process;
  * ``ddp``   -- every rank holds full weights; gradients are averaged.  Implemented as FSDP2 on a
                 ``(world, 1)`` mesh (replicate x shard-of-one), which keeps ONE code path for
                 parameter handling, IDA and checkpoints and copes with the per-phase
                 ``requires_grad`` switching that ``DistributedDataParallel`` cannot;
  * ``fsdp``  -- parameters, gradients and optimiser state sharded over all ranks, per block;
  * ``hsdp``  -- replicate across groups of ``hsdp_shard_size`` ranks (nodes), shard within.

Each trainable backbone is sharded block by block (the adapter names the blocks), then at the
root.  The frozen teacher is sharded too when ``shard_teacher`` (8B-12B teachers do not fit
replicated).  IDA then runs on the local shards of two identically sharded networks: no
gathering, same result as a single process.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import Field
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..configbase import StrictModel

Strategy = Literal["auto", "none", "ddp", "fsdp", "hsdp"]


class ParallelConfig(StrictModel):
    """How networks are spread over processes (``torchrun``) and what trades memory for compute."""

    strategy: Strategy = Field("auto", description="auto: none for one process, fsdp for several")
    shard_teacher: bool = Field(True, description="shard the frozen teacher too (needed for 8B-12B teachers)")
    hsdp_shard_size: int | None = Field(None, ge=1, description="hsdp: ranks per shard group (default: per node)")
    reshard_after_forward: bool = Field(True, description="free gathered weights after forward (less memory, "
                                                          "one more all-gather in backward)")
    activation_checkpointing: bool = Field(False, description="recompute block activations in backward")
    checkpoint_teacher: bool = Field(False, description="also recompute the frozen teacher's blocks: SiD "
                                                        "backpropagates through the teacher (no effect for DMD2)")
    cpu_offload: bool = Field(False, description="keep sharded parameters and optimiser state in CPU memory "
                                                 "(much slower; for teachers that do not fit otherwise)")
    broadcast_from_rank0: bool = Field(False, description="distributed runs: only rank 0 loads the weights; the "
                                                          "other ranks build the networks on the meta device and "
                                                          "receive their shards from rank 0 after sharding (host "
                                                          "memory: one copy per node instead of one per rank)")


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalar logs over ranks (one all-reduce)."""
        if not self.distributed or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}


def init_distributed(device_name: str = "auto") -> DistContext:
    """Join the process group that ``torchrun`` describes (no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistContext(rank, world, local_rank, local_world, device)


def resolve_strategy(strategy: Strategy, ctx: DistContext) -> str:
    if strategy == "auto":
        return "fsdp" if ctx.distributed else "none"
    if strategy != "none" and not ctx.distributed:
        return "none"
    return strategy


def make_mesh(strategy: str, ctx: DistContext, shard_size: int | None = None):
    from torch.distributed.device_mesh import init_device_mesh

    kind = ctx.device.type
    if strategy == "fsdp":
        return init_device_mesh(kind, (ctx.world_size,), mesh_dim_names=("shard",))
    if strategy == "ddp":
        return init_device_mesh(kind, (ctx.world_size, 1), mesh_dim_names=("replicate", "shard"))
    if strategy == "hsdp":
        size = shard_size or ctx.local_world_size
        if ctx.world_size % size:
            raise ValueError(f"hsdp_shard_size {size} does not divide the world size {ctx.world_size}")
        return init_device_mesh(kind, (ctx.world_size // size, size), mesh_dim_names=("replicate", "shard"))
    raise ValueError(f"no mesh for strategy {strategy!r}")


def checkpoint_blocks(backbone: nn.Module, block_names: list[str]) -> int:
    """Recompute each named block's activations in backward (``torch.utils.checkpoint``).

    The block's ``forward`` is wrapped in place, so parameter names (IDA, checkpoints, export)
    and forward hooks (discriminator features) are unchanged.
    """
    modules = dict(backbone.named_modules())
    for name in block_names:
        block = modules[name]
        if getattr(block, "_senseflow_checkpointed", False):
            continue
        original = block.forward

        @functools.wraps(original)
        def forward(*args: Any, _orig=original, **kwargs: Any):
            if torch.is_grad_enabled():
                return checkpoint(_orig, *args, use_reentrant=False, **kwargs)
            return _orig(*args, **kwargs)

        block.forward = forward
        block._senseflow_checkpointed = True
    return len(block_names)


def shard_backbone(backbone: nn.Module, block_names: list[str], mesh, mp_policy=None, reshard: bool = True,
                   offload: bool = False) -> nn.Module:
    """``fully_shard`` every block, then the root (the FSDP2 recipe for transformer stacks)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    modules = dict(backbone.named_modules())
    for name in block_names:
        fully_shard(modules[name], **kwargs)
    fully_shard(backbone, **kwargs)
    return backbone


def builds_on_meta(config: ParallelConfig, ctx: DistContext) -> bool:
    """Whether THIS rank should build its networks on the meta device (``broadcast_from_rank0``)."""
    return bool(config.broadcast_from_rank0) and ctx.distributed and not ctx.is_main \
        and resolve_strategy(config.strategy, ctx) != "none"


def _named_backbones(models) -> list[tuple[str, nn.Module]]:
    out = [("generator", models.generator.denoiser.backbone)]
    if models.fake_score is not None:
        out.append(("fake_score", models.fake_score.backbone))
    out.append(("teacher", models.teacher.backbone))
    return out


def _on_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


@torch.no_grad()
def materialize_from_rank0(module: nn.Module, full_state: dict[str, torch.Tensor] | None, ctx: DistContext,
                           device: torch.device | None = None) -> None:
    """Fill an (already ``fully_shard``-ed or replicated) network from rank 0's full weights.

    Rank 0 passes its full state dict (taken BEFORE sharding); the other ranks pass ``None`` and
    hold meta tensors, which are first allocated (``to_empty``: uninitialised memory) on
    ``device`` (default ``ctx.device``; CPU for offloaded shards).  ``set_model_state_dict(..., broadcast_from_rank0=True)`` then broadcasts every
    entry and keeps only each rank's shard.  Buffers -- non-persistent ones are not in any state
    dict and are garbage after ``to_empty`` -- are broadcast from rank 0 afterwards.  Collective:
    every rank must call it, for the same networks in the same order.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not ctx.is_main and _on_meta(module):
        module.to_empty(device=device or ctx.device)
    sd = dict(full_state) if ctx.is_main and full_state is not None else {}
    set_model_state_dict(module, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    comm = ctx.device if ctx.device.type == "cuda" else torch.device("cpu")
    for _, buf in sorted(module.named_buffers(), key=lambda kv: kv[0]):
        local = buf.to_local() if hasattr(buf, "to_local") else buf
        staged = local.to(comm)
        dist.broadcast(staged, src=0)
        if staged is not local:
            local.copy_(staged)


def parallelize(models, config: ParallelConfig, precision: str, ctx: DistContext) -> str:
    """Apply activation checkpointing and the sharding strategy to every network of a run."""
    strategy = resolve_strategy(config.strategy, ctx)
    adapter = models.teacher.adapter
    trainables = [models.generator.denoiser.backbone]
    if models.fake_score is not None:
        trainables.append(models.fake_score.backbone)
    if config.activation_checkpointing:
        for backbone in trainables:
            checkpoint_blocks(backbone, adapter.block_names(backbone))
    if config.checkpoint_teacher:
        checkpoint_blocks(models.teacher.backbone, adapter.block_names(models.teacher.backbone))
    if strategy == "none":
        return strategy
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mesh = make_mesh(strategy, ctx, config.hsdp_shard_size)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "amp_bf16" else None
    from_rank0 = bool(config.broadcast_from_rank0)
    if not from_rank0 and any(_on_meta(b) for _, b in _named_backbones(models)):
        raise ValueError("networks on the meta device need parallel.broadcast_from_rank0: true")
    teacher = models.teacher.backbone
    for name, backbone in _named_backbones(models):
        # rank 0's full weights, referenced before sharding (fully_shard copies them into shards)
        full = backbone.state_dict() if from_rank0 and ctx.is_main else None
        if backbone is not teacher:
            shard_backbone(backbone, adapter.block_names(backbone), mesh, mp, config.reshard_after_forward,
                           config.cpu_offload)
        elif config.shard_teacher:
            shard_backbone(teacher, adapter.block_names(teacher), mesh, None, True, config.cpu_offload)
        if from_rank0:
            sharded = backbone is not teacher or config.shard_teacher
            materialize_from_rank0(backbone, full, ctx,
                                   torch.device("cpu") if config.cpu_offload and sharded else ctx.device)
        del full
    if models.discriminator is not None:
        from torch.distributed.fsdp import fully_shard
        fully_shard(models.discriminator, mesh=make_mesh("ddp", ctx))
    gan_head = getattr(models.fake_score, "gan_head", None)  # DMD2's classifier head: in the fake score's
    if gan_head is not None:  # optimiser, so the same mesh and policies (one grad-norm clip over both)
        shard_backbone(gan_head, [], mesh, mp, config.reshard_after_forward, config.cpu_offload)
    return strategy


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (all-gather), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
