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
