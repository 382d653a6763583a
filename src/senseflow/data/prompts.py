"""Prompt-only data (data-free distillation): loading prompt files and a resumable, rank-sharded stream."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from ..rng import derive_seed
from ..teachers.base import SenseflowError


def load_prompts(path: str | Path, column: str = "prompt") -> list[str]:
    """Read prompts from ``.txt`` (one per line), ``.json`` (a list, or ``{"prompts": [...]}``) or ``.csv``.

    Blank ``.txt`` lines and empty CSV cells are skipped; in JSON, ``""`` is kept: the empty
    (unconditional) prompt, e.g. ``["", "a cat"]`` or ``[""]`` for an unconditional model.
    """
    p = Path(path)
    if p.is_dir():
        raise SenseflowError(f"prompt file {str(p)!r} is a directory; give a .txt, .json or .csv file")
    if not p.is_file():
        raise SenseflowError(f"prompt file {str(p)!r} not found")
    suffix = p.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(p.read_text())
            prompts = data.get("prompts") if isinstance(data, dict) else data
            if not isinstance(prompts, list) or not all(isinstance(x, str) for x in prompts):
                raise SenseflowError(f"prompt file {str(p)!r}: expected a JSON list of strings or {{\"prompts\": [...]}}")
        elif suffix == ".csv":
            with p.open(newline="") as fh:
                reader = csv.DictReader(fh)
                if reader.fieldnames is None or column not in reader.fieldnames:
                    raise SenseflowError(f"prompt file {str(p)!r}: no column {column!r} (found {reader.fieldnames})")
                prompts = [row[column] for row in reader]
        else:
            prompts = p.read_text().splitlines()
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SenseflowError(f"prompt file {str(p)!r} cannot be parsed ({exc.__class__.__name__})") from exc
    if suffix == ".json":  # a JSON string is written on purpose: "" is the empty (unconditional) prompt
        prompts = [x.strip() for x in prompts]
    else:  # a blank line or CSV cell is most likely an accident: dropped
        prompts = [x.strip() for x in prompts if x.strip()]
    if not prompts:
        raise SenseflowError(f"prompt file {str(p)!r} contains no prompts")
    return prompts


class PromptStream:
    """Endless batches of prompts: a fresh permutation per epoch, this rank's disjoint shard of it.

    The position (epoch, index within the shard) is part of every checkpoint, so a resumed run
    continues with exactly the prompts it would have seen.
    """

    def __init__(self, prompts: list[str], batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if len(prompts) < world_size:
            raise SenseflowError(f"{len(prompts)} prompts cannot be shared among {world_size} processes")
        self.prompts = prompts
        self.batch_size = batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.position = 0, 0
        self._order = self._shard(0)

    def _shard(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, "prompts", epoch))
        perm = torch.randperm(len(self.prompts), generator=g).tolist()
        usable = len(perm) - len(perm) % self.world_size  # equal shards: every rank takes the same steps
        return perm[self.rank:usable:self.world_size]

    def next_prompts(self) -> list[str]:
        out: list[str] = []
        while len(out) < self.batch_size:
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._shard(self.epoch)
            take = min(self.batch_size - len(out), len(self._order) - self.position)
            out += [self.prompts[i] for i in self._order[self.position:self.position + take]]
            self.position += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._shard(self.epoch)
