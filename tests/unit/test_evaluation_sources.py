"""Image sources of senseflow evaluate on tiny real-class diffusers folders: per-image seeds, stock seeding."""

import numpy as np
import pytest
import torch

from senseflow.evaluation.sources import PipelineSource, TeacherSource, parse_spec, teacher_family
from senseflow.teachers.base import SenseflowError
from tests.helpers.tiny_models import make_tiny_sd3_folder

PROMPTS = ["a red cat", "a blue dog on the green square"]


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    return make_tiny_sd3_folder(tmp_path_factory.mktemp("sd3") / "sd3").path


def test_pipeline_source_seeds_each_image_like_the_stock_pipeline(sd3_folder):
    from diffusers import DiffusionPipeline

    src = PipelineSource(sd3_folder, steps=2, cfg=1.0, resolution=32)
    assert src.family == "sd3" and src.call == {"num_inference_steps": 2, "guidance_scale": 1.0, "height": 32,
                                                "width": 32}
    src.load(torch.device("cpu"))
    both = src.render(PROMPTS, [11, 22])
    alone = src.render(PROMPTS[1:], [22])
    assert both.dtype == np.uint8 and both.shape == (2, 32, 32, 3)
    assert np.array_equal(both[1], alone[0])                  # an image depends on its own seed only
    pipe = DiffusionPipeline.from_pretrained(str(sd3_folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(22)                                     # SD3 draws from the global RNG (generate.RECIPES)
    ref = pipe(prompt=[PROMPTS[1]], num_inference_steps=2, guidance_scale=1.0, height=32, width=32,
               output_type="np").images
    assert np.array_equal(alone[0], (np.clip(ref[0], 0, 1) * 255).round().astype(np.uint8))


def test_teacher_source_images_do_not_depend_on_the_batch(sd3_folder):
    assert teacher_family(str(sd3_folder)) == "sd3"
    t = TeacherSource(str(sd3_folder), steps=3, cfg=2.0, resolution=32)
    t.load(torch.device("cpu"))
    both = t.render(PROMPTS, [5, 6])
    alone = t.render(PROMPTS[1:], [6])
    assert both.shape == (2, 32, 32, 3)
    assert np.abs(both[1].astype(int) - alone[0].astype(int)).max() <= 1      # batched matmuls may round apart
    other = t.render(PROMPTS[1:], [7])
    assert np.abs(other[0].astype(int) - alone[0].astype(int)).max() > 10     # and the seed matters
    fields = t.cache_fields()
    assert fields["steps"] == 3 and fields["cfg"] == 2.0 and len(fields["teacher"]) == 64


def test_source_specs():
    assert parse_spec("runs/a") == (None, "runs/a", {})
    assert parse_spec("fast=runs/a,steps=2,sampler=euler") == ("fast", "runs/a", {"steps": "2", "sampler": "euler"})
    with pytest.raises(SenseflowError, match="key=value"):
        parse_spec("runs/a,2")


def test_teacher_with_its_stock_pipeline_is_the_pipeline_source(sd3_folder):
    t = TeacherSource(str(sd3_folder), steps=2, cfg=1.0, resolution=32, sampler="pipeline")
    p = PipelineSource(sd3_folder, steps=2, cfg=1.0, resolution=32)
    t.load(torch.device("cpu"))
    p.load(torch.device("cpu"))
    assert np.array_equal(t.render(PROMPTS[:1], [3]), p.render(PROMPTS[:1], [3]))
    assert t.cache_fields()["sampler"] == "pipeline"          # cached apart from the Euler-sampled reference
    with pytest.raises(SenseflowError, match="toy teacher has no stock pipeline"):
        TeacherSource("builtin:toy", sampler="pipeline")
