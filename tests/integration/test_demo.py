"""`senseflow demo` on a tiny budget writes metrics.json (documented schema), grid.png and curves.png."""

import json

import pytest

from senseflow.toy.demo import run_demo
from senseflow.toy.teacher import create_teacher_folder


@pytest.fixture(scope="module")
def untrained_teacher(tmp_path_factory):
    return create_teacher_folder(tmp_path_factory.mktemp("toy_teacher"), seed=0)


@pytest.mark.parametrize("method", ["senseflow", "sid"])
def test_demo_writes_metrics_grid_and_curves(untrained_teacher, tmp_path, method):
    out = tmp_path / "demo"
    results = run_demo(out, method=method, steps=4, iterations=2, eval_prompts=4, per_prompt=2, eval_every=1,
                       overrides=[f"paths.teacher={untrained_teacher}", "train.batch_size=4", "train.log_every=1",
                                  *(["generator.ema.decay=0.9"] if method == "senseflow" else [])],
                       progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(results))
    for key in ("teacher", "teacher_4step"):
        assert {"steps", "nfe", "attr_acc", "fd_real", "seconds_per_image"} <= metrics[key].keys()
    assert metrics["teacher"]["steps"] == 32 and metrics["teacher_4step"]["steps"] == 4
    from senseflow.student import read_student   # the student is exported like `senseflow train` does
    spec = read_student(out / "run")
    assert spec.meta["method"] == method and len(spec.anchors) == 4 and spec.meta["step"] == 2
    student = metrics["student"]
    assert {"method", "steps", "nfe", "attr_acc", "fd_real", "fd_teacher", "seconds_per_image"} <= student.keys()
    assert student["method"] == method and student["nfe"] == 4
    assert metrics["iterations"] == 2 and metrics["train_seconds"] > 0
    assert 0.0 <= student["attr_acc"] <= 1.0 and student["fd_real"] >= 0
    assert [c["iteration"] for c in metrics["curve"]] == [0, 1, 2]
    versus = metrics["student_vs_teacher_4step"]["attr_acc"]
    assert versus["num_prompts"] == 4 and versus["ci95"][0] <= versus["gain"] <= versus["ci95"][1]
    for png in ("grid.png", "curves.png"):
        assert (out / png).stat().st_size > 1000
    if method == "senseflow":
        _check_served_weights_are_the_ema(out / "run" / "student", untrained_teacher)


def _check_served_weights_are_the_ema(student, teacher):
    """With an EMA of decay 0.9 (set above for senseflow): 2 iterations at TTUR 5 are ONE G step, so the served
    weights must be 0.9 x the initial weights (the teacher's) + 0.1 x the raw weights after that step."""
    import torch
    from safetensors.torch import load_file

    served, raw = load_file(str(student / "student.safetensors")), load_file(str(student / "student_raw.safetensors"))
    init = load_file(str(next((teacher / "transformer").glob("*.safetensors"))))
    moved = [k for k in raw if not torch.equal(raw[k], init[k])]
    assert moved, "the G step changed no weight"
    for k in moved[:5]:
        torch.testing.assert_close(served[k], 0.9 * init[k] + 0.1 * raw[k], rtol=1e-5, atol=1e-6)
