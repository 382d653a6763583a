"""The custom-model path end to end, for models whose samples are not pictures (issue #13 item 4).

A ``(D,)``-latent velocity MLP (``senseflow.teachers.custom:tiny_vector_example``) trains through
``api.train``, writes ``student/`` and raw-latent samples, and ``senseflow generate`` writes its
latents; ``teacher.options`` reach the factory; ``train.num_samples: 0`` turns grids off; the empty
prompt can be trained from a JSON prompt file; docs/config.md shows each field's real default.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from senseflow import api
from senseflow.build import load_teacher
from senseflow.cli import main
from senseflow.config import apply_overrides, validate
from senseflow.schedules import RectifiedFlow
from senseflow.teachers.base import SenseflowError
from senseflow.teachers.custom import CallableAdapter, HashedWordEncoder, TinyVectorNet, check_factory_call

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ROOT / "configs/examples/prompts.txt"
VECTOR = yaml.safe_load((ROOT / "configs/examples/tiny_vector.yaml").read_text())
IMAGE = yaml.safe_load((ROOT / "configs/examples/tiny_custom.yaml").read_text())


def _config(base, out: Path, *overrides: str):
    return validate(apply_overrides(base, [f"paths.output={out}", f"paths.prompts={PROMPTS}", "train.progress=false",
                                           "train.tensorboard=false", "train.steps=3", "train.log_every=1",
                                           *overrides]))


def _write_yaml(tmp_path: Path, data) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def vector_run(tmp_path_factory) -> Path:
    """One finished api.train run on the (8,)-latent MLP (3 DMD2 iterations, 4 sample prompts)."""
    out = tmp_path_factory.mktemp("vector") / "run"
    api.train(_config(VECTOR, out))
    return out


# -- (a) a non-image model finishes training: student/ written, samples are raw latents -----------------
def test_vector_model_run_writes_student_and_raw_latent_samples(vector_run):
    student = vector_run / "student"
    meta = json.loads((student / "student.json").read_text())
    assert meta["images"] is False and meta["family"] == "custom" and meta["step"] == 3
    # the student is the final checkpoint's generator (not a fresh copy of the teacher)
    weights = load_file(str(student / "student.safetensors"))
    ckpt = load_file(str(vector_run / "checkpoints" / "step_00000003" / "generator.safetensors"))
    assert weights.keys() == {k.removeprefix("denoiser.backbone.") for k in ckpt}
    for k, v in ckpt.items():
        assert torch.equal(weights[k.removeprefix("denoiser.backbone.")], v)
    # the sample "grid" is the 4 raw latents of the first 4 training prompts, no PNG
    samples = vector_run / "samples"
    assert [p.name for p in samples.iterdir()] == ["student_00000003.safetensors"]
    with safe_open(str(samples / "student_00000003.safetensors"), "pt") as fh:
        latents = fh.get_tensor("latents")
        prompts = json.loads(fh.metadata()["prompts"])
    assert latents.shape == (4, 8) and torch.isfinite(latents).all()
    assert prompts == PROMPTS.read_text().splitlines()[:4]


def test_image_shaped_vector_latent_trains_to_the_end(tmp_path):
    """A (D, 1, 1) latent looks 4-D but is no picture: it used to crash in images.to_uint8."""
    out = tmp_path / "run"
    api.train(_config(VECTOR, out, "train.steps=1", "teacher.options.image_shaped=true"))
    assert (out / "student" / "student.safetensors").is_file()
    with safe_open(str(out / "samples" / "student_00000001.safetensors"), "pt") as fh:
        assert fh.get_tensor("latents").shape == (4, 8, 1, 1)


def test_a_failing_sample_grid_cannot_lose_the_student(tmp_path, monkeypatch):
    from senseflow.train.trainer import Trainer

    def broken(self, tag="student"):
        raise RuntimeError("sampling broke")

    monkeypatch.setattr(Trainer, "sample_grid", broken)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="sampling broke"):
        api.train(_config(VECTOR, out, "train.steps=1"))
    assert json.loads((out / "student" / "student.json").read_text())["step"] == 1
    assert (out / "student" / "student.safetensors").is_file()


@pytest.mark.parametrize("shape, decode, images, expected", [
    ((8,), None, None, False), ((8, 1, 1), None, None, False), ((4, 16, 16), None, None, False),
    ((3, 16, 16), None, None, True), ((1, 16, 16), None, None, True),
    ((4, 2, 2), lambda z: z, None, True),        # a decode function's contract is pictures
    ((3, 16, 16), None, False, False), ((8,), lambda z: z, False, False),
])
def test_callable_adapter_says_whether_it_decodes_to_images(shape, decode, images, expected):
    adapter = CallableAdapter(RectifiedFlow(), shape, decode=decode, images=images)
    assert adapter.decodes_to_images() is expected


def test_adapter_that_claims_images_but_decodes_vectors_gets_one_line_error():
    from senseflow.images import check_images

    with pytest.raises(SenseflowError, match=r"returned shape \(2, 8\).*images=False"):
        check_images(torch.zeros(2, 8), "MyAdapter")
    check_images(torch.zeros(2, 1, 4, 4))  # grey pictures are pictures


# -- (b) num_samples 0 --------------------------------------------------------------------------------------
def test_num_samples_zero_turns_sample_grids_off(tmp_path):
    out = tmp_path / "run"
    api.train(_config(IMAGE, out, "train.steps=2", "train.num_samples=0", "train.sample_every=1",
                      "teacher.resolution=8"))
    assert (out / "student" / "student.safetensors").is_file()
    assert not (out / "samples").exists()
    with pytest.raises(SenseflowError, match="num_samples"):
        _config(IMAGE, out, "train.num_samples=-1")


# -- (c) teacher.options reach the factory -------------------------------------------------------------------
def test_teacher_options_are_passed_to_the_custom_factory():
    config = _config(VECTOR, Path("unused"), "teacher.options={dim: 5, width: 12, seed: 3}")
    adapter, backbone = load_teacher(config, torch.device("cpu"))
    assert adapter.latent_shape() == (5,)
    assert backbone.inp.weight.shape == (12, 5 + 32 + 16)  # width x (dim + text 32 + time features 16)
    torch.manual_seed(3)
    assert torch.equal(backbone.inp.weight, TinyVectorNet(dim=5, width=12).inp.weight)


def test_unknown_option_is_one_line_error_naming_factory_and_option(tmp_path, capsys):
    data = apply_overrides(VECTOR, [f"paths.output={tmp_path / 'run'}", f"paths.prompts={PROMPTS}",
                                    "teacher.options.colour=red"])
    assert main(["train", str(_write_yaml(tmp_path, data))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "senseflow.teachers.custom:tiny_vector_example" in err and "'colour'" in err
    assert not (tmp_path / "run").exists()


def test_option_that_senseflow_sets_is_refused():
    config = _config(VECTOR, Path("unused"), "teacher.options={resolution: 8}")
    with pytest.raises(SenseflowError, match="teacher.options.resolution"):
        load_teacher(config, torch.device("cpu"))


def test_factory_with_the_wrong_signature_is_named():
    def no_device(path, resolution):
        raise AssertionError("must not be called")

    with pytest.raises(SenseflowError, match=r"'my.mod:no_device' takes no argument 'device'"):
        check_factory_call(no_device, "my.mod:no_device", {"path": None, "resolution": 8, "device": "cpu"})

    def needs_more(path, resolution, device, depth):
        raise AssertionError("must not be called")

    with pytest.raises(SenseflowError, match=r"'my.mod:needs_more' needs argument 'depth'"):
        check_factory_call(needs_more, "my.mod:needs_more", {"path": None, "resolution": 8, "device": "cpu"})
    check_factory_call(lambda **kw: None, "my.mod:anything", {"path": None, "colour": "red"})  # **options: fine


# -- (d) the config reference shows each FIELD's default ---------------------------------------------------
def _table(doc: str, title: str) -> dict[str, str]:
    """``{key: default cell without backticks}`` of the section ``## `title` ``."""
    block = doc.split(f"## `{title}`\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| .*? \| `?(.*?)`? \| .*\|$", block, flags=re.M)
    return dict(rows)


