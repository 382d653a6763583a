"""FLUX.2-klein through ``senseflow generate`` -> ``senseflow export`` -> the stock ``Flux2KleinPipeline``.

The parametrized export and family-chain tests run the flux2 family on a dev folder; this file runs
the klein variant the same way (full student, LoRA student, and the chain with true CFG). The export
keeps the teacher's ``model_index.json``, so the folder is a ``Flux2KleinPipeline``; images within
``ATOL`` of ``senseflow generate``.
"""

from __future__ import annotations

import json

import pytest
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


def test_klein_lora_student_exports_and_reloads_with_load_lora_weights(tmp_path):
    """A klein student with LoRA adapters: the export's ``pytorch_lora_weights.safetensors`` loads into the stock
    ``Flux2KleinPipeline`` with ``load_lora_weights`` and reproduces ``generate``; without it the image differs."""
    from senseflow.build import load_teacher
    from senseflow.config import dump_config, validate
    from senseflow.export import export_student
    from senseflow.export_diffusers import export_diffusers
    from senseflow.generator import FewStepGenerator
    from senseflow.lora import apply_lora, lora_meta, lora_parameters
    from senseflow.schedules import anchors as unit_to_native
    from senseflow.teachers.base import Denoiser

    teacher = make_tiny_flux2_klein_folder(tmp_path / "teacher").path
    config = validate({"paths": {"teacher": str(teacher)}, "method": {"name": "dmd2"},
                       "teacher": {"family": "flux2", "resolution": RES, "options": {"max_sequence_length": 16}}})
    adapter, backbone = load_teacher(config, torch.device("cpu"))
    student = apply_lora(adapter.make_student(backbone), rank=4, alpha=8.0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_parameters(student):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    gen = FewStepGenerator(Denoiser(student, adapter), unit_to_native(adapter.schedule, [1.0, 0.75, 0.5, 0.25]))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(config))
    export_student(gen, run / "student", {"family": "flux2", "teacher": str(teacher), "resolution": RES,
                                          "sampler": "stochastic", "lora": lora_meta(student)})
    loaded = load_student(run)
    assert loaded.has_lora
    export = export_diffusers(run, tmp_path / "export", loaded=loaded)
    assert (export / "pytorch_lora_weights.safetensors").is_file()
    seed = 17
    ours = to_unit(render(loaded, PROMPTS[:1], [seed]))
    stock = pipeline_images(export, PROMPTS[:1], [seed], lora=True)
    assert (stock - ours).abs().max().item() < ATOL
    assert (pipeline_images(export, PROMPTS[:1], [seed]) - ours).abs().max().item() > 100 * ATOL


@pytest.mark.slow   # ~40 s on 2 shared cores: cache + 2 SenseFlow iterations + generate + export
def test_klein_chain_cache_senseflow_with_cfg_generate_export(tmp_path):
    """klein-base's teacher runs true CFG with the empty prompt: the cache stores that prompt's embedding, SenseFlow
    trains from the cache (no text encoder loaded), and the export reproduces ``generate``."""
    import math

    from senseflow import api
    from senseflow.config import validate
    from senseflow.data.cache import build_cache, open_cache
    from tests.integration.test_family_chain import _config

    make_tiny_flux2_klein_folder(tmp_path / "teacher")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    method = {"name": "senseflow", "ttur": 2, "real_guidance": {"cfg": 3.0}, "ida_lambda": 0.9, "isg_weight": 0.5,
              "isg_guidance": {"cfg": 3.0}}
    config = validate(_config(tmp_path, "flux2", method, "run"))
    cache = build_cache(config, tmp_path / "cache", batch_size=4, progress=False, log=lambda *a, **k: None)
    opened = open_cache(cache)
    assert len(opened) == len(PROMPTS)
    assert opened.unconditional().tensors["prompt_embeds"].shape == (1, 16, 24)   # the empty prompt, encoded
    trainer = api.train(config)
    assert trainer.step == 2 and trainer.method.models.teacher.adapter.has_text_encoders is False
    assert all(math.isfinite(float(v)) for v in trainer.last_logs.values()), trainer.last_logs
    run, out = tmp_path / "run", tmp_path / "images"
    assert main(["generate", "--student", str(run), "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out),
                 "--num-prompts", "1", "--device", "cpu", "--no-progress"]) == 0
    assert main(["export", "--student", str(run / "student"), "--out", str(tmp_path / "export")]) == 0
    seed = json.loads((out / "00000.json").read_text())["seed"]
    stock = pipeline_images(tmp_path / "export", PROMPTS[:1], [seed])
    ours = to_unit(render(load_student(run, device="cpu"), PROMPTS[:1], [seed]))
    assert (stock - ours).abs().max().item() < ATOL
