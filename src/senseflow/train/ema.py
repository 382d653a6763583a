"""An exponential moving average (EMA) of the generator's weights, kept in fp32, on each rank's shards.

Why: few-step students trained with DMD2 / SenseFlow / SiD oscillate from step to step; the
average of the last few thousand images' worth of weights is usually the better sampler (EDM and
every GAN trainer since ProGAN serve their EMA).  The EMA is the generator's *output*, never an
input of training: IDA, the fake score and every loss keep reading the raw generator.

Decay.  Either a constant ``decay`` or, as EDM (NVlabs/edm ``training/training_loop.py``) and SiD
express it, a half-life in images with a ramp-up::

    halflife_nimg = min(halflife_kimg * 1000, images_seen * rampup_ratio)   # rampup_ratio None: no min
    beta          = 0.5 ** (images_per_step / max(halflife_nimg, 1e-8))
    ema           = beta * ema + (1 - beta) * raw

``images_per_step`` is the global batch (``train.batch_size`` x world size) and ``images_seen``
counts the images of the generator steps averaged in so far (0 at the first one, so with a
ramp-up the first update copies the raw weights).  Before ``start_step`` the EMA follows the
raw weights exactly (beta = 0).  It is updated right after each generator optimiser step (after
IDA), and not on iterations where the generator does not step (TTUR) or its step was skipped.

Sharding.  Under FSDP2 the generator's parameters are DTensors; the EMA holds one fp32 DTensor per
trainable parameter with the SAME mesh and placements, and every update works on the local
shards (``to_local()``) with fused ``_foreach`` kernels: nothing is gathered.  DCP saves and
reshards the EMA like the weights (``extra.ema.*`` keys of the sharded checkpoint); single-process
checkpoints hold it in ``generator_ema.safetensors``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..configbase import StrictModel
from ..teachers.base import SenseflowError

#: checkpoint file / DCP key of the EMA tensors (single-process format: ``<EMA_NAME>.safetensors``)
EMA_NAME = "generator_ema"
#: key prefix of the generator backbone inside the trainer's generator network (FewStepGenerator)
BACKBONE_PREFIX = "denoiser.backbone."
WEIGHT_KINDS = ("ema", "raw")


class EMAConfig(StrictModel):
    """``generator.ema``: an EMA of the generator (give ``decay`` OR ``halflife_kimg``)."""

    decay: float | None = Field(None, ge=0.0, lt=1.0, description="constant EMA decay per generator step "
                                "(e.g. 0.999); exclusive with halflife_kimg")
    halflife_kimg: float | None = Field(None, gt=0.0, description="half-life in thousands of images (EDM / SiD "
                                        "ema_halflife_kimg); decay = 0.5 ** (global batch / half-life in images)")
    rampup_ratio: float | None = Field(0.05, gt=0.0, description="with halflife_kimg: the half-life is at most "
                                       "rampup_ratio x images seen (EDM ema_rampup_ratio); null = no ramp-up")
    start_step: int = Field(0, ge=0, description="iteration from which the EMA averages; before it the EMA "
                            "equals the raw weights")
    weights: Literal["ema", "raw"] = Field(
        "ema", description="the weights that sample grids, evaluation hooks and student/student.safetensors use "
                           "(the other set is written as student/student_<other>.safetensors)")

    @model_validator(mode="after")
    def _one_law(self) -> "EMAConfig":
        if (self.decay is None) == (self.halflife_kimg is None):
            raise ValueError("give exactly one of generator.ema.decay and generator.ema.halflife_kimg")
        return self


def halflife_decay(halflife_kimg: float, images_per_step: int, images_seen: int,
                   rampup_ratio: float | None = 0.05) -> float:
    """EDM's per-step EMA decay for a half-life in kimg (see module docstring)."""
    halflife_nimg = halflife_kimg * 1000.0
    if rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, images_seen * rampup_ratio)
    return 0.5 ** (images_per_step / max(halflife_nimg, 1e-8))


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (the storage the update writes), or the tensor itself.

    Asked for at every use: FSDP2 may re-point a parameter's local tensor at lazy initialisation.
    """
    return t.to_local() if hasattr(t, "to_local") else t


def _fsdp_reshard(module: nn.Module) -> None:
    """Free FSDP2's gathered weights so the next forward gathers the (possibly swapped) shards again."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - every supported torch has FSDP2
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