def test_config_reference_shows_the_defaults_a_user_gets():
    from senseflow.config_docs import render
    from senseflow.methods import DMD2Config, SenseFlowConfig, SiDConfig

    doc = render()
    # values from the papers / released recipes (ALGORITHMS.md), written out by hand
    for method in ("senseflow", "dmd2"):
        assert _table(doc, f"method (name: {method}).real_guidance")["cfg"] == "8.0"
        assert _table(doc, f"method (name: {method}).fake_guidance")["cfg"] == "None"
        dmd_time = _table(doc, f"method (name: {method}).dmd_time")
        assert (dmd_time["kind"], dmd_time["low"], dmd_time["high"]) == ("'uniform'", "0.02", "0.98")
        assert _table(doc, f"method (name: {method}).fake_time")["kind"] == "'teacher'"
    assert _table(doc, "method (name: senseflow).isg_guidance")["cfg"] == "(2.0, 4.0)"
    for key in ("teacher_guidance", "fake_guidance", "fake_train_guidance"):
        assert _table(doc, f"method (name: sid).{key}")["cfg"] == "4.5"
    sid_time = _table(doc, "method (name: sid).time")
    assert sid_time["kind"] == "'logit_normal'" and float(sid_time["mean"]) == pytest.approx(math.log(2.0))
    assert (sid_time["std"], sid_time["shift"]) == ("1.6", "False")
    # and every nested table of every method agrees with an instance of the pydantic model
    for label, model in (("senseflow", SenseFlowConfig), ("dmd2", DMD2Config), ("sid", SiDConfig)):
        instance = model()
        for name, value in instance:
            if hasattr(value, "model_fields"):
                table = _table(doc, f"method (name: {label}).{name}")
                # a section nested one level deeper is rendered as its own table ("see below")
                assert table == {k: "see below" if hasattr(v, "model_fields") else repr(v) for k, v in value}, \
                    (label, name)


