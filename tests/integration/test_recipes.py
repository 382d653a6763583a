"""Every shipped recipe runs as a user starts it: its own method, precision, dtypes and parallel settings.

Each YAML in ``configs/`` and ``src/senseflow/recipes/toy/`` is trained for two iterations in this
one process.  Only what is specific to the machine is overridden: ``paths.*`` (tiny local folders
of the REAL diffusers / transformers classes built by :mod:`tests.helpers.tiny_models`, a tiny
prompt file and image-text set, the discriminator's DINOv2 / CLIP folders), the resolution, the
batch (``batch_size``, ``grad_accum`` at most 2) and the step / sample / checkpoint counts.
``teacher.dtype``, ``train.precision``, ``teacher.options``, the method section and ``parallel``
are the recipe's own -- which is how the SDXL recipes' float16 teacher under ``amp_bf16``
(``Unexpected floating ScalarType in at::autocast::prioritize``) would have been caught.

The tiny folders are built once per module and shared by all recipes of a family.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from diffusers.utils import logging as diffusers_logging  # noqa: E402

from senseflow import api  # noqa: E402
from senseflow.cli import main  # noqa: E402
from senseflow.config import BUILTIN_PREFIX, load_yaml, validate  # noqa: E402
from senseflow.lora import is_lora_name  # noqa: E402
from tests.helpers import tiny_flux2, tiny_models, tiny_zimage  # noqa: E402
from tests.helpers.tiny_qwenimage import make_tiny_qwenimage_folder  # noqa: E402
from tests.helpers.threads import single_thread  # noqa: E402,F401 (module-wide autouse: one thread)

diffusers_logging.disable_progress_bar()
diffusers_logging.set_verbosity_error()

pytestmark = pytest.mark.slow   # ~22 recipes x a few seconds: > 60 s in all

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted([*ROOT.glob("configs/*/*.yaml"), *ROOT.glob("src/senseflow/recipes/*/*.yaml")])
RES = 32
PROMPTS = ["a red cat", "a small blue dog on the square", "a green circle", "the white photo of a big cross"]
BUILDERS = {"sd3": tiny_models.make_tiny_sd3_folder, "flux": tiny_models.make_tiny_flux_folder,
            "sdxl": tiny_models.make_tiny_sdxl_folder, "sana": tiny_models.make_tiny_sana_folder,
            "qwenimage": make_tiny_qwenimage_folder, "flux2": tiny_flux2.make_tiny_flux2_dev_folder,
            "zimage": tiny_zimage.make_tiny_zimage_folder}


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny teacher folders (built on first use), a prompt file, an image-text set, DINOv2 / CLIP folders."""
    from PIL import Image

    root = tmp_path_factory.mktemp("recipes")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "img").mkdir()
    paths = []
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200), (30, 200, 30), (220, 220, 220)]):
        Image.new("RGB", (40, 40), colour).save(root / "img" / f"{i}.png")
        paths.append(f"img/{i}.png")
    (root / "image_text.json").write_text(json.dumps(
        {"keys": [f"{i:06d}" for i in range(4)], "image_paths": paths, "prompts": PROMPTS}))
    # DINOv2 with ViT's patch 14: the recipes' 224 px discriminator input is a 16 x 16 token grid
    tiny_models.make_tiny_dinov2_folder(root / "dinov2", hidden_size=16, num_layers=4, patch_size=14, image_size=224)
    tiny_models.make_tiny_clip_text_folder(root / "clip", projection_dim=16)
    teachers: dict[str, Path] = {}

    def teacher(family: str) -> Path:
        if family not in teachers:
            BUILDERS[family](root / family)
            teachers[family] = root / family
        return teachers[family]

    return {"root": root, "teacher": teacher}


def _tiny_lmdb(teacher: Path, path: Path) -> Path:
    """A DMD2-style LMDB of random VAE latents for the tiny teacher folder (shape read from its VAE config)."""
    from senseflow.data.lmdb_data import write_lmdb

    if path.exists():
        return path
    vae = json.loads((teacher / "vae" / "config.json").read_text())
    size = RES // 2 ** (len(vae["block_out_channels"]) - 1)
    latents = torch.randn(len(PROMPTS), vae["latent_channels"], size, size, generator=torch.Generator().manual_seed(0))
    return write_lmdb(path, latents, PROMPTS)


