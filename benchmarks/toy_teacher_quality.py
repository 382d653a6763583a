"""Teacher quality in the toy world: attribute accuracy per sampler and CFG scale (docs/toy.md).

    .venv/bin/python benchmarks/toy_teacher_quality.py [TEACHER_FOLDER]

64 evaluation prompts x 1 seed (noise seed 0); prints one JSON line per setting: first on the fully
specified prompts (the quality bar is 32 steps, CFG 3), then on the same prompts with their positions
left out (open prompts: many layouts per prompt, where few Euler steps fall behind).
"""

from __future__ import annotations

import json
import sys

from senseflow.toy.teacher import teacher_quality

SETTINGS = ((32, 1.0), (32, 2.0), (32, 3.0), (32, 5.0), (4, 3.0))
OPEN_SETTINGS = ((32, 3.0), (8, 3.0), (4, 3.0))
KEYS = ("attr_acc", "fd_real", "shape", "color", "size", "position", "background", "count")


def main(folder: str | None = None) -> None:
    for open_positions, settings in ((False, SETTINGS), (True, OPEN_SETTINGS)):
        for r in teacher_quality(settings, folder=folder, open_positions=open_positions):
            print(json.dumps({"prompts": "open" if open_positions else "closed", "steps": r["steps"], "cfg": r["cfg"],
                              **{k: round(r[k], 3) for k in KEYS}}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
