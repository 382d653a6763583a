"""Loading diffusers folders safely (shared by every family adapter: SD3, FLUX, SDXL, SANA).

Rules every helper here follows:

* **Never download.**  Paths must be local folders; every ``from_pretrained`` is called on a local
  directory with ``local_files_only=True``.  A hub id is rejected with a message, not resolved.
* **Check before loading.**  Offline, ``CLIPTokenizer.from_pretrained`` of a missing folder silently
  returns an *empty* tokenizer, and a model folder without weights falls back to other file
  names with confusing messages.  So the files are checked first, the model class is read from
  ``config.json`` and compared with what the adapter expects, and only then is anything loaded.
* **One-line errors.**  Every problem raises :class:`~senseflow.teachers.base.SenseflowError` with one
  line that names the path, the problem and the fix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from .base import SenseflowError

#: sets of files any one of which makes a tokenizer folder loadable
TOKENIZER_FILE_SETS: tuple[tuple[str, ...], ...] = (
    ("tokenizer.json",),                 # every fast tokenizer (CLIP, T5, Gemma, word-level, ...)
    ("vocab.json", "merges.txt"),        # slow BPE (CLIP, GPT-2 style)
    ("spiece.model",),                   # SentencePiece (T5)
    ("tokenizer.model",),                # SentencePiece (Llama / Gemma)
    ("vocab.txt",),                      # WordPiece (BERT style)
)

WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")


def one_line(text: object, limit: int = 300) -> str:
    """Collapse an exception message to one (bounded) line."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


# -------------------------------------------------------------------------------------------------
# Folders and JSON
# -------------------------------------------------------------------------------------------------
def as_folder(folder: str | os.PathLike, what: str = "model folder") -> Path:
    """``folder`` as an existing local directory (a hub id or a missing path is an error)."""
    path = Path(os.path.expanduser(str(folder)))
    if not path.exists():
        hint = (" (it looks like a hub id; nothing is downloaded: download the model and pass its local folder)"
                if "/" in str(folder) and not str(folder).startswith(("/", ".", "~")) and str(folder).count("/") == 1
                else "")
        raise SenseflowError(f"{what} {str(folder)!r} does not exist{hint}: pass the path of a local diffusers folder")
    if not path.is_dir():
        raise SenseflowError(f"{what} {str(folder)!r} is a file, not a folder: pass the diffusers folder that holds "
                             f"model_index.json and the component subfolders")
    return path


def has_subfolder(folder: str | os.PathLike, name: str) -> bool:
    return (Path(folder) / name).is_dir()


def require_subfolder(folder: str | os.PathLike, name: str, hint: str | None = None) -> Path:
    """``folder/name`` as an existing directory, or a one-line error naming it."""
    folder = as_folder(folder)
    sub = folder / name
    if not sub.is_dir():
        fix = hint or f"point the teacher path at a complete diffusers folder (one with a {name}/ subfolder)"
        raise SenseflowError(f"{folder} has no {name}/ subfolder: {fix}")
    return sub


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SenseflowError(f"{path} is missing: the folder is incomplete; copy it again from the original model")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SenseflowError(f"cannot read {path}: {one_line(exc)}; fix or re-download the file") from None
    if not isinstance(data, dict):
        raise SenseflowError(f"{path} does not hold a JSON object: fix or re-download the file")
    return data


def read_model_index(folder: str | os.PathLike) -> dict[str, Any] | None:
    """``model_index.json`` of a diffusers folder, or ``None`` when the folder has none."""
    path = Path(folder) / "model_index.json"
    return read_json(path) if path.is_file() else None


def index_declares(index: Mapping[str, Any] | None, component: str) -> bool | None:
    """Whether ``model_index.json`` lists ``component`` as present (``True``), absent (``[null, null]``,
    ``False``) or does not mention it / there is no index (``None``)."""
    if index is None or component not in index:
        return None
    spec = index[component]
    if spec is None:
        return False
    if isinstance(spec, (list, tuple)):
        return any(s is not None for s in spec)
    return True


def pipeline_family(index: Mapping[str, Any] | None) -> str | None:
    """The adapter family suggested by ``model_index.json``'s pipeline class, if recognisable."""
    if not index:
        return None
    from . import registry

    # each family's descriptor lists its pipeline prefixes; the longest matching prefix wins
    return registry.family_of_pipeline(str(index.get("_class_name") or ""))


