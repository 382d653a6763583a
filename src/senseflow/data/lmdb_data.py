"""Read-only access to DMD2-style LMDB databases of VAE latents + prompts, and a tiny writer.

Layout (as written by DMD2's ``main/data/create_lmdb_iterative.py`` and read by its
``SDImageDatasetLMDB``); every key and value is bytes:

=========================  =====================================================================
key                        value
=========================  =====================================================================
``latents_shape``          ASCII ``"N C H W"``: number of rows, then the shape of one latent
``latents_{i}_data``       the raw bytes of latent ``i`` (C-order), ``float16`` unless
                           ``latents_dtype`` says otherwise
``prompts_{i}_data``       prompt ``i``, UTF-8
``prompts_shape``          ASCII ``"N"`` (optional; written by DMD2, not needed here)
``latents_dtype``          ASCII numpy dtype name, ``float16`` or ``float32`` (optional, a
                           senseflow extension; DMD2 always stores ``float16``)
=========================  =====================================================================

Rows are numbered ``0 .. N-1``.  The latents must already be in the teacher's latent space (what
``adapter.encode`` returns, e.g. ``(z - shift_factor) * scaling_factor`` for SD3, ``z * 0.13025`` for
SDXL, which is what DMD2 stored), at the training resolution; the shape is checked against the
teacher when training starts.

``lmdb`` (a binary wheel, no compilation) is imported on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..teachers.base import ModelAdapter, SenseflowError

DTYPES = {"float16": np.float16, "float32": np.float32}


#: py-lmdb refuses to open one environment twice in a process: share the read-only handles
_ENVS: dict[str, object] = {}


def _lmdb():
    try:
        import lmdb
    except ImportError:  # pragma: no cover - lmdb is a dependency; this guards stripped installs
        raise SenseflowError("reading LMDB data needs the 'lmdb' package: pip install lmdb") from None
    return lmdb


class LmdbLatents:
    """A DMD2-style LMDB (see module docstring), opened read-only and without locking."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "data.mdb").is_file():
            raise SenseflowError(f"LMDB {str(self.path)!r} not found (expected a directory with data.mdb)")
        lmdb = _lmdb()
        key = str(self.path.resolve())
        try:
            if key not in _ENVS:
                _ENVS[key] = lmdb.open(key, readonly=True, lock=False, readahead=False, meminit=False, subdir=True,
                                       max_readers=512)
            self.env = _ENVS[key]
        except lmdb.Error as exc:
            raise SenseflowError(f"LMDB {str(self.path)!r} cannot be opened ({exc.__class__.__name__}: {exc})") \
                from None
        shape = self._get("latents_shape")
        if shape is None:
            raise SenseflowError(f"LMDB {str(self.path)!r} has no 'latents_shape' key: not a DMD2 latent database "
                                 f"(see docs/data.md for the layout)")
        try:
            dims = tuple(int(x) for x in shape.decode().split())
        except (UnicodeDecodeError, ValueError):
            raise SenseflowError(f"LMDB {str(self.path)!r}: 'latents_shape' is {shape[:40]!r}, expected \"N C H W\"") \
                from None
        if len(dims) < 2 or dims[0] <= 0:
            raise SenseflowError(f"LMDB {str(self.path)!r}: 'latents_shape' {dims} must be \"N C H W\" with N > 0")
        self.length, self.latent_shape = dims[0], dims[1:]
        raw_dtype = self._get("latents_dtype")
        name = raw_dtype.decode() if raw_dtype is not None else "float16"
        if name not in DTYPES:
            raise SenseflowError(f"LMDB {str(self.path)!r}: latents_dtype {name!r} is not supported "
                                 f"(use one of {sorted(DTYPES)})")
        self.dtype = DTYPES[name]
        self._row_bytes = int(np.prod(self.latent_shape)) * np.dtype(self.dtype).itemsize
        if self._get("prompts_0_data") is None:
            raise SenseflowError(f"LMDB {str(self.path)!r} has no 'prompts_0_data': the database holds no prompts")

    def _get(self, key: str) -> bytes | None:
        with self.env.begin(write=False) as txn:
            value = txn.get(key.encode())
        return None if value is None else bytes(value)

    def __len__(self) -> int:
        return self.length

    def prompt(self, i: int) -> str:
        raw = self._get(f"prompts_{i}_data")
        if raw is None:
            raise SenseflowError(f"LMDB {str(self.path)!r} has no 'prompts_{i}_data' (latents_shape says {self.length} "
                                 f"rows)")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SenseflowError(f"LMDB {str(self.path)!r}: 'prompts_{i}_data' is not UTF-8 text") from None

    def latent(self, i: int) -> Tensor:
        raw = self._get(f"latents_{i}_data")
        if raw is None:
            raise SenseflowError(f"LMDB {str(self.path)!r} has no 'latents_{i}_data' (latents_shape says {self.length} "
                                 f"rows)")
        if len(raw) != self._row_bytes:
            raise SenseflowError(f"LMDB {str(self.path)!r}: 'latents_{i}_data' has {len(raw)} bytes but a "
                                 f"{np.dtype(self.dtype).name} latent of shape {list(self.latent_shape)} needs "
                                 f"{self._row_bytes}")
        return torch.from_numpy(np.frombuffer(raw, dtype=self.dtype).reshape(self.latent_shape).copy())

    def close(self) -> None:
        """Close the (shared) environment: every LmdbLatents of this path becomes unusable."""
        _ENVS.pop(str(self.path.resolve()), None)
        self.env.close()

    def check_adapter(self, adapter: ModelAdapter) -> None:
        expected = tuple(adapter.latent_shape())
        if tuple(self.latent_shape) != expected:
            raise SenseflowError(f"LMDB {str(self.path)!r} holds latents of shape {list(self.latent_shape)} but the "
                                 f"teacher at this resolution needs {list(expected)}: check teacher.resolution and "
                                 f"the teacher family")


