"""The run directory's record of itself: ``config.yaml``, checked before and written after validation.

A run directory holds the config it was started with.  Three rules keep that record true:

* nothing is written until the whole run is known to start (the config, the teacher, the data's
  first items, the checkpoint to resume and the first training step all passed), so a refused
  command leaves the directory byte-for-byte as it was;
* a checkpoint is only resumed under a config that builds the same networks and the same method
  (:data:`SHAPE_KEYS`); any difference is a one-line error naming the key;
* ``config.yaml`` is replaced atomically, and when the new config differs from the saved one
  (more ``train.steps``, another lr) the old file is kept as
  ``config_history/config_step_<N>.yaml`` and one line names the changed keys: never silently.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from ..teachers.base import SenseflowError
from ..yaml_safe import load_yaml_text
from .checkpoint import write_text_atomic

CONFIG_FILE = "config.yaml"
HISTORY_DIR = "config_history"

#: config keys whose change makes a checkpoint belong to a different run: they change the
#: networks' shapes (family, factory, resolution, family options, LoRA, the discriminator's heads)
#: or what is being optimised (the method, the anchors the student is trained for)
SHAPE_KEYS: tuple[str, ...] = ("teacher.family", "teacher.factory", "teacher.resolution", "teacher.options",
                               "generator.anchors", "generator.lora", "fake_score.lora", "method.name",
                               "discriminator.layers", "discriminator.head_channels",
                               "discriminator.head_downsamples", "discriminator.cmap_dim", "discriminator.text_dim",
                               "generator.first_input_time")

_MISSING = object()
#: leaves inside SHAPE_KEYS that build the same networks either way (a checkpoint resumes across them)
SHAPE_NEUTRAL: dict[str, tuple[str, ...]] = {"generator.lora": ("shared_base",), "fake_score.lora": ("shared_base",)}


def check_writable(run_dir: Path) -> None:
    """One line unless ``run_dir`` can be created / written (checked before any model is built)."""
    p = Path(os.path.abspath(run_dir))
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise SenseflowError(f"paths.output: {str(probe)!r} is a file, so {str(p)!r} cannot be a run directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SenseflowError(f"paths.output: cannot write in {str(probe)!r} (permission denied): choose a "
                             "writable paths.output")


def read_saved_config(folder: Path) -> tuple[str, dict[str, Any]] | None:
    """``(text, data)`` of ``folder/config.yaml``, or ``None`` when there is none."""
    path = Path(folder) / CONFIG_FILE
    if not path.exists():
        return None
    try:
        text = path.read_bytes().decode("utf-8")
        data = load_yaml_text(text, f"{str(path)!r}")
    except SenseflowError as exc:
        raise SenseflowError(f"the run's saved config: {exc}; restore it or remove it to adopt the new config") \
            from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SenseflowError(f"the run's saved config {str(path)!r} cannot be read ({exc.__class__.__name__}); "
                             "restore it or remove it to adopt the new config") from None
    if not isinstance(data, dict):
        raise SenseflowError(f"the run's saved config {str(path)!r} is not a mapping; restore it or remove it")
    return text, data


def _get(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return _MISSING
        data = data[part]
    return data


def _leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose value differs between two config dicts (a key only one of them has counts)."""
    a, b = _leaves(old), _leaves(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, _MISSING) != b.get(k, _MISSING))


def check_resumable(saved: dict[str, Any], new: dict[str, Any], checkpoint: Path) -> None:
    """Refuse (one line, naming the key) to resume ``checkpoint`` under a config that builds other networks."""
    for key in SHAPE_KEYS:
        old = _get(saved, key)
        if old is _MISSING:  # an older config without the key: nothing to compare
            continue
        value = _get(new, key)
        if key in SHAPE_NEUTRAL and isinstance(old, dict) and isinstance(value, dict):
            old = {k: v for k, v in old.items() if k not in SHAPE_NEUTRAL[key]}
            value = {k: v for k, v in value.items() if k not in SHAPE_NEUTRAL[key]}
        if old != value:
            raise SenseflowError(f"cannot resume {str(checkpoint)!r}: {key} was {_show(old)} in the run's saved "
                                 f"config and is {_show(value)} now, which builds other networks or another "
                                 "method; restore the setting or choose another paths.output")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def write_config(run_dir: Path, text: str, new: dict[str, Any], step: int) -> None:
    """Write ``config.yaml`` atomically; keep a differing previous one in ``config_history/`` and say so."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    saved = read_saved_config(run_dir)
    if saved is not None and saved[0] == text:
        return
    if saved is not None:
        history = run_dir / HISTORY_DIR
        history.mkdir(exist_ok=True)
        keep = history / f"config_step_{step:08d}.yaml"
        n = 1
        while keep.exists():
            keep = history / f"config_step_{step:08d}.{n}.yaml"
            n += 1
        shutil.copy2(path, keep)
        keys = changed_keys(saved[1], new)
        shown = ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
        print(f"{path}: config changed ({shown or 'formatting'}); the previous one is kept as {keep}",
              file=sys.stderr, flush=True)
    write_text_atomic(path, text)


def clean_stale_tmp(run_dir: Path) -> list[Path]:
    """Remove half-written checkpoints (``step_N.tmp``) and pointer temp files left by a killed run."""
    root = Path(run_dir) / "checkpoints"
    removed = []
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        if p.name.endswith(".tmp") or ".tmp-" in p.name:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed
