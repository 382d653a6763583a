"""A student trained with ``generator.first_input_time`` through ``api.train``: saved, loaded, sampled, not exported.

The tiny SD3 teacher has shift 3, so unit time 0.5 is native ``3 * 0.5 / (1 + 2 * 0.5) = 0.75``.  A
1-step student's output is then ``denoiser(0.75 eps, 0.75)`` (SiD's ``G(sigma_init z, sigma_init)``
in flow time: ``add_noise(0, eps, t) = t eps``), not ``denoiser(eps, 1)``.
"""

from __future__ import annotations

import json

import pytest
import torch

from senseflow.cli import main
from senseflow.config import validate
from senseflow.generate import ImageNoise, sample_latents
from senseflow.student import load_student
from tests.helpers import tiny_models
from tests.integration.test_generate_export import write_prompts

T_NATIVE = 0.75


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from senseflow import api

    root = tmp_path_factory.mktemp("first_input_time")
    teacher = root / "teacher"
    tiny_models.make_tiny_sd3_folder(teacher)
    prompts = write_prompts(root / "prompts.txt")
    config = validate({"paths": {"teacher": str(teacher), "prompts": str(prompts), "output": str(root / "run")},
                       "teacher": {"family": "sd3", "resolution": 16, "options": {"max_sequence_length": 8}},
                       "generator": {"anchors": [1.0], "first_input_time": 0.5},
                       "method": {"name": "dmd2", "ttur": 1, "real_guidance": {"cfg": 2.0}},
                       "optim": {"generator": {"lr": 1e-3}, "fake_score": {"lr": 1e-3}},
                       "train": {"steps": 2, "batch_size": 1, "device": "cpu", "progress": False,
                                 "tensorboard": False, "num_samples": 1}})
    trainer = api.train(config)
    assert trainer.method.models.generator.first_input_time == pytest.approx(T_NATIVE, abs=1e-12)
    return root, prompts


def test_student_json_records_the_native_input_time(trained):
    root, _ = trained
    meta = json.loads((root / "run" / "student" / "student.json").read_text())
    assert meta["anchors"] == [1.0]
    assert meta["first_input_time"] == pytest.approx(T_NATIVE, abs=1e-12)


def test_loaded_student_samples_at_the_input_time(trained):
    root, _ = trained
    student = load_student(root / "run")
    assert student.generator.first_input_time == pytest.approx(T_NATIVE, abs=1e-12)
    cond = student.adapter.encode_prompts(["a red cat"])
    x0 = sample_latents(student, cond, [7])
    eps = ImageNoise("sd3", 7, student.adapter.latent_shape(), torch.device("cpu")).initial()
    denoiser = student.generator.denoiser
    with torch.no_grad():
        want = denoiser(T_NATIVE * eps, torch.full((1,), T_NATIVE, dtype=torch.float64), cond)
        at_anchor = denoiser(eps, torch.full((1,), 1.0, dtype=torch.float64), cond)
    torch.testing.assert_close(x0, want, rtol=0, atol=1e-6)
    assert (x0 - at_anchor).abs().max() > 1e-3     # the option changes the output


def test_generate_runs_and_export_is_refused_in_one_line(trained, capsys):
    root, prompts = trained
    out = root / "images"
    assert main(["generate", "--student", str(root / "run"), "--prompts", str(prompts), "--out", str(out),
                 "--num-prompts", "1", "--device", "cpu", "--no-progress"]) == 0
    assert (out / "00000.png").is_file()
    assert json.loads((out / "00000.json").read_text())["first_input_time"] == pytest.approx(T_NATIVE, abs=1e-12)
    capsys.readouterr()
    for fmt in ("diffusers", "single-file"):
        export = root / f"export_{fmt}"
        assert main(["export", "--student", str(root / "run"), "--out", str(export), "--format", fmt]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("senseflow: error:") and "\n" not in err, err
        assert "generator.first_input_time" in err and "0.75" in err, err
        assert not export.exists()


@pytest.mark.parametrize("bad", [1.0, -0.5, "0.5"])
def test_a_bad_input_time_in_student_json_is_one_line(trained, tmp_path, capsys, bad):
    """At or above the first anchor, at or below clean data (flows: 0), or not a number: refused, nothing written."""
    import shutil

    root, prompts = trained
    folder = tmp_path / "student"
    shutil.copytree(root / "run" / "student", folder)
    meta = json.loads((folder / "student.json").read_text())
    meta.update(first_input_time=bad, teacher=str(root / "teacher"))
    (folder / "student.json").write_text(json.dumps(meta))
    out = tmp_path / "images"
    assert main(["generate", "--student", str(folder), "--prompts", str(prompts), "--out", str(out),
                 "--num-prompts", "1", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("senseflow: error:") and "\n" not in err and "first_input_time" in err, err
    assert not out.exists()