def tiny_overrides(data: dict, world, out: Path) -> dict:
    """The recipe with only paths, resolution, batch and counts changed (see module docstring)."""
    data = json.loads(json.dumps(data))
    family = data["teacher"]["family"]
    root = world["root"]
    paths = data["paths"]
    if family in BUILDERS:
        paths["teacher"] = str(world["teacher"](family))
        data["teacher"]["resolution"] = RES
    for key in ("prompts", "eval_prompts"):
        if paths.get(key) is not None and not str(paths[key]).startswith(BUILTIN_PREFIX):
            paths[key] = str(root / "prompts.txt")
    if paths.get("image_text") is not None:
        paths["image_text"] = str(root / "image_text.json")
    assert paths.get("cache") is None, "a shipped recipe needs no prebuilt cache"
    if paths.get("lmdb") is not None:  # DMD2-style real latents (the SDXL DMD2 recipe's GAN term needs them)
        paths["lmdb"] = str(_tiny_lmdb(Path(paths["teacher"]), root / f"lmdb_{family}"))
    paths["output"] = str(out)
    disc = data.get("discriminator")
    if disc is not None:
        for key, folder in (("dinov2_path", "dinov2"), ("clip_path", "clip")):
            if not str(disc[key]).startswith(BUILTIN_PREFIX):
                disc[key] = str(root / folder)
    train = data.setdefault("train", {})
    accum = min(int(train.get("grad_accum", 1)), 2)
    train.update(steps=2, batch_size=2, grad_accum=accum, num_samples=1, sample_every=0, checkpoint_every=0,
                 log_every=1, progress=False, tensorboard=False, device="cpu")
    return data


def test_every_recipe_is_collected():
    names = {_rel(p) for p in RECIPES}
    assert {"configs/sdxl/senseflow.yaml", "configs/sdxl/dmd2.yaml", "configs/flux/sid.yaml",
            "src/senseflow/recipes/toy/senseflow.yaml"} <= names
    assert len(names) >= 20


@pytest.mark.parametrize("recipe", RECIPES, ids=_rel)
def test_shipped_recipe_trains_two_iterations(recipe, world, tmp_path):
    raw = load_yaml(recipe)
    data = tiny_overrides(raw, world, tmp_path / "run")
    config = validate(data)
    # the recipe's own precision and dtypes are what runs
    assert config.train.precision == raw.get("train", {}).get("precision", "fp32")
    assert config.teacher.dtype == raw["teacher"].get("dtype", "float32")
    trainer = api.train(config, resume="never")
    assert trainer.step == 2
    logs = trainer.last_logs
    assert any(k.startswith("loss_") for k in logs), logs
    assert all(math.isfinite(float(v)) for v in logs.values()), logs
    assert (tmp_path / "run" / "student" / "student.safetensors").is_file()
    lora = config.generator.lora is not None
    for name, p in trainer.method.models.generator.named_parameters():
        assert torch.isfinite(p).all()
        # fp32 master weights, whatever teacher.dtype is (a LoRA generator: its adapters; the frozen base keeps
        # the teacher's storage dtype)
        if config.train.precision == "amp_bf16" and (not lora or is_lora_name(name)):
            assert p.dtype == torch.float32


def test_dry_run_refuses_a_folder_of_another_family(world, tmp_path, capsys):
    """``senseflow train --dry-run``: the SDXL recipe pointed at a FLUX folder fails in one line naming both."""
    flux = world["teacher"]("flux")
    recipe = ROOT / "configs" / "sdxl" / "dmd2.yaml"
    sets = [f"paths.teacher={flux}", f"paths.prompts={world['root'] / 'prompts.txt'}", "paths.lmdb=null",
            f"paths.output={tmp_path / 'run'}"]
    code = main(["train", str(recipe), "--dry-run", *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "FluxPipeline" in err and "flux" in err and "sdxl" in err, err
    assert not (tmp_path / "run").exists()
    # the matching folder passes the dry run and prints the resolved config
    sdxl = world["teacher"]("sdxl")
    code = main(["train", str(recipe), "--dry-run", "--set", f"paths.teacher={sdxl}",
                 *[a for s in sets[1:] for a in ("--set", s)]])
    assert code == 0
    assert "family: sdxl" in capsys.readouterr().out
