"""senseflow evaluate under torchrun (2 gloo processes) gives exactly the numbers and images of one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests/distributed/eval_worker.py"


def make_toy_student(folder: Path) -> Path:
    from senseflow.export import export_student
    from senseflow.generator import FewStepGenerator
    from senseflow.schedules import anchors as unit_to_native
    from senseflow.teachers.base import Denoiser
    from senseflow.toy.teacher import load_toy_teacher

    adapter, backbone = load_toy_teacher()
    gen = FewStepGenerator(Denoiser(backbone, adapter), unit_to_native(adapter.schedule, [1.0, 0.5]))
    export_student(gen, folder / "student", {"family": "toy", "teacher": "builtin:toy", "resolution": 32,
                                             "sampler": "stochastic", "method": "none", "step": 0})
    return folder


def run(args, nproc: int | None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(WORKER), *args] if nproc is None else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_sharded_evaluation_equals_one_process(tmp_path):
    student = make_toy_student(tmp_path / "toyrun")
    run([str(tmp_path / "single"), str(tmp_path / "cache1"), str(student)], None)
    run([str(tmp_path / "sharded"), str(tmp_path / "cache2"), str(student)], 2)
    one = json.loads((tmp_path / "single/results.json").read_text())
    two = json.loads((tmp_path / "sharded/results.json").read_text())
    for label in ("teacher", "fake", "toy"):
        assert two["sources"][label]["metrics"] == one["sources"][label]["metrics"], label
        for i in range(6):
            assert (tmp_path / f"sharded/images/{label}/{i:05d}.png").read_bytes() == \
                   (tmp_path / f"single/images/{label}/{i:05d}.png").read_bytes(), (label, i)
    # each rank made only its own indices (0, 2, 4 and 1, 3, 5), and only the main process wrote the results
    for rank in (0, 1):
        counts = json.loads((tmp_path / f"sharded/rendered-{rank}.json").read_text())
        assert counts == {"teacher": 3, "fake": 3}
    assert not (tmp_path / "sharded/results.json.tmp").exists()
