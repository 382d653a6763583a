"""train.eval: periodic evaluation logged to metrics.jsonl / TensorBoard, and the best student kept by a metric."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from senseflow import api
from senseflow.config import apply_overrides, validate
from senseflow.train.trainer import TrainerHooks

ROOT = Path(__file__).resolve().parents[2]


def tiny_config(out: Path, *overrides: str):
    base = yaml.safe_load((ROOT / "configs/examples/tiny_custom.yaml").read_text())
    return validate(apply_overrides(base, [f"paths.output={out}", f"paths.prompts={ROOT / 'configs/examples/prompts.txt'}",
                                           "train.progress=false", "train.tensorboard=false", "teacher.resolution=8",
                                           "train.batch_size=2", "train.steps=6", "train.log_every=2", *overrides]))


@pytest.mark.slow
def test_train_eval_logs_every_n_steps_and_keeps_the_best_student(tmp_path):
    """The toy evaluator on the tiny custom teacher's images (numbers without meaning, bookkeeping exact)."""
    out = tmp_path / "run"
    config = tiny_config(out, "train.eval={every: 2, prompts: 'builtin:toy-world', num_prompts: 4, per_prompt: 2, "
                              "metrics: [toy], best_metric: fd_real, best_mode: min}")
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def snapshot(trainer, step):
        if step % 2 == 0:
            backbone = trainer.method.models.generator.denoiser.backbone
            snapshots[step] = {k: v.detach().clone() for k, v in backbone.state_dict().items()}

    trainer = api.train(config, hooks=TrainerHooks(on_step=[snapshot]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/fd_real" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all(0.0 <= r["eval/attr_acc"] <= 1.0 for r in evals)
    best_row = min(evals, key=lambda r: r["eval/fd_real"])
    best = json.loads((out / "best/best.json").read_text())
    assert best["step"] == best_row["step"] and best["value"] == pytest.approx(best_row["eval/fd_real"])
    saved = load_file(str(out / "best/student.safetensors"))
    want = snapshots[best["step"]]
    assert saved.keys() == want.keys()
    assert all(torch.equal(saved[k], want[k]) for k in want)
    moved = any(not torch.equal(snapshots[2][k], snapshots[6][k]) for k in want)
    assert moved, "training must move the generator for 'the best step's weights' to mean anything"
    hook = next(h for h in trainer.hooks.on_step if h is not snapshot)
    assert [h["step"] for h in hook.history] == [2, 4, 6]
    # the best student is a loadable student folder
    from senseflow.student import read_student
    assert read_student(out / "best").meta["step"] == best["step"]


def test_train_eval_checks_its_inputs_before_the_run_starts(tmp_path):
    from senseflow.teachers.base import SenseflowError

    out = tmp_path / "run"
    with pytest.raises(SenseflowError, match="unknown metric 'nosuch'"):
        api.build_trainer(tiny_config(out, "train.eval={every: 2, metrics: [nosuch]}"))
    with pytest.raises(SenseflowError, match="prompt file"):
        api.build_trainer(tiny_config(out, f"train.eval={{every: 2, prompts: {tmp_path / 'missing.txt'}}}"))
    assert not out.exists()
    with pytest.raises(SenseflowError, match="train.eval.every"):
        tiny_config(out, "train.eval={every: -1}")


def test_logged_means_are_over_the_iterations_that_ran_each_phase(tmp_path):
    """With TTUR, G's losses appear in one iteration of ``ttur``: the logged loss_g must be the mean over G's steps,
    not diluted by the fake-score iterations (the bug: every key divided by the window's length)."""
    out = tmp_path / "run"
    trainer = api.build_trainer(tiny_config(out, "method.ttur=3", "train.log_every=6", "train.num_samples=0"),
                                resume="never")
    seen: dict[str, list[float]] = {}
    run_phase = trainer.run_phase

    def recording(phase, batch):
        logs = run_phase(phase, batch)
        for k, v in logs.items():
            seen.setdefault(k, []).append(float(v))
        return logs

    trainer.run_phase = recording
    trainer.fit()
    row = next(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["step"] == 6)
    assert 0 < len(seen["loss_g"]) < len(seen["loss_fake"]), "the test needs both phases, G's less often"
    for key in ("loss_g", "loss_fake"):
        assert row[key] == pytest.approx(sum(seen[key]) / len(seen[key]), rel=1e-5), key
