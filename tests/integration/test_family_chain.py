"""The whole user chain per teacher family, on tiny random models of the real diffusers classes.

For each family (SD3, FLUX, SDXL, SANA): build a tiny diffusers teacher folder, write a prompt file
and a run config, build the prompt cache (the API behind ``senseflow cache``), train a few
iterations from the cache (teacher loaded without text encoders) with SenseFlow -- and, for the
flow families SD3 and FLUX, with SiD too -- then ``senseflow generate`` and ``senseflow export``
through the CLI, load the export with the stock ``diffusers.DiffusionPipeline.from_pretrained``
and reproduce ``generate``'s first image for the same seed: float images in [0, 1] within
``ATOL = 1e-4`` (float32 rounding of sigmas/timesteps; measured ~1e-6), the PNG within one 8-bit level.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from diffusers.utils import logging as diffusers_logging  # noqa: E402

from senseflow import api  # noqa: E402
from senseflow.cli import main  # noqa: E402
from senseflow.config import validate  # noqa: E402
from senseflow.data.cache import build_cache, open_cache  # noqa: E402
from senseflow.generate import image_seed, render  # noqa: E402
from senseflow.student import load_student  # noqa: E402
from tests.helpers import tiny_flux2, tiny_models, tiny_zimage  # noqa: E402
from tests.helpers.tiny_qwenimage import make_tiny_qwenimage_folder  # noqa: E402
from tests.integration.test_generate_export import pipeline_images, read_png, to_unit  # noqa: E402

diffusers_logging.disable_progress_bar()
diffusers_logging.set_verbosity_error()

RES = 32
ATOL = 1e-4
SEED = 11
PROMPTS = ["a red cat", "a small blue dog on the square", "a green circle", "the white photo of a big cross"]
BUILDERS = {"sd3": tiny_models.make_tiny_sd3_folder, "flux": tiny_models.make_tiny_flux_folder,
            "sdxl": tiny_models.make_tiny_sdxl_folder, "sana": tiny_models.make_tiny_sana_folder,
            "qwenimage": make_tiny_qwenimage_folder, "flux2": tiny_flux2.make_tiny_flux2_dev_folder,
            "zimage": tiny_zimage.make_tiny_zimage_folder}
OPTIONS = {"sd3": {"max_sequence_length": 8}, "flux": {"max_sequence_length": 8},
           "sdxl": {}, "sana": {"max_sequence_length": 8}, "qwenimage": {"max_sequence_length": 16},
           "flux2": {"max_sequence_length": 16}, "zimage": {"max_sequence_length": 40}}
#: guidance per family: FLUX distils its embedded guidance, the others classifier-free guidance
GUIDANCE = {"flux": {"embedded": 3.5}, "flux2": {"embedded": 4.0}}


def _guidance(family: str, scale: float) -> dict:
    return GUIDANCE.get(family, {"cfg": scale})


def _methods(family: str) -> dict[str, dict]:
    g = _guidance(family, 3.0)
    methods = {"senseflow": {"name": "senseflow", "ttur": 2, "real_guidance": g, "ida_lambda": 0.9,
                             "isg_weight": 0.5, "isg_guidance": g}}
    if family in ("sd3", "flux", "qwenimage", "zimage"):
        fake = {} if family == "flux" else _guidance(family, 2.0)
        methods["sid"] = {"name": "sid", "teacher_guidance": _guidance(family, 2.0), "fake_guidance": fake,
                          "fake_train_guidance": fake}
    return methods


def _config(root: Path, family: str, method: dict, out: str) -> dict:
    optim = {"lr": 1.0e-4}
    if method["name"] == "sid":
        optim = {"name": "adam", "lr": 1.0e-4, "betas": [0.0, 0.999], "eps": 1.0e-4}
    return {"paths": {"teacher": str(root / "teacher"), "prompts": str(root / "prompts.txt"),
                      "cache": str(root / "cache"), "output": str(root / out)},
            "teacher": {"family": family, "resolution": RES, "options": OPTIONS[family]},
            "generator": {"anchors": [1.0, 0.75, 0.5, 0.25], "sampler": "stochastic"},
            "method": method,
            "optim": {"generator": dict(optim), "fake_score": dict(optim)},
            "train": {"steps": 2, "batch_size": 2, "log_every": 1, "num_samples": 2, "device": "cpu",
                      "progress": False, "tensorboard": False}}


@pytest.mark.parametrize("family", ["sd3", "flux", "sdxl", "sana", "qwenimage", "flux2", "zimage"])
def test_cache_train_generate_export_stock_pipeline(family, tmp_path, monkeypatch):
    BUILDERS[family](tmp_path / "teacher")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    methods = _methods(family)

    # senseflow cache
    first = validate(_config(tmp_path, family, methods["senseflow"], "run_senseflow"))
    cache = build_cache(first, tmp_path / "cache", batch_size=4, progress=False, log=lambda *a, **k: None)
    assert len(open_cache(cache)) == len(PROMPTS)

    # senseflow train (from the cache: no text encoders), per method
    for name, method in methods.items():
        config = validate(_config(tmp_path, family, method, f"run_{name}"))
        trainer = api.train(config)
        assert trainer.step == 2
        adapter = trainer.method.models.teacher.adapter
        assert adapter.has_text_encoders is False, "training from the cache loads no encoders"
        logs = trainer.last_logs
        assert any(k.startswith("loss_") for k in logs), (name, logs)
        assert all(math.isfinite(float(v)) for v in logs.values()), (name, logs)
        assert (tmp_path / f"run_{name}" / "student" / "student.safetensors").is_file(), name
        for p in trainer.method.models.generator.parameters():
            assert torch.isfinite(p).all(), name

    run = tmp_path / "run_senseflow"
    out = tmp_path / "images"
    assert main(["generate", "--student", str(run), "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out),
                 "--num-prompts", "1", "--batch-size", "1", "--seed", str(SEED), "--device", "cpu",
                 "--no-progress"]) == 0
    meta = json.loads((out / "00000.json").read_text())
    assert meta["seed"] == image_seed(SEED, 0) and meta["prompt"] == PROMPTS[0]

    export = tmp_path / "export"
    assert main(["export", "--student", str(run / "student"), "--out", str(export)]) == 0
    if family in ("flux", "flux2"):
        cfg = json.loads((export / "transformer" / "config.json").read_text())
        assert cfg["guidance_embeds"] is False

    stock = pipeline_images(export, PROMPTS[:1], [meta["seed"]])
    ours = to_unit(render(load_student(run, device="cpu"), PROMPTS[:1], [meta["seed"]]))
    assert stock.shape == ours.shape == (1, 3, RES, RES)
    assert torch.isfinite(stock).all()
    assert (stock - ours).abs().max().item() < ATOL
    stock_u8 = (stock[0].permute(1, 2, 0).numpy() * 255).round().astype(np.int16)
    assert np.abs(read_png(out / "00000.png") - stock_u8).max() <= 1
