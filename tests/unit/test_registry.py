"""The teacher-family registry: descriptors in each adapter file, entry points, config validation."""

from __future__ import annotations

import re
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from senseflow.build import load_teacher
from senseflow.config import validate
from senseflow.teachers import registry
from senseflow.teachers.base import SenseflowError

SRC = Path(__file__).resolve().parents[2] / "src" / "senseflow"


def _fake_load(config, device):
    from senseflow.teachers.custom import tiny_example

    adapter, backbone = tiny_example(resolution=config.teacher.resolution, device=device)
    adapter.loaded_by = "fake-family"
    return adapter, backbone


#: what a third-party package would expose through ``[project.entry-points."senseflow.families"]``
FAKE_FAMILY = registry.FamilyDescriptor(name="fakefam", label="Fake", load=_fake_load,
                                        backbone_classes=("FakeBackbone",), pipeline_prefixes=("FakePipe",))


@pytest.fixture
def with_entry_point(monkeypatch):
    ep = EntryPoint(name="fakefam", value=f"{__name__}:FAKE_FAMILY", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "_ENTRY_POINTS", {"fakefam": ep})
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    yield


def test_unknown_family_is_one_line_listing_the_known_ones():
    with pytest.raises(SenseflowError) as err:
        validate({"paths": {"teacher": "x"}, "teacher": {"family": "qwen"}, "method": {"name": "dmd2"}})
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == ("config error: teacher.family: unknown family 'qwen'; known families: "
                   "toy, sd3, flux, flux2, sdxl, sana, custom, qwenimage, zimage")


def test_a_family_from_an_entry_point_validates_and_loads(with_entry_point):
    assert "fakefam" in registry.names()
    config = validate({"paths": {"teacher": "builtin:fake"}, "teacher": {"family": "fakefam", "resolution": 16},
                       "method": {"name": "dmd2"}})
    adapter, backbone = load_teacher(config, "cpu")
    assert adapter.loaded_by == "fake-family"
    assert registry.family_of_pipeline("FakePipeline") == "fakefam"
    assert registry.family_of_backbone_class("FakeBackbone").name == "fakefam"
    assert "fakefam" not in registry.diffusers_families()   # no pipeline / export recipe: generate only


def test_an_entry_point_named_unlike_its_family_is_refused(monkeypatch):
    ep = EntryPoint(name="other", value=f"{__name__}:FAKE_FAMILY", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "_ENTRY_POINTS", {"other": ep})
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    with pytest.raises(SenseflowError, match="must be the family's name"):
        registry.get("other")


def test_builtin_descriptors_hold_the_pipeline_facts():
    # model_index.json class names of the released checkpoints -> family (longest prefix: SDXL is not SD3)
    assert registry.family_of_pipeline("StableDiffusionXLPipeline") == "sdxl"
    assert registry.family_of_pipeline("StableDiffusion3Pipeline") == "sd3"
    assert registry.family_of_pipeline("FluxPipeline") == "flux"
    assert registry.family_of_pipeline("SanaSprintPipeline") == "sana"
    assert registry.family_of_pipeline("KandinskyPipeline") is None
    assert registry.get("sdxl").backbone_folder == "unet" and registry.get("sd3").backbone_folder == "transformer"
    assert registry.family_of_backbone_class("UNet2DConditionModel").name == "sdxl"
    # diffusers' train_dreambooth_lora_sdxl.py targets the UNet attention projections
    assert registry.get("sdxl").lora_targets == ("to_q", "to_k", "to_v", "to_out.0")
    # SD3 / FLUX pipelines draw the re-noise from the global RNG; SDXL's LCM draws in the model dtype
    assert registry.get("sd3").noise.stream == "global" and registry.get("flux").noise.packed
    assert registry.get("sdxl").noise.stream == "generator" and not registry.get("sdxl").noise.renoise_float32
    assert registry.diffusers_families() == ("sd3", "flux", "flux2", "sdxl", "sana", "qwenimage", "zimage")


def test_shared_modules_do_not_branch_on_family_names():
    """Family knowledge lives in teachers/<family>.py: the shared modules name no built-in diffusers family."""
    pattern = re.compile(r"""["'](sd3|flux|flux2|sdxl|sana|qwenimage|zimage)["']""")
    for rel in ("build.py", "lora.py", "generate.py", "student.py", "export_diffusers.py", "config.py",
                "teachers/loading.py", "export_original.py"):
        hits = [line for line in (SRC / rel).read_text().splitlines() if pattern.search(line)]
        assert not hits, (rel, hits)
