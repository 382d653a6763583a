"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), for FSDP2 runs.

Layout of ``<run>/checkpoints/step_000100/`` (format ``dcp`` in ``meta.json``):
  ``*.distcp`` + ``.metadata``   every network's weights and optimiser state, each rank its shards
  ``trainer_state.pt``           step, data position, shared RNG (rank 0; weights-only load)
  ``rank<r>.pt``                 rank r's own RNG streams
  ``meta.json``                  written last

DCP can reload onto a different world size (2 ranks -> 1, 4 -> 8): it reshards on load.  Its
stock reader unpickles ``.metadata`` with plain :mod:`pickle`; :class:`SafeFileSystemReader`
replaces that with an allow-list unpickler (DCP's metadata dataclasses, torch dtypes and sizes),
so loading a checkpoint never executes code from the file.  Tensor payloads already go through
``torch.load(weights_only=True)`` inside DCP.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from ..teachers.base import SenseflowError
from .checkpoint import STATE_FILE, finalize, read_meta
from .finite import first_nonfinite

_ALLOWED_MODULES = {"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                    "torch.distributed.checkpoint.planner"}
_ALLOWED_BUILTINS = {"set", "frozenset", "slice", "complex"}
_ALLOWED_OTHER = {("collections", "OrderedDict"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
                  ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
                  ("pathlib", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in _ALLOWED_MODULES or (module == "builtins" and name in _ALLOWED_BUILTINS) \
                or (module, name) in _ALLOWED_OTHER:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class SafeFileSystemReader(FileSystemReader):
    """DCP reader whose metadata load cannot run arbitrary code."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as fh:
            try:
                metadata = _MetadataUnpickler(io.BytesIO(fh.read())).load()
            except Exception as exc:  # noqa: BLE001 - refused class, truncated or foreign bytes
                raise SenseflowError(f"unsafe or corrupt checkpoint metadata in {self.path}: "
                                     f"{' '.join(str(exc).split())[:160] or exc.__class__.__name__}") from None
        if not isinstance(metadata, Metadata):
            raise SenseflowError(f"corrupt checkpoint metadata in {self.path}: not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _state(networks: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, Any]:
    return {"models": {n: get_model_state_dict(m) for n, m in networks.items()},
            "optims": {n: get_optimizer_state_dict(networks[n], o) for n, o in optimizers.items()}}


def save_sharded(run_dir: Path, step: int, networks: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                 shared_state: dict[str, Any], local_state: dict[str, Any], ctx, keep: int = 2,
                 extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Every rank calls this; rank 0 finalises the directory atomically once all ranks have written.

    ``extra``: more (sharded) tensor sets saved under ``extra.<name>.*`` (e.g. the generator EMA).
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    ctx.barrier()
    state = _state(networks, optimizers)
    if extra:
        state["extra"] = extra
    bad = first_nonfinite(state)  # each rank checks its shards; all agree before anything is written
    if ctx.mean({"bad": float(bad is not None)})["bad"] > 0:
        from .finite import TrainingDiverged
        raise TrainingDiverged(f"refusing to write checkpoint step {step}: {bad or 'a shard on another rank'} "
                               "holds non-finite values (NaN/inf); the previous checkpoint is kept")
    dcp.save(state, storage_writer=FileSystemWriter(str(tmp)))
    torch.save(local_state, tmp / f"rank{ctx.rank}.pt")
    ctx.barrier()
    if ctx.is_main:
        torch.save(shared_state, tmp / STATE_FILE)
        meta = {"step": step, "networks": sorted(networks), "format": "dcp", "world_size": ctx.world_size}
        if extra:
            meta["extra"] = sorted(extra)
        finalize(tmp, final, meta, keep)
    ctx.barrier()
    return final


def is_sharded(path: Path) -> bool:
    return (Path(path) / "meta.json").is_file() and read_meta(Path(path)).get("format") == "dcp"


def load_sharded(path: Path, networks: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                 rank: int = 0, extra: dict[str, dict[str, torch.Tensor]] | None = None
                 ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load weights + optimiser state (resharding as needed); return (shared state, this rank's state or None).

    ``extra``: tensor sets to fill in place, those of them the checkpoint lists in ``meta.json``.
    """
    path = Path(path)
    meta = read_meta(path)
    absent = sorted(set(networks) - set(meta.get("networks", [])))
    if absent:
        raise SenseflowError(f"checkpoint {str(path)!r} has no weights for {absent}; it was made by another method")
    SafeFileSystemReader(str(path)).read_metadata()  # refused here as one line, not inside DCP's rank wrapper
    state = _state(networks, optimizers)
    saved_extra = set(meta.get("extra", []))
    if extra and saved_extra & set(extra):
        state["extra"] = {k: v for k, v in extra.items() if k in saved_extra}
    _dcp_load(state, path)
    for name, net in networks.items():
        set_model_state_dict(net, state["models"][name])
        if name in optimizers:
            set_optimizer_state_dict(net, optimizers[name], state["optims"][name])
    shared = _load_pt(path / STATE_FILE)
    local_file = path / f"rank{rank}.pt"
    local = _load_pt(local_file) if local_file.is_file() else None
    return shared, local


def _load_pt(file: Path) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling refusal is a bad checkpoint
        raise SenseflowError(f"cannot read {str(file)!r} safely ({exc.__class__.__name__})") from None


def _dcp_load(state: dict[str, Any], path: Path, **kwargs: Any) -> None:
    """``dcp.load`` with a damaged payload reported as one line (DCP wraps errors per rank)."""
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), **kwargs)
    except SenseflowError:
        raise
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - DCP's per-rank wrapper, size mismatch, ...
        failures = list(getattr(exc, "failures", {}).values())
        first = (failures[0][0] if isinstance(failures[0], tuple) else failures[0]) if failures else exc
        if isinstance(first, SenseflowError):
            raise SenseflowError(str(first)) from None
        text = " ".join(str(first).split())[:160]
        raise SenseflowError(f"cannot load the sharded checkpoint {str(path)!r} ({first.__class__.__name__}: "
                             f"{text}): it is damaged or from another model") from None


def consolidate_network(path: Path, network: str, out_file: Path, strip_prefix: str = "") -> Path:
    """Gather one network of a sharded checkpoint into a single safetensors file (one process, no GPU).

    ``strip_prefix`` drops a leading module path from the keys (``denoiser.backbone.`` gives the
    student backbone's own names, as the single-process export writes them).
    """
    path = Path(path)
    reader = SafeFileSystemReader(str(path))
    metadata = reader.read_metadata()
    prefix = f"models.{network}."
    template: dict[str, torch.Tensor] = {}
    for key, item in metadata.state_dict_metadata.items():
        if key.startswith(prefix) and hasattr(item, "size"):
            template[key[len(prefix):]] = torch.empty(item.size, dtype=item.properties.dtype)
    if not template:
        raise SenseflowError(f"checkpoint {str(path)!r} holds no network {network!r}")
    _dcp_load({"models": {network: template}}, path, no_dist=True)
    bad = first_nonfinite(template)
    if bad is not None:
        raise SenseflowError(f"refusing to export {network} from {str(path)!r}: {bad} holds non-finite values")
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    save_file({k.removeprefix(strip_prefix): v.contiguous() for k, v in template.items()}, str(tmp))
    os.replace(tmp, out_file)
    return out_file


__all__ = ["SafeFileSystemReader", "save_sharded", "load_sharded", "is_sharded", "consolidate_network",
           "StateDictOptions"]
