"""The fixed (prompt, seed) pairs an evaluation is made of.

Index ``i`` is prompt ``i // per_prompt`` with seed :func:`senseflow.generate.image_seed`
``(base_seed, i)``: the same seed ``senseflow generate`` gives index ``i``, so an evaluation image can
be reproduced with ``senseflow generate`` or a stock pipeline call, and any subset of the indices
(a shard, a resumed tail) gets exactly the same images.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..teachers.base import SenseflowError


@dataclass
class PromptSet:
    prompts: list[str]              # one entry per evaluation index (each base prompt repeated per_prompt times)
    seeds: list[int]
    base_seed: int
    per_prompt: int
    source: str                     # where the prompts came from (file, builtin:..., coco:...)
    file_sha256: str | None = None  # sha256 of the prompt/annotation file, when there is one
    real_images: list[Path] = field(default_factory=list)   # real images (COCO protocols, --real-images)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def sha256(self) -> str:
        """sha256 of the exact prompt list evaluated (canonical JSON)."""
        return hashlib.sha256(json.dumps(self.prompts, ensure_ascii=False).encode()).hexdigest()

    def as_json(self) -> dict:
        return {"source": self.source, "base_seed": self.base_seed, "per_prompt": self.per_prompt,
                "items": [{"index": i, "prompt": p, "seed": s} for i, (p, s) in enumerate(zip(self.prompts, self.seeds))]}


def expand(base: list[str], base_seed: int, per_prompt: int, source: str, file_sha256: str | None = None,
           real_images: list[Path] | None = None) -> PromptSet:
    from ..generate import image_seed

    if per_prompt < 1:
        raise SenseflowError(f"--per-prompt must be >= 1, got {per_prompt}")
    prompts = [p for p in base for _ in range(per_prompt)]
    seeds = [image_seed(base_seed, i) for i in range(len(prompts))]
    return PromptSet(prompts, seeds, base_seed, per_prompt, source, file_sha256, list(real_images or []))


def file_sha256(path: str | Path) -> str:
    from .metrics.base import sha256_file
    return sha256_file(path)


def from_source(source: str, num_prompts: int | None, base_seed: int, per_prompt: int) -> PromptSet:
    """``--prompts``: a .txt/.json/.csv file, or ``builtin:toy-world`` / ``builtin:toy-world-open``."""
    from ..config import TOY_WORLDS

    if num_prompts is not None and num_prompts < 1:
        raise SenseflowError(f"--num-prompts must be >= 1, got {num_prompts}")
    if source.startswith("builtin:"):
        if source not in TOY_WORLDS:
            raise SenseflowError(f"--prompts {source!r}: unknown built-in (available: {', '.join(TOY_WORLDS)})")
        from ..toy.world import evaluation_prompts
        base = evaluation_prompts(num_prompts or 64, open_positions=TOY_WORLDS[source] > 0)
        return expand(base, base_seed, per_prompt, source)
    from ..data.prompts import load_prompts

    if not Path(source).is_file():
        raise SenseflowError(f"--prompts {source!r} not found: pass a prompt file (.txt one per line, .json list, "
                             f".csv with a 'prompt' column) or builtin:toy-world")
    base = load_prompts(source)
    if num_prompts is not None:
        base = base[:num_prompts]
    return expand(base, base_seed, per_prompt, source, file_sha256(source))