# -- (e) the empty prompt from a prompt file -------------------------------------------------------------------
def test_json_keeps_the_empty_prompt_txt_and_csv_drop_blank_lines(tmp_path):
    from senseflow.data.prompts import load_prompts

    cases = {"a.json": ('["", "a cat"]', ["", "a cat"]), "b.json": ('[""]', [""]),
             "c.json": ('{"prompts": ["  ", "a dog "]}', ["", "a dog"]),
             "d.txt": ("a cat\n\n  \na dog\n", ["a cat", "a dog"]),
             "e.csv": ("prompt\na cat\n\"\"\na dog\n", ["a cat", "a dog"])}
    for name, (text, expected) in cases.items():
        (tmp_path / name).write_text(text)
        assert load_prompts(tmp_path / name) == expected, name
    (tmp_path / "f.txt").write_text("\n \n")
    with pytest.raises(SenseflowError, match="contains no prompts"):
        load_prompts(tmp_path / "f.txt")


def test_unconditional_training_from_a_json_prompt_file(tmp_path):
    prompts = tmp_path / "uncond.json"
    prompts.write_text('[""]')
    out = tmp_path / "run"
    trainer = api.train(_config(VECTOR, out, f"paths.prompts={prompts}", "train.steps=2", "train.num_samples=2"))
    assert trainer.data.next_batch().prompts == ["", "", "", ""]
    with safe_open(str(out / "samples" / "student_00000002.safetensors"), "pt") as fh:
        assert json.loads(fh.metadata()["prompts"]) == [""]  # one prompt in the file: one sample
    assert (out / "student" / "student.safetensors").is_file()


