"""Checks and safe loaders for metric weights: local files only, one-line errors, no pickled code.

Why one place: every metric takes a user's local folder or file (nothing is downloaded), and each
missing or malformed one must fail with one line naming the expected layout and where people
normally get the weights -- never fall back to a randomly initialised model.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .base import MetricWeightsError

MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt")


def require_path(path: str | Path | None, what: str, layout: str, source: str) -> Path:
    """``path`` as a Path, or one line saying it is missing, what it should hold and where to get it."""
    if path is None or str(path) == "":
        raise MetricWeightsError(f"{what}: no weights given; expected {layout} ({source})")
    path = Path(path).expanduser()
    if not path.exists():
        raise MetricWeightsError(f"{what}: {path} does not exist; expected {layout} ({source})")
    return path


def require_hf_folder(path: str | Path | None, what: str, source: str, *, tokenizer: bool = True,
                      model_type: str | tuple[str, ...] | None = None) -> Path:
    """A transformers model folder: config.json + weights (+ tokenizer files), and the right model_type."""
    layout = "a transformers folder with config.json, model.safetensors" + (" and tokenizer files" if tokenizer else "")
    folder = require_path(path, what, layout, source)
    if not folder.is_dir():
        raise MetricWeightsError(f"{what}: {folder} is not a folder; expected {layout} ({source})")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / name).is_file() for name in MODEL_FILES):
        missing.append("model.safetensors")
    if tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append("tokenizer.json (or vocab files)")
    if missing:
        raise MetricWeightsError(f"{what}: {folder} lacks {', '.join(missing)}; expected {layout} ({source})")
    if model_type is not None:
        import json

        try:
            found = json.loads((folder / "config.json").read_text()).get("model_type")
        except (OSError, ValueError):
            found = None
        wanted = (model_type,) if isinstance(model_type, str) else model_type
        if found not in wanted:
            raise MetricWeightsError(f"{what}: {folder}/config.json has model_type {found!r}, expected "
                                     f"{' or '.join(wanted)} ({source})")
    return folder


def hf_weight_files(folder: Path) -> list[Path]:
    """The files of a transformers folder that define its numbers (weights, config, tokenizer)."""
    names = (*MODEL_FILES, "config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
             "vocab.txt", "special_tokens_map.json", "preprocessor_config.json")
    files = [folder / n for n in names if (folder / n).is_file()]
    files += sorted(p for p in folder.glob("model-*.safetensors"))
    return files


def load_state_dict(path: str | Path, what: str, source: str) -> dict[str, Tensor]:
    """A flat tensor dict from ``.safetensors`` or a torch file, never unpickling code.

    Official checkpoints often wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``); one level
    of such wrapping is unwrapped.  A file that needs arbitrary classes to unpickle is refused.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 -- safetensors raises its own error types
            raise MetricWeightsError(f"{what}: {path} is not a readable safetensors file ({exc}); "
                                     f"expected {source}") from None
    try:
        with warnings.catch_warnings():  # a refused file is reported below in one line, not with torch's warning
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "needs arbitrary classes"
        raise MetricWeightsError(f"{what}: {path} cannot be read without executing pickled code ({first[:120]}); "
                                 f"senseflow only reads plain tensor checkpoints: re-save its state_dict, or use "
                                 f"{source}") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise MetricWeightsError(f"{what}: {path} is not a readable torch checkpoint ({exc.__class__.__name__}); "
                                 f"expected {source}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise MetricWeightsError(f"{what}: {path} does not hold a flat tensor state dict; expected {source}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}
