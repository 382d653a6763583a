"""``senseflow generate`` -> ``senseflow export`` -> stock ``DiffusionPipeline`` reproduces the images.

Per family (SD3, FLUX, SDXL, SANA) a tiny random teacher folder of the real classes is built, a
"trained" student is made from it (the teacher weights plus a small random perturbation, saved
exactly as ``api.train`` writes ``<run>/student/`` next to the run's ``config.yaml``), images are
generated through the CLI, the student is exported, and the stock pipeline loaded from the export
with the call recorded in ``senseflow_export.json`` must give the same images for the same seed:
float images in [0, 1] within ``ATOL`` (measured ~1e-6: float32 rounding of sigmas/timesteps and
batched vs single forwards), PNGs within one 8-bit level.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from diffusers import DiffusionPipeline  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from PIL import Image  # noqa: E402

from senseflow.build import load_teacher  # noqa: E402
from senseflow.cli import main  # noqa: E402
from senseflow.config import dump_config, validate  # noqa: E402
from senseflow.export import export_student  # noqa: E402
from senseflow.generate import image_seed, render  # noqa: E402
from senseflow.generator import FewStepGenerator  # noqa: E402
from senseflow.schedules import anchors as unit_to_native  # noqa: E402
from senseflow.student import load_student  # noqa: E402
from senseflow.teachers.base import Denoiser  # noqa: E402
from tests.helpers import tiny_flux2, tiny_models, tiny_zimage  # noqa: E402
from tests.helpers.cli_checks import cli_fails  # noqa: E402
from tests.helpers.tiny_qwenimage import make_tiny_qwenimage_folder  # noqa: E402

diffusers_logging.disable_progress_bar()
diffusers_logging.set_verbosity_error()

RES = 32
ATOL = 1e-4
PROMPTS = ["a red cat", "a small blue dog on the square", "a green circle", "the white photo of a big cross"]
BUILDERS = {"sd3": tiny_models.make_tiny_sd3_folder, "flux": tiny_models.make_tiny_flux_folder,
            "sdxl": tiny_models.make_tiny_sdxl_folder, "sana": tiny_models.make_tiny_sana_folder,
            "qwenimage": make_tiny_qwenimage_folder, "flux2": tiny_flux2.make_tiny_flux2_dev_folder,
            "zimage": tiny_zimage.make_tiny_zimage_folder}
#: short text sequences keep the tiny runs fast (and exercise a non-default pipeline argument)
OPTIONS = {"sd3": {"max_sequence_length": 8}, "flux": {"max_sequence_length": 8},
           "sdxl": {}, "sana": {"max_sequence_length": 8}, "qwenimage": {"max_sequence_length": 16},
           "flux2": {"max_sequence_length": 16}, "zimage": {"max_sequence_length": 40}}
#: the export's guidance_scale: 1 = no CFG, except ZImagePipeline (CFG whenever guidance_scale > 0)
NO_CFG_SCALE = {"zimage": 0.0}


def make_student_run(root: Path, family: str, sampler: str = "stochastic", anchors=(1.0, 0.75, 0.5, 0.25),
                     scale: float = 0.02, seed: int = 0) -> Path:
    """Teacher folder + ``<run>/config.yaml`` + ``<run>/student/`` (teacher weights + a perturbation)."""
    teacher = root / "teacher"
    if not teacher.exists():
        BUILDERS[family](teacher)
    config = validate({"paths": {"teacher": str(teacher), "output": str(root / "run")},
                       "teacher": {"family": family, "resolution": RES, "options": OPTIONS[family]},
                       "generator": {"anchors": list(anchors), "sampler": sampler}, "method": {"name": "dmd2"}})
    adapter, backbone = load_teacher(config, torch.device("cpu"))
    student = adapter.make_student(backbone)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    gen = FewStepGenerator(Denoiser(student, adapter), unit_to_native(adapter.schedule, list(anchors)))
    run = root / "run"
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(dump_config(config))
    export_student(gen, run / "student", {"family": family, "teacher": str(teacher), "resolution": RES,
                                          "sampler": sampler, "method": "dmd2", "step": 2})
    return run


def write_prompts(path: Path, prompts=PROMPTS) -> Path:
    path.write_text("\n".join(prompts) + "\n")
    return path


def pipeline_images(folder: Path, prompts, seeds, steps: int | None = None, lora: bool = False) -> torch.Tensor:
    """The stock pipeline, called as ``senseflow_export.json`` says (one prompt per call), images in [0, 1]."""
    info = json.loads((folder / "senseflow_export.json").read_text())
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    if lora:
        pipe.load_lora_weights(str(folder), weight_name="pytorch_lora_weights.safetensors")
    call = dict(info["call"])
    if steps is not None:
        call["num_inference_steps"] = steps
        for key in ("sigmas", "timesteps"):
            if key in call:
                call[key] = call[key][:steps]
    out = []
    for prompt, seed in zip(prompts, seeds):
        if info["seeding"] == "global":
            torch.manual_seed(seed)
            images = pipe(prompt=prompt, output_type="pt", **call).images
        else:
            images = pipe(prompt=prompt, output_type="pt", generator=torch.Generator("cpu").manual_seed(seed), **call).images
        out.append(images.float())
    return torch.cat(out)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return (images / 2 + 0.5).clamp(0, 1)


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


#: (SD3's euler export is checked in test_subset_batching_resume_and_fewer_steps)
CASES = [("sd3", "stochastic"), ("flux", "stochastic"), ("sdxl", "stochastic"), ("sana", "stochastic"),
         ("sdxl", "euler"), ("qwenimage", "stochastic"), ("flux2", "stochastic"), ("zimage", "stochastic")]


@pytest.mark.parametrize("family,sampler", CASES, ids=[f"{f}-{s}" for f, s in CASES])
def test_generate_export_and_stock_pipeline_reproduce(family, sampler, tmp_path, capsys):
    run = make_student_run(tmp_path, family, sampler)
    prompts = write_prompts(tmp_path / "prompts.txt")
    out = tmp_path / "images"
    assert main(["generate", "--student", str(run), "--prompts", str(prompts), "--out", str(out), "--num-prompts",
                 "2", "--batch-size", "2", "--seed", "7", "--device", "cpu", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.json", "00000.png", "00001.json", "00001.png"]
    meta = json.loads((out / "00001.json").read_text())
    assert meta["prompt"] == PROMPTS[1] and meta["index"] == 1 and meta["seed"] == image_seed(7, 1)
    assert meta["steps"] == 4 and meta["sampler"] == sampler and len(meta["anchors"]) == 4

    export = tmp_path / "export"
    assert main(["export", "--student", str(run / "student"), "--out", str(export)]) == 0
    assert "DiffusionPipeline.from_pretrained" in capsys.readouterr().out
    info = json.loads((export / "senseflow_export.json").read_text())
    # Qwen-Image: no guidance embedding, so no guidance_scale; Z-Image: 0 (its pipeline runs CFG whenever > 0)
    assert info["call"].get("guidance_scale", 1.0) == NO_CFG_SCALE.get(family, 1.0)
    assert (export / "README.md").read_text().count("from_pretrained") == 1
    # the text encoders / VAE are the teacher's files, hard-linked
    vae_file = next((export / "vae").glob("*.safetensors"))
    assert os.path.samefile(vae_file, tmp_path / "teacher" / "vae" / vae_file.name)
    backbone = "unet" if family == "sdxl" else "transformer"
    assert not os.path.samefile(next((export / backbone).glob("*.safetensors")),
                                next((tmp_path / "teacher" / backbone).glob("*.safetensors")))
    if family in ("flux", "flux2"):
        cfg = json.loads((export / "transformer" / "config.json").read_text())
        assert cfg["guidance_embeds"] is False
        from safetensors.torch import load_file
        keys = load_file(str(next((export / "transformer").glob("*.safetensors")))).keys()
        assert not any("guidance_embedder" in k for k in keys)
    if family == "flux2":    # Flux2Pipeline's first positional argument is `image`: the snippet passes prompt=
        assert 'prompt=meta["prompt"]' in (export / "README.md").read_text() and "prompt=" in info["snippet"]

    seeds = [meta0["seed"] for meta0 in (json.loads((out / f"{i:05d}.json").read_text()) for i in range(2))]
    stock = pipeline_images(export, PROMPTS[:2], seeds)
    student = load_student(run, device="cpu")
    ours = to_unit(render(student, PROMPTS[:2], seeds))
    assert stock.shape == ours.shape == (2, 3, RES, RES)
    assert (stock - ours).abs().max().item() < ATOL
    for i in range(2):     # the PNGs senseflow generate wrote: within one 8-bit level of the stock image
        stock_u8 = (stock[i].permute(1, 2, 0).numpy() * 255).round().astype(np.int16)
        assert np.abs(read_png(out / f"{i:05d}.png") - stock_u8).max() <= 1
    # the seed matters far beyond the tolerance (the comparison is not vacuous)
    other = to_unit(render(student, PROMPTS[:1], [seeds[0] + 1]))
    assert (other - ours[:1]).abs().max().item() > 100 * ATOL


def test_subset_batching_resume_and_fewer_steps(tmp_path):
    run = make_student_run(tmp_path, "sd3")
    prompts = write_prompts(tmp_path / "prompts.json", [])
    prompts.write_text(json.dumps({"prompts": PROMPTS}))
    full, part = tmp_path / "full", tmp_path / "part"
    base = ["generate", "--student", str(run), "--prompts", str(prompts), "--device", "cpu", "--no-progress"]
    assert main([*base, "--out", str(full), "--batch-size", "3"]) == 0
    assert len(list(full.glob("*.png"))) == len(PROMPTS)
    assert main([*base, "--out", str(part), "--start-idx", "2", "--num-prompts", "1", "--batch-size", "1"]) == 0
    assert sorted(p.name for p in part.iterdir()) == ["00002.json", "00002.png"]
    assert np.abs(read_png(part / "00002.png") - read_png(full / "00002.png")).max() <= 1
    assert json.loads((part / "00002.json").read_text()) == json.loads((full / "00002.json").read_text())
    # a re-run skips what is already there
    stamp = (full / "00000.png").stat().st_mtime_ns
    assert main([*base, "--out", str(full)]) == 0
    assert (full / "00000.png").stat().st_mtime_ns == stamp
    # fewer steps than anchors: the stock pipeline with the first sigmas agrees
    few = tmp_path / "few"
    assert main([*base, "--out", str(few), "--num-prompts", "1", "--steps", "2", "--sampler", "euler"]) == 0
    meta = json.loads((few / "00000.json").read_text())
    assert meta["steps"] == 2 and meta["sampler"] == "euler" and len(meta["anchors"]) == 2
    export = tmp_path / "export"
    assert main(["export", "--student", str(run), "--out", str(export), "--sampler", "euler", "--link", "copy"]) == 0
    assert not os.path.samefile(next((export / "vae").glob("*.safetensors")),
                                next((tmp_path / "teacher" / "vae").glob("*.safetensors")))
    stock = pipeline_images(export, PROMPTS[:1], [meta["seed"]], steps=2)
    stock_u8 = (stock[0].permute(1, 2, 0).numpy() * 255).round().astype(np.int16)
    assert np.abs(read_png(few / "00000.png") - stock_u8).max() <= 1


def test_bad_inputs_fail_with_one_line_and_write_nothing(tmp_path, capsys):
    run = make_student_run(tmp_path, "sd3")
    prompts = write_prompts(tmp_path / "prompts.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    out = tmp_path / "out"
    gen = ["generate", "--student", str(run), "--out", str(out), "--device", "cpu"]
    cli_fails(capsys, [*gen, "--prompts", str(empty)], "no prompts")
    cli_fails(capsys, [*gen, "--prompts", str(prompts), "--start-idx", "4"], "--start-idx 4", "0..3")
    cli_fails(capsys, [*gen, "--prompts", str(prompts), "--start-idx", "-1"], "--start-idx")
    cli_fails(capsys, [*gen, "--prompts", str(prompts), "--steps", "5"], "--steps", "1..4")
    cli_fails(capsys, [*gen, "--prompts", str(tmp_path / "nope.txt")], "not found")
    cli_fails(capsys, ["generate", "--student", str(tmp_path / "nope"), "--prompts", str(prompts), "--out", str(out)],
           "does not exist")
    cli_fails(capsys, [*gen, "--prompts", str(prompts), "--teacher", str(tmp_path / "gone")], "gone", "--teacher")
    assert not out.exists()
    # a student folder without its weights
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "student.json").write_text((run / "student" / "student.json").read_text())
    cli_fails(capsys, ["generate", "--student", str(broken), "--prompts", str(prompts), "--out", str(out)],
           "student.safetensors")
    cli_fails(capsys, ["export", "--student", str(broken), "--out", str(out)], "student.safetensors")
    assert not out.exists()
    # export refuses to overwrite, and --overwrite replaces
    export = tmp_path / "export"
    export.mkdir()
    (export / "keep.txt").write_text("x")
    cli_fails(capsys, ["export", "--student", str(run), "--out", str(export)], "--overwrite")
    assert (export / "keep.txt").exists()
    assert main(["export", "--student", str(run), "--out", str(export), "--overwrite"]) == 0
    assert not (export / "keep.txt").exists() and (export / "model_index.json").is_file()
    assert not list(tmp_path.glob(".export.*"))


def test_sdxl_euler_with_non_uniform_anchors_is_refused(tmp_path, capsys):
    run = make_student_run(tmp_path, "sdxl", "euler", anchors=(1.0, 0.6, 0.3))
    cli_fails(capsys, ["export", "--student", str(run), "--out", str(tmp_path / "x")], "uniformly spaced", "stochastic")
    assert not (tmp_path / "x").exists()
    # the stochastic (LCMScheduler) export takes any timesteps
    assert main(["export", "--student", str(run), "--out", str(tmp_path / "x"), "--sampler", "stochastic"]) == 0
    assert json.loads((tmp_path / "x" / "senseflow_export.json").read_text())["call"]["timesteps"] == [999, 599, 299]


def test_student_written_by_api_train_loads_generates_and_exports(tmp_path):
    """The real thing: 2 DMD2 steps on the tiny SD3 teacher through ``api.train``, then generate + export."""
    from senseflow import api

    teacher = tmp_path / "teacher"
    tiny_models.make_tiny_sd3_folder(teacher)
    prompts = write_prompts(tmp_path / "prompts.txt")
    config = validate({"paths": {"teacher": str(teacher), "prompts": str(prompts), "output": str(tmp_path / "run")},
                       "teacher": {"family": "sd3", "resolution": 16, "options": {"max_sequence_length": 8}},
                       "generator": {"anchors": [1.0, 0.5], "sampler": "stochastic"},
                       "method": {"name": "dmd2", "ttur": 1, "real_guidance": {"cfg": 2.0}},
                       "optim": {"generator": {"lr": 1e-3}, "fake_score": {"lr": 1e-3}},
                       "train": {"steps": 2, "batch_size": 1, "device": "cpu", "progress": False,
                                 "tensorboard": False, "num_samples": 1}})
    api.train(config)
    out = tmp_path / "images"
    assert main(["generate", "--student", str(tmp_path / "run"), "--prompts", str(prompts), "--out", str(out),
                 "--num-prompts", "1", "--device", "cpu", "--no-progress"]) == 0
    export = tmp_path / "export"
    assert main(["export", "--student", str(tmp_path / "run"), "--out", str(export)]) == 0
    meta = json.loads((out / "00000.json").read_text())
    info = json.loads((export / "senseflow_export.json").read_text())
    assert info["call"]["max_sequence_length"] == 8 and info["call"]["height"] == 16
    stock = pipeline_images(export, [meta["prompt"]], [meta["seed"]])
    stock_u8 = (stock[0].permute(1, 2, 0).numpy() * 255).round().astype(np.int16)
    assert np.abs(read_png(out / "00000.png") - stock_u8).max() <= 1
