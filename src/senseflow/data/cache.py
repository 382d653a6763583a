"""Prompt and latent caches: encode once with the teacher's text encoders (and VAE), train without them.

A cache is a directory::

    index.json                  what is in it and what it was built from (see below)
    shard-00000.safetensors     items [0, shard_size): cond.<name> tensors, optionally `latents`;
    shard-00001.safetensors     the prompts are in the safetensors metadata ("prompts": JSON list)
    ...
    uncond.safetensors          the unconditional conditioning (adapter.unconditional(1)), batch 1
    eval.safetensors            the sample-grid prompts (paths.eval_prompts), when set

``index.json`` records the format version, the senseflow version that wrote it, the teacher (folder,
family, a fingerprint of every text encoder / tokenizer / VAE subfolder, the encoding options such
as ``max_sequence_length``), the resolution, the data source (kind, path, sha256), the number of
items, the shard list, and the per-item shape and dtype of every tensor.

Building is atomic: shards are written into ``<DIR>.partial/`` (each shard itself via a temporary
file + rename) and the directory is renamed to ``<DIR>`` only when everything, ``index.json``
last, is complete.  An interrupted build (crash, Ctrl-C) leaves only ``<DIR>.partial/``; running
the same command again resumes from the finished shards.  A user error (bad image, ...) removes
``<DIR>.partial/``: nothing is left behind.

Reading is lazy: shards are memory-mapped with ``safetensors.safe_open`` and only the requested rows
are read.  :meth:`PromptCache.check_compatible` rejects (one line) a cache built for another teacher
family, with different text encoders / tokenizers / VAE, other encoding options, or -- when the
cache holds latents -- another resolution.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
from torch import Tensor

from ..config import TOY_WORLDS
from ..teachers.base import Conditioning, ModelAdapter, SenseflowError

FORMAT = "senseflow-cache"
FORMAT_VERSION = 1
INDEX = "index.json"
PLAN = "plan.json"
UNCOND_FILE = "uncond.safetensors"
EVAL_FILE = "eval.safetensors"
COND = "cond."
LATENTS = "latents"
#: sample-grid prompts cached at most (``train.num_samples`` is at most 64)
MAX_EVAL_PROMPTS = 64
#: ``teacher.options`` keys that change what the text encoders produce (or the unconditional branch)
ENCODING_OPTIONS = ("max_sequence_length", "complex_human_instruction", "zero_unconditional",
                    "negative_prompt", "text_encoder_out_layers")
#: teacher subfolders whose content the cache depends on
COMPONENT_PREFIXES = ("text_encoder", "tokenizer", "vae")
#: files up to this size are hashed whole; larger ones (weights) by size + first and last MiB
FULL_HASH_LIMIT = 8 << 20
SAMPLE_BYTES = 1 << 20
#: default shard size: about this many bytes, at most this many items
SHARD_BYTES = 512 << 20
MAX_SHARD_ITEMS = 4096
#: shards kept open at once while reading
MAX_OPEN_SHARDS = 16

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "bool": torch.bool,
                 "uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -------------------------------------------------------------------------------------------------
# Fingerprints
# -------------------------------------------------------------------------------------------------
def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _hash_dir(folder: Path) -> str:
    """sha256 over (relative name, size, content) of every file; large files by their first/last MiB."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder).as_posix()
        if any(part.startswith(".") or part == "__pycache__" for part in Path(rel).parts):
            continue
        size = f.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= FULL_HASH_LIMIT:
                h.update(fh.read())
            else:
                h.update(fh.read(SAMPLE_BYTES))
                fh.seek(size - SAMPLE_BYTES)
                h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()[:16]


def component_fingerprints(folder: str | Path | None) -> dict[str, str]:
    """``{subfolder: fingerprint}`` for every ``text_encoder*``, ``tokenizer*`` and ``vae`` subfolder."""
    if folder is None:
        return {}
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {sub.name: _hash_dir(sub) for sub in sorted(folder.iterdir())
            if sub.is_dir() and sub.name.startswith(COMPONENT_PREFIXES)}


