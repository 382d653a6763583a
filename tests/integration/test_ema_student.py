"""A run with ``generator.ema``: student/ holds both weight sets; generate / export serve the EMA, raw on request."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from safetensors.torch import load_file  # noqa: E402

from senseflow.cli import main  # noqa: E402
from senseflow.config import validate  # noqa: E402
from senseflow.generate import render  # noqa: E402
from senseflow.images import to_uint8  # noqa: E402
from senseflow.student import load_student  # noqa: E402
from senseflow.train.checkpoint import latest_checkpoint  # noqa: E402
from tests.helpers import tiny_models  # noqa: E402
from tests.integration.test_generate_export import make_student_run, read_png, write_prompts  # noqa: E402

PREFIX = "denoiser.backbone."


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """3 DMD2 steps on the tiny SD3 teacher with generator.ema = {decay: 0.5}, through ``api.train``."""
    from senseflow import api
    root = tmp_path_factory.mktemp("ema-run")
    teacher = root / "teacher"
    tiny_models.make_tiny_sd3_folder(teacher)
    prompts = write_prompts(root / "prompts.txt")
    config = validate({"paths": {"teacher": str(teacher), "prompts": str(prompts), "output": str(root / "run")},
                       "teacher": {"family": "sd3", "resolution": 16, "options": {"max_sequence_length": 8}},
                       "generator": {"anchors": [1.0, 0.5], "sampler": "stochastic", "ema": {"decay": 0.5}},
                       "method": {"name": "dmd2", "ttur": 1, "real_guidance": {"cfg": 2.0}},
                       "optim": {"generator": {"lr": 1e-2}, "fake_score": {"lr": 1e-3}},
                       "train": {"steps": 3, "batch_size": 1, "device": "cpu", "progress": False,
                                 "tensorboard": False, "num_samples": 1}})
    api.train(config)
    ckpt = latest_checkpoint(root / "run")
    raw = {k.removeprefix(PREFIX): v for k, v in load_file(str(ckpt / "generator.safetensors")).items()}
    ema = {k.removeprefix(PREFIX): v for k, v in load_file(str(ckpt / "generator_ema.safetensors")).items()}
    return root, prompts, raw, ema


def _same(a: dict, b: dict, keys) -> bool:
    return all(torch.equal(a[k], b[k]) for k in keys)


def test_student_folder_holds_ema_as_default_and_raw_by_name(ema_run):
    root, _, raw, ema = ema_run
    student = root / "run" / "student"
    meta = json.loads((student / "student.json").read_text())
    assert meta["weights"] == "ema"
    assert meta["weight_files"] == {"ema": "student.safetensors", "raw": "student_raw.safetensors"}
    served, kept = load_file(str(student / "student.safetensors")), load_file(str(student / "student_raw.safetensors"))
    assert served.keys() == kept.keys() == raw.keys()
    assert _same(served, ema, ema) and _same(kept, raw, raw)
    assert max((ema[k] - raw[k]).abs().max().item() for k in ema) > 1e-4, "EMA and raw must differ"


def test_generate_and_export_serve_the_ema_by_default_and_raw_on_request(ema_run, tmp_path, capsys):
    root, prompts, raw, ema = ema_run
    run = root / "run"
    loaded = {kind: load_student(run, device="cpu", weights=kind) for kind in ("ema", "raw")}
    default = load_student(run, device="cpu")
    assert default.weights == "ema" and _same(default.backbone.state_dict(), ema, ema)
    assert _same(loaded["raw"].backbone.state_dict(), raw, raw)
    base = ["generate", "--student", str(run), "--prompts", str(prompts), "--num-prompts", "1", "--device", "cpu",
            "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "ema")]) == 0
    assert main([*base, "--out", str(tmp_path / "raw"), "--weights", "raw"]) == 0
    for kind in ("ema", "raw"):
        meta = json.loads((tmp_path / kind / "00000.json").read_text())
        assert meta["weights"] == kind
        mine = to_uint8(render(loaded[kind], [meta["prompt"]], [meta["seed"]]))[0].astype(np.int16)
        assert np.abs(read_png(tmp_path / kind / "00000.png") - mine).max() <= 1
    # export: the backbone written into transformer/ is the chosen weight set
    for kind, flags in (("ema", []), ("raw", ["--weights", "raw"])):
        out = tmp_path / f"export-{kind}"
        assert main(["export", "--student", str(run), "--out", str(out), *flags]) == 0
        assert json.loads((out / "senseflow_export.json").read_text())["weights"] == kind
        written = {}
        for f in (out / "transformer").glob("*.safetensors"):
            written.update(load_file(str(f)))
        want = ema if kind == "ema" else raw
        assert set(want) <= set(written) and _same(written, want, want), kind


def test_weights_flag_on_a_student_without_ema_fails_with_one_line(tmp_path, capsys):
    run = make_student_run(tmp_path, "sd3")
    prompts = write_prompts(tmp_path / "prompts.txt")
    out = tmp_path / "out"
    for argv in (["generate", "--student", str(run), "--prompts", str(prompts), "--out", str(out), "--weights", "ema"],
                 ["export", "--student", str(run), "--out", str(out), "--weights", "ema"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("senseflow: error:") and "\n" not in err and "--weights ema" in err, err
    assert not out.exists()
    # raw is what such a student holds: asking for it is fine
    assert load_student(run, device="cpu", weights="raw").weights == "raw"