# -- (f) senseflow generate writes raw latents ---------------------------------------------------------------
def _hand_one_step(student_dir: Path, prompt: str, seed: int) -> torch.Tensor:
    """x0 = x_1 - 1 * v(x_1, t=1, text): one Euler step from pure noise of the rectified flow, by hand."""
    net = TinyVectorNet(dim=8, width=64)
    net.load_state_dict(load_file(str(student_dir / "student.safetensors")))
    noise = torch.randn((1, 8), generator=torch.Generator().manual_seed(seed))
    text = HashedWordEncoder(seed=0)([prompt])["text"]
    with torch.no_grad():
        return (noise - net(noise, torch.ones(1), text))[0]


def test_generate_writes_latents_of_a_vector_student(vector_run, tmp_path, capsys):
    out = tmp_path / "gen"
    args = ["generate", "--student", str(vector_run), "--prompts", str(PROMPTS), "--num-prompts", "2",
            "--steps", "1", "--device", "cpu", "--no-progress"]
    assert main([*args, "--out", str(out)]) == 0          # auto: this student's outputs are not images
    assert "wrote 2 latents (safetensors)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["00000.json", "00000.safetensors", "00001.json",
                                                     "00001.safetensors"]
    prompts = PROMPTS.read_text().splitlines()
    for i in range(2):
        record = json.loads((out / f"{i:05d}.json").read_text())
        assert record["format"] == "safetensors" and record["prompt"] == prompts[i]
        latent = load_file(str(out / f"{i:05d}.safetensors"))["latent"]
        assert latent.shape == (8,)
        torch.testing.assert_close(latent, _hand_one_step(vector_run / "student", prompts[i], record["seed"]))
    # npy holds the same numbers; a rerun skips what is there
    assert main([*args, "--out", str(tmp_path / "npy"), "--format", "npy"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "npy" / "00001.npy"),
                                  load_file(str(out / "00001.safetensors"))["latent"].numpy())
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 0
    assert "wrote 0 latents (safetensors) to" in capsys.readouterr().out


def test_generate_png_of_a_vector_student_is_refused_before_writing(vector_run, tmp_path, capsys):
    out = tmp_path / "png"
    assert main(["generate", "--student", str(vector_run), "--prompts", str(PROMPTS), "--out", str(out),
                 "--format", "png", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not images" in err and "--format safetensors" in err
    assert not out.exists()


def test_generate_on_a_student_json_without_the_images_key_still_writes_latents(vector_run, tmp_path):
    """Students written before ``images`` was recorded: the loaded adapter decides."""
    import shutil

    run = tmp_path / "old"
    shutil.copytree(vector_run, run, ignore=shutil.ignore_patterns("checkpoints", "samples"))
    meta = json.loads((run / "student" / "student.json").read_text())
    del meta["images"]
    (run / "student" / "student.json").write_text(json.dumps(meta))
    from senseflow.generate import generate

    result = generate(run, PROMPTS, tmp_path / "gen", num_prompts=1, device="cpu", progress=False)
    assert result.format == "safetensors" and [p.name for p in result.written] == ["00000.safetensors"]


def test_generate_raw_latents_of_an_image_student(tmp_path):
    """Image models can also hand out their latents (before decode): shape (3, 8, 8) for tiny_custom at 8 px."""
    out = tmp_path / "run"
    api.train(_config(IMAGE, out, "train.steps=1", "teacher.resolution=8", "train.num_samples=1"))
    assert (out / "samples" / "student_00000001.png").is_file()  # pictures still get a PNG grid
    from senseflow.generate import generate

    result = generate(out, PROMPTS, tmp_path / "gen", num_prompts=1, device="cpu", progress=False,
                      format="safetensors")
    assert load_file(str(result.written[0]))["latent"].shape == (3, 8, 8)
    png = generate(out, PROMPTS, tmp_path / "gen", num_prompts=1, device="cpu", progress=False)
    assert png.format == "png" and png.written[0].name == "00000.png"