def teacher_folder(config) -> Path | None:
    """The teacher's local folder (``builtin:toy`` resolves to the shipped toy teacher), or None."""
    path = config.paths.teacher
    if path == "builtin:toy":
        from ..toy.teacher import TEACHER_ASSET
        return TEACHER_ASSET
    if path.startswith("builtin:"):
        return None
    return Path(path)


def encoding_options(config) -> dict[str, Any]:
    return {k: config.teacher.options[k] for k in ENCODING_OPTIONS if k in config.teacher.options}


def teacher_record(config) -> dict[str, Any]:
    folder = teacher_folder(config)
    comps = component_fingerprints(folder)
    digest = hashlib.sha256(json.dumps(comps, sort_keys=True).encode()).hexdigest()[:16]
    return {"folder": None if folder is None else str(folder.resolve()), "family": config.teacher.family,
            "components": comps, "fingerprint": digest, "encoding_options": encoding_options(config)}


# -------------------------------------------------------------------------------------------------
# Item sources (what gets cached)
# -------------------------------------------------------------------------------------------------
class Items(Protocol):
    has_latents: bool

    def __len__(self) -> int: ...

    def prompts(self, indices: Sequence[int]) -> list[str]: ...

    def describe(self) -> dict[str, Any]: ...


class PromptItems:
    """A prompt file as items (no latents)."""

    has_latents = False

    def __init__(self, prompts: list[str], path: str | Path | None = None) -> None:
        if not prompts:
            raise SenseflowError("no prompts to cache")
        self._prompts, self.path = prompts, None if path is None else Path(path)

    def __len__(self) -> int:
        return len(self._prompts)

    def prompts(self, indices: Sequence[int]) -> list[str]:
        return [self._prompts[i] for i in indices]

    def describe(self) -> dict[str, Any]:
        if self.path is None:
            return {"kind": "prompts", "path": None, "num_items": len(self._prompts)}
        return {"kind": "prompts", "path": str(self.path.resolve()), "sha256": file_sha256(self.path)}


def data_paths(config) -> dict[str, str]:
    """The data inputs that are set: ``prompts``, ``image_text``, ``lmdb`` (the latter two once wired)."""
    out = {}
    for key in ("prompts", "image_text", "lmdb"):
        value = getattr(config.paths, key, None)
        if value is not None:
            out[key] = value
    return out


def source_items(config, check_images: str = "header"):
    """The configured data as items: image-text JSON, LMDB or prompt file (exactly one)."""
    given = data_paths(config)
    if len(given) > 1:
        keys = ", ".join(f"paths.{k}" for k in given)
        raise SenseflowError(f"{keys} are all set: give exactly one data source")
    if not given:
        raise SenseflowError("no data: set paths.prompts (prompt file), paths.image_text (SenseFlow JSON) or "
                             "paths.lmdb (DMD2 LMDB)")
    (key, value), = given.items()
    if key == "image_text":
        from .image_text import ImageTextItems, load_image_text
        return ImageTextItems(load_image_text(value, check=check_images), config.teacher.resolution)
    if key == "lmdb":
        from .lmdb_data import LmdbItems, LmdbLatents
        return LmdbItems(LmdbLatents(value))
    if value in TOY_WORLDS:
        raise SenseflowError(f"paths.prompts {value} draws images on the fly and cannot be cached; "
                             "train from it directly")
    from .prompts import load_prompts
    return PromptItems(load_prompts(value), value)


def _eval_prompts(config) -> list[str] | None:
    path = config.paths.eval_prompts
    if path is None:
        return None
    if path in TOY_WORLDS:
        from ..toy.data import world_prompts
        return world_prompts(path)[:MAX_EVAL_PROMPTS]
    from .prompts import load_prompts
    return load_prompts(path)[:MAX_EVAL_PROMPTS]


