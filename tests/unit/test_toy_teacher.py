"""The toy teacher: its training command resumes exactly, and the shipped one is an SD3 folder that draws the world."""

import json

import pytest
import torch
from safetensors.torch import load_file

from senseflow.toy.teacher import TEACHER_ASSET, create_teacher_folder, load_toy_teacher, train_teacher

TINY = dict(width=32, layers=1, head_dim=16)


def _train(folder, **kw):
    return train_teacher(folder, steps=4, batch_size=4, lr=1e-3, seed=3, save_every=100, progress=False, **kw)


def test_train_teacher_stop_and_resume_equals_a_straight_run(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    for folder in (straight, split):
        create_teacher_folder(folder, seed=0, **TINY)
    _train(straight)
    assert _train(split, stop_at=2)["step"] == 2
    assert torch.load(split / "train_state.pt", weights_only=True)["step"] == 2
    assert _train(split)["step"] == 4
    a, b = (torch.load(f / "train_state.pt", weights_only=True) for f in (straight, split))
    assert a["step"] == b["step"] == 4
    for key in a["raw"]:
        assert torch.equal(a["raw"][key], b["raw"][key]), key
    ema_a, ema_b = (load_file(str(f / "transformer" / "diffusion_pytorch_model.safetensors")) for f in (straight, split))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    initial = create_teacher_folder(tmp_path / "init", seed=0, **TINY)
    ema_0 = load_file(str(initial / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(ema_0[k], ema_a[k]) for k in ema_a)  # it did train


def test_shipped_teacher_is_an_sd3_folder_loaded_by_the_sd3_adapter():
    from senseflow.teachers.sd3 import SD3Adapter

    index = json.loads((TEACHER_ASSET / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    size = sum(f.stat().st_size for f in TEACHER_ASSET.rglob("*") if f.is_file())
    assert size <= 20 * 2 ** 20, size
    adapter, backbone = load_toy_teacher()
    assert type(adapter) is SD3Adapter and type(backbone).__name__ == "SD3Transformer2DModel"
    record = json.loads((TEACHER_ASSET / "training.json").read_text())
    assert record["command"].startswith("senseflow toy train-teacher") and "--seed" in record["command"]


def test_shipped_teacher_meets_the_quality_bar():
    """Attribute accuracy >= 0.90 at 32 Euler steps with CFG 3 on 64 evaluation prompts (measured 0.914; stage 2 0.906).

    The tolerance of 0.01 (a handful of the several hundred checks) absorbs float differences between CPUs,
    which can flip a borderline sample; a teacher that really misses the bar is far below it
    (the previous shipped teacher scored 0.49).
    """
    from senseflow.toy.teacher import QUALITY_BAR, QUALITY_SETTING, teacher_quality

    (r,) = teacher_quality()
    assert (r["steps"], r["cfg"]) == QUALITY_SETTING == (32, 3.0)
    assert r["attr_acc"] >= QUALITY_BAR - 0.01, r
    assert min(r["color"], r["position"], r["background"]) >= 0.95, r


def test_shipped_teacher_needs_many_steps_on_open_prompts():
    """The gap the demo's student has to close: with the positions left out a prompt has many layouts, and
    4 Euler steps fall behind 32 (measured 0.855 vs 0.775; with every position given: 0.914 vs 0.904)."""
    from senseflow.toy.teacher import teacher_quality

    r32, r4 = teacher_quality(((32, 3.0), (4, 3.0)), open_positions=True)
    assert r32["attr_acc"] >= 0.82, r32
    assert r32["attr_acc"] - r4["attr_acc"] >= 0.03, (r32, r4)


def test_init_from_a_folder_that_is_not_a_teacher_is_one_line_and_writes_nothing(tmp_path):
    from senseflow.toy.teacher import main

    with pytest.raises(SystemExit, match="not a toy teacher folder"):
        main(["--out", str(tmp_path / "ft"), "--init", str(tmp_path), "--steps", "1"])
    assert not (tmp_path / "ft").exists() and not list(tmp_path.glob(".ft*"))


def test_fine_tuning_on_open_captions_starts_from_the_given_teacher(tmp_path):
    from senseflow.toy.teacher import main

    base = create_teacher_folder(tmp_path / "base", seed=0, **TINY)
    before = load_file(str(base / "transformer" / "diffusion_pytorch_model.safetensors"))
    out = tmp_path / "ft"
    assert main(["--out", str(out), "--init", str(base), "--steps", "2", "--batch-size", "4",
                 "--open-positions", "1.0", "--save-every", "100"]) == 0
    after = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    # EMA 0.999 of two steps: still the base weights to within what two small updates can move
    assert all((after[k] - before[k]).abs().max() < 1e-3 for k in before)
    assert any(not torch.equal(after[k], before[k]) for k in before)
    record = json.loads((out / "training.json").read_text())
    assert "--open-positions 1.0" in record["command"] and f"--init {base}" in record["command"]
