"""Atomic, pickle-free checkpoints.

Layout of ``<run>/checkpoints/step_000100/``:
  ``<network>.safetensors``   one per trained network (generator, fake_score, discriminator)
  ``trainer_state.pt``        optimisers, step, RNG states, data position -- tensors and plain
                              containers only, loaded with ``torch.load(weights_only=True)``
  ``meta.json``               step and file list, written last

A checkpoint is written into ``step_000100.tmp`` and renamed into place only when complete;
``<run>/checkpoints/latest`` (also replaced atomically) names the newest one.  A crash at any
moment leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..teachers.base import SenseflowError
from .finite import require_finite

LATEST = "latest"
STATE_FILE = "trainer_state.pt"


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file durably: temp file, fsync, rename (a crash leaves the old file or the new one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's state as contiguous CPU tensors (safetensors rejects views and shared storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def checkpoint_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of a network: its state without the frozen base it shares with the teacher
    (``lora.shared_base``: that is the teacher's, reloaded from the teacher folder, never changed)."""
    from ..shared_base import shared_state_keys

    skip = shared_state_keys(module)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items() if k not in skip}


def save_safetensors(module: nn.Module | None, path: Path, metadata: dict[str, str] | None = None,
                     tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write a module's weights (or ``tensors``) atomically; refused (one line) when any of them is NaN / inf."""
    if tensors is None:
        if module is None:
            raise ValueError("save_safetensors needs a module or tensors")
        tensors = module_tensors(module)
    require_finite(tensors, str(path))
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """``load_file`` with a damaged file (truncated, empty, bad header) reported as one line."""
    if path.is_dir():
        raise SenseflowError(f"checkpoint file {str(path)!r} is a directory")
    if not path.is_file():
        raise SenseflowError(f"checkpoint file {str(path)!r} not found")
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, header too large, ...
        raise SenseflowError(f"cannot read {str(path)!r} ({' '.join(str(exc).split())[:120]}): the file is damaged; "
                             "resume from another checkpoint") from None


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's ``meta.json``; a corrupt one is a one-line error."""
    try:
        meta = json.loads((Path(path) / "meta.json").read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise SenseflowError(f"{str(path)!r} is not a complete senseflow checkpoint (no meta.json)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SenseflowError(f"{str(Path(path) / 'meta.json')!r} is damaged ({exc.__class__.__name__}): resume "
                             "from another checkpoint") from None
    if not isinstance(meta, dict):
        raise SenseflowError(f"{str(Path(path) / 'meta.json')!r} is damaged (not a JSON object)")
    return meta


def frozen_state_keys(module: nn.Module) -> set[str]:
    """State-dict keys of the tensors that do not train (a LoRA network's base: what a shared-base checkpoint omits)."""
    keys = {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return keys | {n for n, _ in module.named_buffers(remove_duplicate=False)}


def load_safetensors(module: nn.Module, path: Path, frozen_may_be_absent: bool = False) -> None:
    """Load a network's checkpoint file; ``frozen_may_be_absent``: the file was written with a shared base,
    so the frozen base is not in it (this network's copy, loaded from the teacher folder, is that base)."""
    from ..shared_base import shared_state_keys

    state = read_safetensors(path)
    shared = shared_state_keys(module)   # the teacher's tensors: never overwritten from a checkpoint
    state = {k: v for k, v in state.items() if k not in shared}
    missing, unexpected = module.load_state_dict(state, strict=False)
    absent_ok = shared | (frozen_state_keys(module) if frozen_may_be_absent else set())
    missing = [k for k in missing if k not in absent_ok]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise SenseflowError(f"{str(path)!r} does not match the network ({what}); was it made from another teacher?")


def _has_shared(module: nn.Module) -> bool:
    from ..shared_base import has_shared_base
    return has_shared_base(module)


def save_checkpoint(run_dir: Path, step: int, networks: dict[str, nn.Module], state: dict[str, Any],
                    keep: int = 2, extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep``.

    ``extra``: more tensor sets written as ``<name>.safetensors`` (e.g. the generator EMA).
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    for name, module in networks.items():  # refuse before anything of this checkpoint exists
        require_finite(module.state_dict(), f"checkpoint step {step} ({name})")
    require_finite(state, f"checkpoint step {step} (optimiser / trainer state)")
    tmp.mkdir()
    for name, module in networks.items():
        save_safetensors(module, tmp / f"{name}.safetensors", tensors=checkpoint_tensors(module))
    for name, tensors in (extra or {}).items():
        save_file(tensors, str(tmp / f"{name}.safetensors"))
    torch.save(state, tmp / STATE_FILE)
    meta = {"step": step, "networks": sorted(networks)}
    shared = sorted(name for name, module in networks.items() if _has_shared(module))
    if shared:  # their files omit the frozen base (a run resumed with copies takes it from the teacher folder)
        meta["shared_base"] = shared
    if extra:
        meta["extra"] = sorted(extra)
    return finalize(tmp, final, meta, keep)


def finalize(tmp: Path, final: Path, meta: dict[str, Any], keep: int) -> Path:
    """Write ``meta.json`` last, rename the complete directory into place, point ``latest`` at it, prune."""
    root = final.parent
    write_text_atomic(tmp / "meta.json", json.dumps(meta, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(root / LATEST, final.name + "\n")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or ``None``."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if pointer.is_file():
        try:  # a damaged pointer (binary, foreign path) is ignored: the newest complete step is used
            name = pointer.read_bytes()[:64].decode("ascii").strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        candidate = root / name
        if name.startswith("step_") and "/" not in name and (candidate / "meta.json").is_file():
            return candidate
    complete = sorted(p for p in root.glob("step_*") if (p / "meta.json").is_file())
    return complete[-1] if complete else None


def checkpoint_extras(path: Path) -> list[str]:
    """Names of the extra tensor sets a checkpoint holds (``meta.json`` ``extra``; none for older ones)."""
    meta = Path(path) / "meta.json"
    return list(json.loads(meta.read_text()).get("extra", [])) if meta.is_file() else []


def load_checkpoint(path: Path, networks: dict[str, nn.Module]) -> dict[str, Any]:
    """Load network weights from ``path`` and return the trainer state (no pickled code is run)."""
    path = Path(path)
    meta = read_meta(path)
    absent = sorted(set(networks) - set(meta.get("networks", [])))
    if absent:
        raise SenseflowError(f"checkpoint {str(path)!r} has no weights for {absent}; it was made by another method")
    shared = set(meta.get("shared_base", []))
    for name, module in networks.items():
        load_safetensors(module, path / f"{name}.safetensors", frozen_may_be_absent=name in shared)
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling refusal is a bad checkpoint
        raise SenseflowError(f"cannot read {str(path / STATE_FILE)!r} safely ({exc.__class__.__name__})") from exc
