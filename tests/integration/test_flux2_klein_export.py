"""FLUX.2-klein through ``senseflow generate`` -> ``senseflow export`` -> the stock ``Flux2KleinPipeline``.

The parametrized export test (``test_generate_export.py``) runs the flux2 family on a dev folder;
this one runs the klein variant the same way (the export keeps the teacher's ``model_index.json``,
so the folder is a ``Flux2KleinPipeline``), images within ``ATOL`` of ``senseflow generate``.
"""

from __future__ import annotations

import json

import torch

from senseflow.cli import main
from senseflow.generate import render
from senseflow.student import load_student
from tests.helpers.tiny_flux2 import make_tiny_flux2_klein_folder
from tests.integration.test_generate_export import (ATOL, PROMPTS, RES, make_student_run, pipeline_images, to_unit,
                                                    write_prompts)


def test_klein_student_exports_to_a_stock_flux2_klein_pipeline(tmp_path):
    make_tiny_flux2_klein_folder(tmp_path / "teacher")
    run = make_student_run(tmp_path, "flux2")
    prompts = write_prompts(tmp_path / "prompts.txt")
    out = tmp_path / "images"
    assert main(["generate", "--student", str(run), "--prompts", str(prompts), "--out", str(out), "--num-prompts",
                 "1", "--seed", "5", "--device", "cpu", "--no-progress"]) == 0
    export = tmp_path / "export"
    assert main(["export", "--student", str(run / "student"), "--out", str(export)]) == 0
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline" and index["transformer"][1] == "Flux2Transformer2DModel"
    info = json.loads((export / "senseflow_export.json").read_text())
    assert info["call"]["guidance_scale"] == 1.0     # no CFG branch in the stock call (the student is guidance-free)
    assert 'prompt=meta["prompt"]' in info["snippet"]
    seed = json.loads((out / "00000.json").read_text())["seed"]
    stock = pipeline_images(export, PROMPTS[:1], [seed])
    ours = to_unit(render(load_student(run, device="cpu"), PROMPTS[:1], [seed]))
    assert stock.shape == ours.shape == (1, 3, RES, RES)
    assert (stock - ours).abs().max().item() < ATOL
    other = to_unit(render(load_student(run, device="cpu"), PROMPTS[:1], [seed + 1]))
    assert (other - ours).abs().max().item() > 100 * ATOL
    assert torch.isfinite(stock).all()