# -------------------------------------------------------------------------------------------------
# Building
# -------------------------------------------------------------------------------------------------
def encoding_config(config):
    """The config with the text encoders switched on (a cache-training config may switch them off)."""
    paths_update = {"cache": None} if "cache" in type(config.paths).model_fields else {}
    options = {k: v for k, v in config.teacher.options.items() if k != "load_text_encoders"}
    return config.model_copy(update={"paths": config.paths.model_copy(update=paths_update),
                                     "teacher": config.teacher.model_copy(update={"options": options})})


def _save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False))
    os.replace(tmp, path)


def _cond_tensors(cond: Conditioning, dtype: torch.dtype | None) -> dict[str, Tensor]:
    out = {}
    for k, v in cond.tensors.items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[COND + k] = v
    return out


def _encode_prompts(adapter: ModelAdapter, prompts: list[str], dtype: torch.dtype | None) -> dict[str, Tensor]:
    with torch.no_grad():
        return _cond_tensors(adapter.encode_prompts(prompts), dtype)


def _spec(tensors: dict[str, Tensor]) -> dict[str, dict]:
    return {k: {"shape": list(v.shape[1:]), "dtype": _dtype_name(v.dtype)} for k, v in tensors.items()}


def _check_spec(spec: dict, tensors: dict[str, Tensor], where: str) -> None:
    got = _spec(tensors)
    if got != spec:
        diff = next(k for k in sorted(set(spec) | set(got)) if spec.get(k) != got.get(k))
        raise SenseflowError(f"{where}: {diff} has per-item shape/dtype {got.get(diff)} but earlier batches gave "
                             f"{spec.get(diff)}; this teacher's encoder output varies between batches and cannot "
                             f"be cached")


