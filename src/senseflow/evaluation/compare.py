"""``senseflow evaluate --compare``: several finished evaluations (students, steps, checkpoints) in one table.

Rows are copied from each ``results.json`` unchanged; a label that appears in two evaluations is
prefixed with its folder name.  Only evaluations of the same prompt list are merged (their
``prompts_sha256`` must agree): numbers from different prompts or sample counts are not comparable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..teachers.base import SenseflowError
from .report import write_markdown
from .store import write_json_atomic


def _load(item: str) -> tuple[Path, dict]:
    p = Path(item)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise SenseflowError(f"--compare {item!r}: no results.json there (an evaluation's --out folder or its "
                             f"results.json)")
    try:
        return p, json.loads(p.read_text())
    except ValueError:
        raise SenseflowError(f"--compare {item!r}: {p} is not valid JSON") from None


def compare(items: Sequence[str], out: str | None) -> Path:
    if out is None:
        raise SenseflowError("--compare needs --out DIR for the merged table")
    loaded = [_load(i) for i in items]           # every input is checked before anything is written
    shas = {r.get("prompts_sha256") for _, r in loaded}
    if len(shas) > 1:
        raise SenseflowError("--compare: these evaluations used different prompt lists (prompts_sha256 differs); "
                             "only evaluations of the same prompts and seeds can share a table")
    merged: dict = {"protocol": loaded[0][1].get("protocol"), "num_images": loaded[0][1]["num_images"],
                    "prompts_sha256": shas.pop(), "reference": loaded[0][1].get("reference"), "sources": {},
                    "merged_from": [str(p) for p, _ in loaded]}
    for path, res in loaded:
        for label, row in res["sources"].items():
            if label in merged["sources"]:
                if row == merged["sources"][label]:
                    continue                     # the same teacher row in several evaluations
                label = f"{path.parent.name}/{label}"
            merged["sources"][label] = row
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise SenseflowError(f"--out {out!r} exists and is not a directory")
    write_json_atomic(out_dir / "results.json", merged)
    write_markdown(out_dir / "results.md", merged)
    return out_dir / "results.md"