class LmdbItems:
    """An LMDB as cacheable / trainable items (prompts + stored latents, returned as float32)."""

    has_latents = True

    def __init__(self, db: LmdbLatents) -> None:
        self.db = db

    def __len__(self) -> int:
        return len(self.db)

    def prompts(self, indices: Sequence[int]) -> list[str]:
        return [self.db.prompt(i) for i in indices]

    def latents(self, indices: Sequence[int], adapter: ModelAdapter | None = None, device: torch.device | None = None,
                seeds: Sequence[int] | None = None, sample: bool = True) -> Tensor:
        out = torch.stack([self.db.latent(i) for i in indices]).float()
        return out if device is None else out.to(device)

    def describe(self) -> dict:
        stat = (self.db.path / "data.mdb").stat()
        return {"kind": "lmdb", "path": str(self.db.path.resolve()), "num_items": len(self.db),
                "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def write_lmdb(path: str | Path, latents: Tensor, prompts: Sequence[str], dtype: str = "float16") -> Path:
    """Write a DMD2-style LMDB (small data sets, tests and conversions); ``dtype``: float16 (DMD2) or float32."""
    if dtype not in DTYPES:
        raise SenseflowError(f"write_lmdb: dtype {dtype!r} is not supported (use one of {sorted(DTYPES)})")
    if len(latents) != len(prompts) or len(prompts) == 0:
        raise SenseflowError(f"write_lmdb: {len(latents)} latents and {len(prompts)} prompts; need equal, non-zero")
    lmdb = _lmdb()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    arr = latents.detach().cpu().float().numpy().astype(DTYPES[dtype])
    size = arr.nbytes + sum(len(p.encode()) for p in prompts) + 64 * len(prompts)
    env = lmdb.open(str(path), map_size=max(1 << 20, 2 * size + (1 << 20)), subdir=True)
    try:
        with env.begin(write=True) as txn:
            for i, (row, prompt) in enumerate(zip(arr, prompts)):
                txn.put(f"latents_{i}_data".encode(), np.ascontiguousarray(row).tobytes())
                txn.put(f"prompts_{i}_data".encode(), prompt.encode("utf-8"))
            txn.put(b"latents_shape", " ".join(str(d) for d in arr.shape).encode())
            txn.put(b"prompts_shape", str(len(prompts)).encode())
            if dtype != "float16":
                txn.put(b"latents_dtype", dtype.encode())
    finally:
        env.close()
    return path