class GeneratorEMA:
    """The EMA of a network's trainable parameters (see module docstring)."""

    def __init__(self, module: nn.Module, params: list[nn.Parameter], cfg: EMAConfig, images_per_step: int) -> None:
        names = {id(p): n for n, p in module.named_parameters()}
        self.module, self.cfg, self.images_per_step = module, cfg, int(images_per_step)
        self.params = list(params)
        self.names = [names[id(p)] for p in self.params]
        self.images_seen = 0
        self.shadow: dict[str, Tensor] = {n: self._fp32_like(p) for n, p in zip(self.names, self.params)}

    @staticmethod
    @torch.no_grad()
    def _fp32_like(p: Tensor) -> Tensor:
        local = _local(p).detach().to(torch.float32).clone()
        if hasattr(p, "to_local"):
            from torch.distributed.tensor import DTensor
            return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                      stride=p.stride())
        return local

    # -- the update --------------------------------------------------------------------------------
    def decay_at(self, step: int) -> float:
        """The decay of an update made at iteration ``step`` (0 before ``start_step``)."""
        if step < self.cfg.start_step:
            return 0.0
        if self.cfg.decay is not None:
            return float(self.cfg.decay)
        return halflife_decay(self.cfg.halflife_kimg, self.images_per_step, self.images_seen, self.cfg.rampup_ratio)

    @torch.no_grad()
    def update(self, step: int) -> float:
        """Average the current raw weights in (call right after a generator optimiser step); returns beta."""
        beta = self.decay_at(step)
        ema = [_local(self.shadow[n]) for n in self.names]
        raw = [_local(p).detach() for p in self.params]
        if beta == 0.0:
            torch._foreach_copy_(ema, raw)   # exact copy (a lerp with weight 1 may round)
        else:
            raw32 = [r if r.dtype == torch.float32 else r.float() for r in raw]
            torch._foreach_lerp_(ema, raw32, 1.0 - beta)
        if step >= self.cfg.start_step:
            self.images_seen += self.images_per_step
        return beta

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average from the current raw weights (resuming a checkpoint that has no EMA)."""
        torch._foreach_copy_([_local(self.shadow[n]) for n in self.names], [_local(p).detach() for p in self.params])
        self.images_seen = 0

    # -- serving the averaged weights ------------------------------------------------------------
    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily put the EMA into the network's parameters (sampling, evaluation); restored exactly."""
        raw = [_local(p) for p in self.params]
        backup = [r.detach().clone() for r in raw]
        with torch.no_grad():
            torch._foreach_copy_(raw, [_local(self.shadow[n]) for n in self.names])
        _fsdp_reshard(self.module)
        try:
            yield
        finally:
            with torch.no_grad():   # local tensors asked for again: a first forward may have re-pointed them
                torch._foreach_copy_([_local(p) for p in self.params], backup)
            _fsdp_reshard(self.module)   # gathered EMA weights must not survive into training

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The scalar state (the tensors travel separately: safetensors / DCP)."""
        return {"images_seen": int(self.images_seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.images_seen = int(state["images_seen"])

    def resume(self, path: Path, state: dict[str, Any] | None, sharded: bool) -> None:
        """Take the EMA back from checkpoint ``path`` (a sharded one was already filled in place by DCP).

        A checkpoint without an EMA (the EMA was enabled on a running run) restarts it from the weights.
        """
        from .checkpoint import checkpoint_extras
        name = "ema" if sharded else EMA_NAME
        if name not in checkpoint_extras(path) or state is None:
            self.reset()
            return
        if not sharded:
            from safetensors.torch import load_file
            self.load_tensors(load_file(str(Path(path) / f"{EMA_NAME}.safetensors")), path)
        self.load_state_dict(state)

    def tensors(self) -> dict[str, Tensor]:
        """The EMA as CPU fp32 tensors keyed by parameter name (single-process checkpoints)."""
        return {n: _local(t).detach().cpu().contiguous().clone() for n, t in self.shadow.items()}

    @torch.no_grad()
    def load_tensors(self, state: dict[str, Tensor], where: Path) -> None:
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise SenseflowError(f"{where} holds no EMA for {missing[:3]}: it was made with other trainable "
                                 f"parameters (LoRA settings?)")
        for n in self.names:
            _local(self.shadow[n]).copy_(state[n])

    def nonfinite(self, ctx=None) -> bool:
        """Whether any EMA value (on any rank) is NaN or infinite."""
        bad = any(not bool(torch.isfinite(_local(t)).all()) for t in self.shadow.values())
        if ctx is not None and getattr(ctx, "distributed", False):
            import torch.distributed as dist
            flag = torch.tensor(float(bad), device=ctx.device if ctx.device.type == "cuda" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = bool(flag.item())
        return bad

    def check_finite(self, step: int, ctx=None) -> None:
        if self.nonfinite(ctx):
            raise SenseflowError(f"the generator EMA holds non-finite values at step {step}; nothing was saved "
                                 f"(the raw weights went non-finite earlier: lower optim.generator.lr or set "
                                 f"train.grad_clip)")


# -------------------------------------------------------------------------------------------------
# student/ with both weight sets
# -------------------------------------------------------------------------------------------------
def weight_files(default: str) -> dict[str, str]:
    """File names of both weight sets in ``student/``: the default is ``student.safetensors``."""
    from ..export import STUDENT_WEIGHTS
    other = "raw" if default == "ema" else "ema"
    return {default: STUDENT_WEIGHTS, other: f"student_{other}.safetensors"}


def _save_atomic(tensors: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise SenseflowError(f"{k} is not finite; {path} was not written")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "senseflow"})
    os.replace(tmp, path)


def ema_backbone_state(raw: dict[str, Tensor], ema: dict[str, Tensor],
                      prefix: str = BACKBONE_PREFIX) -> dict[str, Tensor]:
    """The backbone state dict with the EMA in place of every averaged parameter (raw dtype)."""
    out = dict(raw)
    for name, value in ema.items():
        key = name[len(prefix):] if name.startswith(prefix) else name
        if key not in out:
            raise SenseflowError(f"EMA parameter {name!r} is not in the generator backbone")
        out[key] = value.to(out[key].dtype).contiguous()
    return out


def consolidate_ema(path: Path) -> dict[str, Tensor]:
    """Gather the EMA of a sharded (DCP) checkpoint into full CPU tensors (one process, no GPU)."""
    import torch.distributed.checkpoint as dcp

    from .sharded import SafeFileSystemReader
    metadata = SafeFileSystemReader(str(path)).read_metadata()
    head = "extra.ema."
    template = {key[len(head):]: torch.empty(item.size, dtype=item.properties.dtype)
                for key, item in metadata.state_dict_metadata.items() if key.startswith(head) and hasattr(item, "size")}
    if not template:
        raise SenseflowError(f"checkpoint {str(path)!r} holds no generator EMA")
    dcp.load({"extra": {"ema": template}}, storage_reader=SafeFileSystemReader(str(path)), no_dist=True)
    return template


def export_student_with_ema(trainer, out_dir: Path, meta: dict[str, Any]) -> Path:
    """Write ``student/`` with both weight sets (``student.safetensors`` = ``generator.ema.weights``).

    Distributed runs gather both from the final sharded checkpoint on rank 0 (as the raw export does).
    """
    from ..export import export_meta
    from .checkpoint import latest_checkpoint, module_tensors

    ema: GeneratorEMA = trainer.ema
    files = weight_files(ema.cfg.weights)
    meta = {**meta, "weights": ema.cfg.weights, "weight_files": files}
    generator = trainer.method.models.generator
    out_dir = Path(out_dir)
    ctx = trainer.ctx
    if ctx.distributed:
        ctx.barrier()
        if ctx.is_main:
            from .sharded import consolidate_network
            ckpt = latest_checkpoint(trainer.run_dir)
            raw_file = out_dir / files["raw"]
            consolidate_network(ckpt, "generator", raw_file, strip_prefix=BACKBONE_PREFIX)
            from safetensors.torch import load_file
            raw = load_file(str(raw_file))
            _save_atomic(ema_backbone_state(raw, consolidate_ema(ckpt)), out_dir / files["ema"])
            export_meta(generator, out_dir, meta)
        ctx.barrier()
        return out_dir
    raw = module_tensors(generator.denoiser.backbone)
    _save_atomic(ema_backbone_state(raw, ema.tensors()), out_dir / files["ema"])
    _save_atomic(raw, out_dir / files["raw"])
    return export_meta(generator, out_dir, meta)


__all__ = ["EMAConfig", "GeneratorEMA", "halflife_decay", "weight_files", "export_student_with_ema",
           "consolidate_ema", "ema_backbone_state", "EMA_NAME", "WEIGHT_KINDS"]