def build_cache(config, out: str | Path, *, batch_size: int = 16, shard_size: int | None = None,
                overwrite: bool = False, dtype: str | None = None, latent_sample: bool = True,
                check_images: str = "header", progress: bool = True, device: torch.device | str | None = None,
                adapter: ModelAdapter | None = None, items: Items | None = None, log=print) -> Path:
    """Encode the configured data into a cache at ``out`` (see module docstring); returns ``out``.

    ``batch_size``: prompts (images) per encoder call; ``shard_size``: items per shard file (default:
    about :data:`SHARD_BYTES` per shard, at most :data:`MAX_SHARD_ITEMS` items -- a shard is built in memory);
    ``dtype``: store floating tensors as this dtype (default: as the encoders return them);
    ``latent_sample``: cache a posterior sample (seeded per item) rather than the posterior mode;
    ``adapter``: an already loaded teacher adapter with its encoders (default: loaded from the config);
    ``items``: what to cache (default: the config's prompt file / image-text JSON / LMDB).
    """
    from ..rng import derive_seed

    if batch_size < 1 or (shard_size is not None and shard_size < 1):
        raise SenseflowError(f"--batch-size ({batch_size}) and --shard-size ({shard_size}) must be >= 1")
    store_dtype = None
    if dtype is not None:
        if dtype not in ("float32", "bfloat16", "float16"):
            raise SenseflowError(f"--dtype {dtype!r}: use float32, bfloat16 or float16")
        store_dtype = _TORCH_DTYPES[dtype]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SenseflowError(f"cache directory {str(out)!r} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        if (out / INDEX).is_file():
            raise SenseflowError(f"{str(out)!r} already holds a cache; pass --overwrite to rebuild it")
        raise SenseflowError(f"{str(out)!r} exists and is not empty; choose another directory for the cache")

    if items is None:
        items = source_items(config, check_images=check_images)  # validates the data: nothing written yet
    eval_prompts = _eval_prompts(config)
    teacher = teacher_record(config)
    if adapter is None:
        from ..build import load_teacher, resolve_device
        device = torch.device(device) if device is not None else resolve_device(config.train.device)
        adapter, backbone = load_teacher(encoding_config(config), device)
        del backbone
    device = torch.device(device) if device is not None else getattr(adapter, "device", torch.device("cpu"))
    if getattr(adapter, "has_text_encoders", True) is False:
        raise SenseflowError("the teacher was loaded without text encoders; `senseflow cache` needs them "
                             "(remove teacher.options.load_text_encoders)")
    latent_shape = None
    if items.has_latents:
        latent_shape = list(adapter.latent_shape())
        if hasattr(items, "db"):
            items.db.check_adapter(adapter)

    if shard_size is None:  # size shards by bytes: one item's conditioning (+ latent) measured on item 0
        probe = _encode_prompts(adapter, items.prompts([0]), store_dtype)
        per_item = sum(v.element_size() * v[0].numel() for v in probe.values())
        if items.has_latents:
            per_item += (torch.finfo(store_dtype).bits // 8 if store_dtype is not None else 4) * math.prod(latent_shape)
        shard_size = max(1, min(MAX_SHARD_ITEMS, SHARD_BYTES // max(1, per_item)))

    from .. import __version__
    n = len(items)
    num_shards = (n + shard_size - 1) // shard_size
    plan = {"format": FORMAT, "version": FORMAT_VERSION, "teacher": teacher, "resolution": config.teacher.resolution,
            "source": items.describe(), "num_items": n, "shard_size": shard_size, "latents": items.has_latents,
            "latent_sample": latent_sample if items.has_latents else None, "seed": config.train.seed,
            "dtype": dtype, "eval_prompts": eval_prompts, "created_by": f"senseflow {__version__}"}

    partial = out.with_name(out.name + ".partial")
    resumed = 0
    if partial.exists():
        try:
            old = json.loads((partial / PLAN).read_text())
        except (OSError, ValueError):
            old = None
        if old == plan:
            resumed = sum((partial / _shard_name(s)).is_file() for s in range(num_shards))
            if resumed:
                log(f"resuming the interrupted build in {partial}: {resumed}/{num_shards} shards already done")
        else:
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    _write_json(partial / PLAN, plan)

    from tqdm.auto import tqdm

    spec: dict[str, dict] | None = None
    shards = []
    try:
        with tqdm(total=n, desc="caching", unit="item", disable=not progress, dynamic_ncols=True) as bar:
            for s in range(num_shards):
                start, stop = s * shard_size, min(n, (s + 1) * shard_size)
                name = _shard_name(s)
                shards.append({"file": name, "start": start, "num_items": stop - start})
                if (partial / name).is_file():
                    spec = spec or _read_spec(partial / name)
                    bar.update(stop - start)
                    continue
                parts: dict[str, list[Tensor]] = {}
                prompts_all: list[str] = []
                for b in range(start, stop, batch_size):
                    idx = list(range(b, min(stop, b + batch_size)))
                    prompts = items.prompts(idx)
                    tensors = _encode_prompts(adapter, prompts, store_dtype)
                    if items.has_latents:
                        seeds = [derive_seed(config.train.seed, "cache-latents", i) for i in idx]
                        lat = items.latents(idx, adapter, device, seeds=seeds, sample=latent_sample).detach().cpu()
                        if list(lat.shape[1:]) != latent_shape:
                            raise SenseflowError(f"latents have shape {list(lat.shape[1:])} but the teacher needs "
                                                 f"{latent_shape} at resolution {config.teacher.resolution}")
                        tensors[LATENTS] = lat.to(store_dtype) if store_dtype is not None else lat
                    if spec is None:
                        spec = _spec(tensors)
                    _check_spec(spec, tensors, f"items {idx[0]}-{idx[-1]}")
                    for k, v in tensors.items():
                        parts.setdefault(k, []).append(v)
                    prompts_all += prompts
                    bar.update(len(idx))
                _save({k: torch.cat(v) for k, v in parts.items()}, partial / name,
                      {"format": FORMAT, "prompts": json.dumps(prompts_all), "start": str(start)})

            with torch.no_grad():
                try:
                    uncond = _cond_tensors(adapter.unconditional(1), store_dtype)
                except SenseflowError:  # guidance-distilled (FLUX): no unconditional branch to cache
                    uncond = {}
            _save(uncond, partial / UNCOND_FILE, {"format": FORMAT})
            eval_entry = None
            if eval_prompts:
                chunks = [_encode_prompts(adapter, eval_prompts[i:i + batch_size], store_dtype)
                          for i in range(0, len(eval_prompts), batch_size)]
                _save({k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}, partial / EVAL_FILE,
                      {"format": FORMAT, "prompts": json.dumps(eval_prompts)})
                eval_entry = {"file": EVAL_FILE, "num_items": len(eval_prompts)}
    except SenseflowError:
        shutil.rmtree(partial, ignore_errors=True)   # bad input: leave nothing behind
        raise

    index = {k: v for k, v in plan.items() if k not in ("eval_prompts",)}
    index.update({"created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "latent_shape": latent_shape,
                  "tensors": spec, "shards": shards, "uncond": UNCOND_FILE, "eval": eval_entry,
                  "uncond_tensors": _spec(uncond)})
    _write_json(partial / INDEX, index)
    (partial / PLAN).unlink()
    if out.exists():
        old_dir = out.with_name(out.name + ".old")
        shutil.rmtree(old_dir, ignore_errors=True)
        os.replace(out, old_dir)
        os.replace(partial, out)
        shutil.rmtree(old_dir, ignore_errors=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, out)
    return out


def _shard_name(s: int) -> str:
    return f"shard-{s:05d}.safetensors"


def _read_spec(path: Path) -> dict[str, dict]:
    """Per-item shapes and dtypes of a finished shard (header only)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: {"shape": list(f.get_slice(k).get_shape()[1:]),
                    "dtype": _SAFETENSORS_DTYPES.get(f.get_slice(k).get_dtype(), f.get_slice(k).get_dtype())}
                for k in f.keys()}


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


# -------------------------------------------------------------------------------------------------
# Reading
# -------------------------------------------------------------------------------------------------
class PromptCache:
    """A cache directory opened for reading (lazy, memory-mapped); see module docstring."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index_path = self.path / INDEX
        if not index_path.is_file():
            partial = self.path.with_name(self.path.name + ".partial")
            if partial.is_dir():
                raise SenseflowError(f"cache {str(self.path)!r} is incomplete (its build in {str(partial)!r} did not "
                                     f"finish): re-run `senseflow cache` to complete it")
            if not self.path.exists():
                raise SenseflowError(f"cache {str(self.path)!r} not found: build it with `senseflow cache CONFIG`")
            raise SenseflowError(f"cache {str(self.path)!r} has no {INDEX}: not a senseflow cache (build one with "
                                 f"`senseflow cache CONFIG`)")
        try:
            index = json.loads(index_path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise SenseflowError(f"cache {str(self.path)!r}: {INDEX} is corrupt ({exc.__class__.__name__}); rebuild "
                                 f"the cache with `senseflow cache --overwrite`") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise SenseflowError(f"cache {str(self.path)!r}: {INDEX} is not a senseflow cache index")
        if index.get("version") != FORMAT_VERSION:
            raise SenseflowError(f"cache {str(self.path)!r} has format version {index.get('version')}, this senseflow "
                                 f"reads version {FORMAT_VERSION}: rebuild it with `senseflow cache --overwrite`")
        required = ("teacher", "resolution", "num_items", "shards", "tensors", "uncond", "latents")
        missing = [k for k in required if k not in index]
        if missing:
            raise SenseflowError(f"cache {str(self.path)!r}: {INDEX} is corrupt (no {missing[0]!r}); rebuild the cache")
        self.index = index
        try:
            self.num_items = int(index["num_items"])
            self.shards = [(str(s["file"]), int(s["start"]), int(s["num_items"])) for s in index["shards"]]
            self.spec = {str(k): (list(v["shape"]), str(v["dtype"])) for k, v in index["tensors"].items()}
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise SenseflowError(f"cache {str(self.path)!r}: {INDEX} is corrupt ({exc.__class__.__name__} in the shard "
                                 f"or tensor list); rebuild the cache") from None
        total, pos = 0, 0
        for name, start, count in self.shards:
            if start != pos or count <= 0:
                raise SenseflowError(f"cache {str(self.path)!r}: {INDEX} is corrupt (shard {name} starts at {start}, "
                                     f"expected {pos})")
            if not (self.path / name).is_file():
                raise SenseflowError(f"cache {str(self.path)!r}: shard {name} listed in {INDEX} is missing")
            pos += count
            total += count
        if total != self.num_items or self.num_items <= 0:
            raise SenseflowError(f"cache {str(self.path)!r}: {INDEX} is corrupt (shards hold {total} items, index says "
                                 f"{self.num_items})")
        if not (self.path / str(index["uncond"])).is_file():
            raise SenseflowError(f"cache {str(self.path)!r}: {index['uncond']} (the unconditional embedding) is "
                                 f"missing; rebuild the cache")
        self.has_latents = bool(index["latents"]) and LATENTS in self.spec
        self.resolution = int(index["resolution"])
        self.teacher: dict[str, Any] = dict(index["teacher"])
        self._starts = [s for _, s, _ in self.shards]
        self._open: OrderedDict[int, Any] = OrderedDict()
        self._prompts: OrderedDict[int, list[str]] = OrderedDict()

    def __len__(self) -> int:
        return self.num_items

    def __repr__(self) -> str:
        return (f"PromptCache({str(self.path)!r}, items={self.num_items}, shards={len(self.shards)}, "
                f"latents={self.has_latents}, family={self.teacher.get('family')!r})")

    # -- compatibility -------------------------------------------------------------------------------
    def check_compatible(self, config, adapter: ModelAdapter | None = None) -> None:
        """One-line ``SenseflowError`` if this cache was built for another teacher / resolution / options."""
        where = f"cache {str(self.path)!r}"
        rebuild = "rebuild it with `senseflow cache` for this run's config"
        family = self.teacher.get("family")
        if family != config.teacher.family:
            raise SenseflowError(f"{where} was built for teacher family {family!r} but teacher.family is "
                                 f"{config.teacher.family!r}: {rebuild}")
        cached = self.teacher.get("components") or {}
        current = component_fingerprints(teacher_folder(config))
        for name in sorted(set(cached) & set(current)):
            if name == "vae" and not self.has_latents:
                continue  # prompt-only caches do not depend on the VAE
            if cached[name] != current[name]:
                raise SenseflowError(f"{where} was built with a different {name} (fingerprint {cached[name]}, "
                                     f"this teacher's is {current[name]}; the cache's teacher is "
                                     f"{self.teacher.get('folder')!r}): {rebuild}")
        options = encoding_options(config)
        if options != (self.teacher.get("encoding_options") or {}):
            raise SenseflowError(f"{where} was built with teacher.options {self.teacher.get('encoding_options')} but "
                                 f"this run uses {options}: {rebuild}")
        if self.has_latents:
            if self.resolution != config.teacher.resolution:
                raise SenseflowError(f"{where} holds latents at resolution {self.resolution} but teacher.resolution is "
                                     f"{config.teacher.resolution}: {rebuild}")
            if adapter is not None:
                shape, _ = self.spec[LATENTS]
                if tuple(shape) != tuple(adapter.latent_shape()):
                    raise SenseflowError(f"{where} holds latents of shape {shape} but the teacher needs "
                                         f"{list(adapter.latent_shape())}: {rebuild}")

    # -- shards ------------------------------------------------------------------------------------
    def _handle(self, s: int):
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        from safetensors import safe_open

        name, _, count = self.shards[s]
        try:
            f = safe_open(str(self.path / name), framework="pt")
            keys = set(f.keys())
            meta = f.metadata() or {}
        except Exception as exc:  # safetensors raises its own error types for truncated / foreign files
            raise SenseflowError(f"cache {str(self.path)!r}: shard {name} is unreadable ({exc.__class__.__name__}); "
                                 f"rebuild the cache") from None
        if keys != set(self.spec):
            raise SenseflowError(f"cache {str(self.path)!r}: shard {name} holds {sorted(keys)} but {INDEX} lists "
                                 f"{sorted(self.spec)}; rebuild the cache")
        for k, (shape, _) in self.spec.items():
            got = list(f.get_slice(k).get_shape())
            if got != [count, *shape]:
                raise SenseflowError(f"cache {str(self.path)!r}: shard {name} has {k} of shape {got}, {INDEX} says "
                                     f"{[count, *shape]}; rebuild the cache")
        try:
            prompts = json.loads(meta.get("prompts", "null"))
        except ValueError:
            prompts = None
        if not isinstance(prompts, list) or len(prompts) != count:
            raise SenseflowError(f"cache {str(self.path)!r}: shard {name} has no valid prompt list; rebuild the cache")
        self._open[s] = f
        self._prompts[s] = prompts
        while len(self._open) > MAX_OPEN_SHARDS:
            old, _ = self._open.popitem(last=False)
            self._prompts.pop(old, None)
        return f

    def _locate(self, i: int) -> tuple[int, int]:
        import bisect

        if not 0 <= i < self.num_items:
            raise IndexError(f"cache item {i} out of range [0, {self.num_items})")
        s = bisect.bisect_right(self._starts, i) - 1
        return s, i - self._starts[s]

    def items(self, indices: Sequence[int]) -> tuple[list[str], Conditioning, Tensor | None]:
        """``(prompts, conditioning, latents or None)`` for the given item indices (reads only those rows)."""
        rows: dict[str, list[Tensor]] = {k: [] for k in self.spec}
        prompts: list[str] = []
        for i in indices:
            s, j = self._locate(int(i))
            f = self._handle(s)
            prompts.append(self._prompts[s][j])
            for k in self.spec:
                rows[k].append(f.get_slice(k)[j:j + 1])
        tensors = {k: torch.cat(v) for k, v in rows.items()}
        cond = Conditioning({k[len(COND):]: v for k, v in tensors.items() if k.startswith(COND)})
        return prompts, cond, tensors.get(LATENTS)

    def prompts(self, indices: Sequence[int]) -> list[str]:
        out = []
        for i in indices:
            s, j = self._locate(int(i))
            self._handle(s)
            out.append(self._prompts[s][j])
        return out

    def _load_file(self, name: str) -> tuple[dict[str, Tensor], dict[str, str]]:
        from safetensors import safe_open

        try:
            with safe_open(str(self.path / name), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as exc:
            raise SenseflowError(f"cache {str(self.path)!r}: {name} is unreadable ({exc.__class__.__name__}); rebuild "
                                 f"the cache") from None

    def unconditional(self) -> Conditioning:
        """The cached unconditional conditioning (batch 1)."""
        tensors, _ = self._load_file(str(self.index["uncond"]))
        cond = Conditioning({k[len(COND):]: v for k, v in tensors.items() if k.startswith(COND)})
        if not cond.tensors:
            raise SenseflowError(f"cache {str(self.path)!r} holds no unconditional embedding (built for a teacher "
                                 f"without a CFG branch, e.g. FLUX without teacher.options.true_cfg): rebuild it with "
                                 f"the settings of this run")
        if len(cond) != 1:
            raise SenseflowError(f"cache {str(self.path)!r}: the unconditional embedding has batch {len(cond)}, not 1")
        return cond

    def eval_set(self) -> tuple[list[str], Conditioning] | None:
        """The cached sample-grid prompts and their conditioning, if the cache has them."""
        entry = self.index.get("eval")
        if not entry:
            return None
        tensors, meta = self._load_file(str(entry["file"]))
        prompts = json.loads(meta.get("prompts", "[]"))
        return prompts, Conditioning({k[len(COND):]: v for k, v in tensors.items() if k.startswith(COND)})


def open_cache(path: str | Path) -> PromptCache:
    return PromptCache(path)
