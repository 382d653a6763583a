"""Shared steps of the weight converters: read the official file safely, check every key, write atomically."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from torch import Tensor

from ...teachers.base import SenseflowError
from ..metrics.base import sha256_file
from ..metrics.weights import load_state_dict

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "vocab.txt",
                   "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json")


def read_official(src: str | Path, what: str, source: str) -> dict[str, Tensor]:
    src = Path(src)
    if not src.is_file():
        raise SenseflowError(f"{what}: {src} is not a file; expected {source}")
    return load_state_dict(src, what=what, source=source)


def check_complete(mapped: dict[str, Tensor], expected: dict[str, Tensor], unused: Iterable[str], what: str,
                   src: Path) -> None:
    """Every target key filled with the right shape and every source key used -- or one line saying which not."""
    missing = [k for k in expected if k not in mapped]
    wrong = [f"{k} {tuple(mapped[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
             if k in mapped and tuple(mapped[k].shape) != tuple(expected[k].shape)]
    unused = list(unused)
    if missing or wrong or unused:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weights missing (e.g. {', '.join(missing[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} with the wrong shape (e.g. {wrong[0]})")
        if unused:
            parts.append(f"{len(unused)} keys not understood (e.g. {', '.join(unused[:3])})")
        raise SenseflowError(f"{what}: {src} is incomplete or not the official layout: {'; '.join(parts)}")


def tokenizer_files(folder: str | Path | None, what: str, needs: str) -> list[Path]:
    if folder is None:
        raise SenseflowError(f"{what}: --tokenizer is required: a folder with {needs}")
    folder = Path(folder)
    files = [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]
    if not any(f.name in ("tokenizer.json", "vocab.json", "vocab.txt") for f in files):
        raise SenseflowError(f"{what}: {folder} has no tokenizer.json / vocab files; expected {needs}")
    return files


def prepare_out(out: str | Path, overwrite: bool, what: str) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise SenseflowError(f"{what}: {out} already exists and is not empty; pass --overwrite to replace it")
    return out


def write_atomic(out: Path, write, meta: dict) -> Path:
    """Write into a temporary sibling folder, then move it into place (a killed run leaves no half folder)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        (tmp / "senseflow_convert.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def source_meta(src: Path, kind: str, **extra) -> dict:
    return {"kind": kind, "source": str(src), "source_sha256": sha256_file(src), **extra}
