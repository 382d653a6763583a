"""``benchmarks/gpu_suite.sh --dry-run``: the GPU suite's plumbing on CPU (tiny preset, one iteration).

Numbers are not asserted (CPU, tiny); the table and JSON must hold every planned case with the
status it got, and the derived columns must follow from the bench result.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # ~13 s: one Python process, four tiny bench runs
def test_gpu_suite_dry_run_writes_json_and_markdown(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_suite.sh"), "--dry-run", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads((tmp_path / "suite.json").read_text())
    status = {r["case"]: r["status"] for r in payload["results"]}
    assert status == {"sid-sd35m-compile-off": "ok", "sid-sd35m-compile-on": "planned",
                      "senseflow-sd35m-compile-off": "ok", "senseflow-sd35m-compile-on": "planned",
                      "flux-dev-lora-compile-off": "ok", "flux-dev-lora-compile-on": "planned"}
    sid = next(r for r in payload["results"] if r["case"] == "sid-sd35m-compile-off")
    bench = sid["bench"]
    assert bench["preset"] == "tiny" and bench["precision"] == "bf16" and bench["activation_checkpointing"]
    assert bench["batch_size"] == 2 and bench["iterations"] == 1
    assert math.isclose(sid["s_per_1k_images"], 1000.0 * bench["step_time_s"] / (bench["batch_size"] * bench["world_size"]))
    assert sid["gpu_s_per_1k_images"] == sid["s_per_1k_images"] * bench["world_size"]
    assert sid["estimated_bytes"] > 0
    lora = next(r for r in payload["results"] if r["case"] == "flux-dev-lora-compile-off")
    assert lora["settings"]["lora_rank"] == 2 and lora["bench"]["lora_rank"] == 2 and lora["bench"]["shared_base"]
    full = next(r for r in payload["results"] if r["case"] == "senseflow-sd35m-compile-off")
    assert lora["estimated_bytes"] < full["estimated_bytes"]   # one shared frozen base + adapters vs three trained copies
    table = (tmp_path / "suite.md").read_text()
    assert "DRY RUN" in table and table.count("\n| ") == 2 + 6  # header, separator, one row per case