def read_config(subfolder: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a model subfolder."""
    sub = Path(subfolder)
    if not (sub / "config.json").is_file():
        raise SenseflowError(f"{sub} has no config.json: the {sub.name}/ component is incomplete; "
                             f"copy it again from the original model")
    return read_json(sub / "config.json")


def config_class_name(config: Mapping[str, Any]) -> str | None:
    """The class a ``config.json`` was saved from: diffusers ``_class_name`` or transformers ``architectures[0]``."""
    name = config.get("_class_name")
    if name:
        return str(name)
    arch = config.get("architectures")
    if isinstance(arch, (list, tuple)) and arch:
        return str(arch[0])
    return None


def check_model_class(subfolder: str | os.PathLike, expected: str | Sequence[str],
                      adapter: str | None = None) -> dict[str, Any]:
    """Read ``subfolder/config.json`` and make sure it was saved from one of the ``expected`` classes.

    Returns the config.  ``adapter`` (e.g. ``"SD3"``) is used in the message; when the class found
    belongs to another known family the message names the adapter to use instead.
    """
    sub = Path(subfolder)
    config = read_config(sub)
    expected = (expected,) if isinstance(expected, str) else tuple(expected)
    found = config_class_name(config)
    if found in expected:
        return config
    want = " or ".join(expected)
    who = f"the {adapter} adapter" if adapter else "this adapter"
    if found is None:
        raise SenseflowError(f"{sub}/config.json names no model class (no _class_name or architectures): "
                             f"{who} expects {want}; re-save the model with save_pretrained")
    from . import registry

    owner = registry.family_of_backbone_class(found)
    family = owner.name if owner is not None else None
    fix = (f"this is a {family.upper()} model: use the {family} teacher family" if family
           else f"point {who} at a folder whose {sub.name}/ holds a {want}")
    raise SenseflowError(f"{sub}/config.json is a {found}, but {who} expects {want}: {fix}")


def require_weights(subfolder: str | os.PathLike) -> None:
    """A model subfolder must hold weight files (safetensors / bin / sharded index)."""
    sub = Path(subfolder)
    files = [p.name for p in sub.iterdir() if p.is_file()]
    if not any(f.endswith(WEIGHT_SUFFIXES) for f in files):
        raise SenseflowError(f"{sub} has a config.json but no weights (*.safetensors / *.bin): the download of "
                             f"{sub.name}/ is incomplete; copy the weight files into it")


def read_scheduler_config(folder: str | os.PathLike) -> dict[str, Any]:
    """``scheduler/scheduler_config.json`` or ``{}`` when the folder has no ``scheduler/``."""
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    return read_json(path) if path.is_file() else {}


# -------------------------------------------------------------------------------------------------
# Tokenizers
# -------------------------------------------------------------------------------------------------
def tokenizer_files_present(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and any(all((path / f).is_file() for f in group) for group in TOKENIZER_FILE_SETS)


def load_tokenizer(path: str | os.PathLike, tokenizer_class: Any = None):
    """Load a tokenizer from a local folder, refusing folders without tokenizer files.

    ``tokenizer_class`` (a transformers class) is used when given; otherwise ``AutoTokenizer`` (with a
    fallback to ``PreTrainedTokenizerFast`` for folders that only hold ``tokenizer.json``).
    """
    path = Path(path)
    expected = " or ".join("+".join(g) for g in TOKENIZER_FILE_SETS)
    if not path.is_dir():
        raise SenseflowError(f"tokenizer folder {path} is missing: expected {expected}; copy the tokenizer "
                             f"subfolder from the original model")
    if not tokenizer_files_present(path):
        raise SenseflowError(f"tokenizer files missing in {path}: expected {expected}; copy them from the "
                             f"original model")
    try:
        if tokenizer_class is not None:
            tok = tokenizer_class.from_pretrained(str(path), local_files_only=True)
        else:
            from transformers import AutoTokenizer, PreTrainedTokenizerFast

            try:
                tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            except (ValueError, OSError, KeyError):
                if not (path / "tokenizer.json").is_file():
                    raise
                tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    except SenseflowError:
        raise
    except Exception as exc:  # noqa: BLE001 -- any loader failure becomes a one-line user error
        raise SenseflowError(f"cannot load the tokenizer in {path}: {one_line(exc)}; "
                             f"copy the tokenizer files again from the original model") from None
    if len(tok) <= 3:
        raise SenseflowError(f"the tokenizer in {path} loaded EMPTY ({len(tok)} tokens): its files are broken; "
                             f"copy them again from the original model")
    return tok


def tokenizer_max_length(tokenizer, fallback: int | None = None) -> int | None:
    """``tokenizer.model_max_length`` unless it is transformers' "unset" sentinel (a huge number)."""
    n = getattr(tokenizer, "model_max_length", None)
    if n is None or n > 1_000_000:
        return fallback
    return int(n)


# -------------------------------------------------------------------------------------------------
# Models
# -------------------------------------------------------------------------------------------------
def _dtype_kwarg(cls: type) -> str:
    """transformers >= 4.56 takes ``dtype=``; diffusers and older transformers take ``torch_dtype=``."""
    if cls.__module__.startswith("transformers"):
        import transformers

        major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
        if (major, minor) >= (4, 56):
            return "dtype"
    return "torch_dtype"


def load_model(cls: type, subfolder: str | os.PathLike, *, expected_class: str | Sequence[str] | None = None,
               dtype: torch.dtype | None = None, device: torch.device | str | None = None,
               frozen: bool = False, adapter: str | None = None, **kwargs: Any) -> nn.Module:
    """Load one model component (diffusers or transformers class) from a local subfolder.

    Checks config.json's class (``expected_class``, default ``cls.__name__``) and the presence of
    weights before calling ``cls.from_pretrained(..., local_files_only=True)``.  ``frozen`` puts the
    model in eval mode without parameter gradients (text encoders, VAEs).
    """
    sub = Path(subfolder)
    if not sub.is_dir():
        raise SenseflowError(f"{sub} is missing: point the teacher at a folder with a {sub.name}/ subfolder")
    check_model_class(sub, expected_class or cls.__name__, adapter=adapter)
    require_weights(sub)
    load_kwargs: dict[str, Any] = {"local_files_only": True, **kwargs}
    if dtype is not None:
        load_kwargs[_dtype_kwarg(cls)] = dtype
    try:
        model = cls.from_pretrained(str(sub), **load_kwargs)
    except SenseflowError:
        raise
    except Exception as exc:  # noqa: BLE001 -- OSError, size mismatches (RuntimeError), bad configs (ValueError)
        raise SenseflowError(f"cannot load {cls.__name__} from {sub}: {one_line(exc)}; "
                             f"check that the folder is complete and matches its config.json") from None
    if device is not None:
        model = model.to(device)
    if frozen:
        model.requires_grad_(False)
        model.eval()
    return model


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a module's floating-point parameters (``float32`` for a parameterless module)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def find_module_name(module: nn.Module, leaf: str, types: Iterable[type] | None = None) -> str | None:
    """Qualified name of the shallowest submodule whose last name component is ``leaf``.

    Works through wrappers that prefix names (``torch.compile``'s ``_orig_mod.``, DDP's ``module.``).
    """
    best: str | None = None
    types = tuple(types) if types else None
    for name, sub in module.named_modules():
        if name.split(".")[-1] != leaf:
            continue
        if types and not isinstance(sub, types):
            continue
        if best is None or name.count(".") < best.count("."):
            best = name
    return best


# -------------------------------------------------------------------------------------------------
# Shared by the family adapters (added for FLUX / SDXL / SANA)
# -------------------------------------------------------------------------------------------------
def config_of(obj: Any) -> dict[str, Any]:
    """A config as a plain dict: a dict, a diffusers FrozenDict, a transformers PretrainedConfig or a model."""
    if isinstance(obj, Mapping):
        return dict(obj)
    cfg = getattr(obj, "config", obj)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    if hasattr(cfg, "to_dict"):
        return dict(cfg.to_dict())
    raise TypeError(f"cannot read a config from {type(obj).__name__}")


def component_present(folder: str | os.PathLike, index: Mapping[str, Any] | None, name: str) -> bool:
    """Whether ``folder/name`` exists; a component that ``model_index.json`` lists but that is missing is an error.

    ``"name": [null, null]`` in ``model_index.json`` declares a component deliberately absent.
    """
    if has_subfolder(folder, name):
        return True
    if index_declares(index, name):
        raise SenseflowError(f"model_index.json lists {name} but {Path(folder) / name} is missing: copy it from the "
                             f"original model, or set \"{name}\": [null, null] in model_index.json to run without it")
    return False


def check_pipeline_family(folder: str | os.PathLike, index: Mapping[str, Any] | None, family: str) -> None:
    """Refuse a folder whose ``model_index.json`` names another family's pipeline (one-line error)."""
    fam = pipeline_family(index)
    if fam is not None and fam != family:
        raise SenseflowError(f"{folder}/model_index.json is a {index.get('_class_name')}, not a {family.upper()} "
                             f"pipeline: use the {fam} teacher family for this folder")


def require_keys(config: Mapping[str, Any], keys: Iterable[str], where: str | os.PathLike) -> None:
    """Every key must be in a ``config.json`` (otherwise the file was not saved by ``save_pretrained``)."""
    for key in keys:
        if key not in config:
            raise SenseflowError(f"{where}/config.json has no {key}: re-save the model with save_pretrained")


def check_folder_family(folder: str | os.PathLike, family: str) -> None:
    """Refuse (one line, naming both) a teacher folder whose ``model_index.json`` is another family's pipeline.

    Run by ``Config.check_paths`` (so ``senseflow train --dry-run`` catches it before anything is
    loaded); a folder without ``model_index.json`` or with an unknown pipeline class passes here and
    is checked by the family's loader.
    """
    index = read_model_index(Path(folder))
    found = pipeline_family(index)
    from . import registry

    descriptor = registry.find(family)
    accepted = {family, *(descriptor.reads_folders_of if descriptor is not None else ())}
    if found is not None and found not in accepted:
        raise SenseflowError(f"paths.teacher: {folder}/model_index.json is a {index.get('_class_name')} (family "
                             f"{found!r}) but teacher.family is {family!r}: set teacher.family: {found} or point "
                             f"paths.teacher at a {family} folder")
