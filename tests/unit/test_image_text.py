"""SenseFlow image-text JSON: validation, resize + centre-crop, VAE latents, caching with latents."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from senseflow.config import PathsConfig, apply_overrides, validate  # noqa: E402
from senseflow.data import sources  # noqa: E402
from senseflow.data.cache import build_cache, open_cache  # noqa: E402
from senseflow.data.image_text import (ImageTextItems, encode_images, load_image, load_image_text,  # noqa: E402
                                       resize_center_crop)
from senseflow.rng import derive_seed  # noqa: E402
from senseflow.teachers.base import SenseflowError  # noqa: E402
from senseflow.teachers.sd3 import SD3Adapter  # noqa: E402
from tests.helpers.tiny_models import make_tiny_sd3_folder  # noqa: E402

RES = 16
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS") == "1":
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _strip(colors, side, vertical=False):
    """Squares of ``side`` px in the given colours, side by side (or stacked)."""
    n = len(colors)
    img = Image.new("RGB", (side, side * n) if vertical else (side * n, side))
    for i, c in enumerate(colors):
        box = (0, i * side, side, (i + 1) * side) if vertical else (i * side, 0, (i + 1) * side, side)
        img.paste(c, box)
    return img


def _write_set(root, n=4, **extra):
    root.mkdir(parents=True, exist_ok=True)
    (root / "img").mkdir(exist_ok=True)
    paths = []
    for i in range(n):
        img = _strip([RED, (40 * i, 100, 200), BLUE], 16 + 8 * i, vertical=bool(i % 2))
        img.save(root / "img" / f"{i}.png")
        paths.append(f"img/{i}.png")
    data = {"keys": [f"{i:06d}" for i in range(n)], "image_paths": paths,
            "prompts": ["a red cat", "a blue dog", "a green circle", "a small square"][:n]}
    data.update(extra)
    (root / "data.json").write_text(json.dumps(data))
    return root / "data.json"


def test_a_non_square_image_is_resized_and_centre_cropped(tmp_path):
    # 96 x 32: three 32 px squares; at 16 px the short side scales by 1/2 and the middle square remains
    _strip([RED, GREEN, BLUE], 32).save(tmp_path / "wide.png")
    _strip([RED, GREEN, BLUE], 32, vertical=True).save(tmp_path / "tall.png")
    for name in ("wide.png", "tall.png"):
        x = load_image(tmp_path / name, RES)
        assert x.shape == (3, RES, RES) and x.dtype == torch.float32
        rgb = ((x + 1) * 127.5).round()
        green = torch.tensor(GREEN, dtype=torch.float32).view(3, 1, 1)
        assert (rgb[:, 2:-2, 2:-2] - green).abs().max() <= 2, name
        assert (rgb[1] > 200).all() and (rgb[0] < 60).all() and (rgb[2] < 60).all(), name  # Lanczos ringing only
    # an image at the training size is passed through untouched
    arr = np.random.default_rng(0).integers(0, 256, (RES, RES, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "exact.png")
    assert torch.equal(load_image(tmp_path / "exact.png", RES),
                       torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1)
    # the crop offset is round((size - res) / 2) on the long side (torchvision's CenterCrop)
    img = Image.fromarray(np.tile(np.arange(21, dtype=np.uint8)[None, :, None], (16, 1, 3)))
    assert np.asarray(resize_center_crop(img, 16))[0, :, 0].tolist() == list(range(2, 18))
    # modes other than RGB (greyscale, palette with alpha) become RGB
    Image.new("L", (20, 16), 128).save(tmp_path / "grey.png")
    Image.new("RGBA", (16, 24), (10, 20, 30, 0)).save(tmp_path / "alpha.png")
    assert torch.allclose(load_image(tmp_path / "grey.png", RES), torch.full((3, RES, RES), 128 / 127.5 - 1), atol=1e-6)
    assert load_image(tmp_path / "alpha.png", RES).shape == (3, RES, RES)


def test_the_json_is_validated_up_front(tmp_path):
    path = _write_set(tmp_path / "ok")
    data = load_image_text(path)
    assert data.keys[1] == "000001" and data.prompts[2] == "a green circle"
    assert all(p.is_absolute() and p.is_file() for p in data.image_paths)  # relative to the JSON's folder

    cases = {
        "unequal": ({"prompts": ["a", "b", "c"]}, r"different lengths \(keys=4, image_paths=4, prompts=3\)"),
        "missing": ({"image_paths": ["img/0.png", "img/1.png", "img/2.png", "img/nope.png"]}, "nope.png' not found"),
        "empty": ({"keys": [], "image_paths": [], "prompts": []}, "contains no items"),
        "types": ({"prompts": ["a", "b", 3, "d"]}, "must be a list of strings"),
    }
    for name, (extra, needle) in cases.items():
        with pytest.raises(SenseflowError, match=needle) as err:
            load_image_text(_write_set(tmp_path / name, **extra))
        assert "\n" not in str(err.value)
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(SenseflowError, match="not valid JSON"):
        load_image_text(tmp_path / "bad.json")
    (tmp_path / "nolists.json").write_text(json.dumps({"images": []}))
    with pytest.raises(SenseflowError, match="image_paths"):
        load_image_text(tmp_path / "nolists.json")
    with pytest.raises(SenseflowError, match="not found"):
        load_image_text(tmp_path / "absent.json")

    # an unreadable image: caught by the header check; a truncated one only by decoding
    root = tmp_path / "broken"
    path = _write_set(root)
    (root / "img" / "1.png").write_text("this is not an image")
    with pytest.raises(SenseflowError, match="1.png' is not a readable image"):
        load_image_text(path)
    root = tmp_path / "truncated"
    path = _write_set(root)
    raw = (root / "img" / "2.png").read_bytes()
    (root / "img" / "2.png").write_bytes(raw[: len(raw) // 2])
    data = load_image_text(path)  # header check passes
    with pytest.raises(SenseflowError, match="2.png' cannot be decoded"):
        load_image_text(path, check="full")
    with pytest.raises(SenseflowError, match="2.png' cannot be decoded"):
        load_image(data.image_paths[2], RES)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3img")
    folder = make_tiny_sd3_folder(root / "sd3", "sd3", with_t5=False).path
    adapter, _ = SD3Adapter.from_pretrained(folder, resolution=RES, max_sequence_length=0)
    data = {"paths": {"teacher": str(folder), "prompts": str(root / "unused.txt"), "output": str(root / "run")},
            "teacher": {"family": "sd3", "resolution": RES, "options": {"max_sequence_length": 0}},
            "method": {"name": "dmd2"}, "train": {"device": "cpu", "batch_size": 2}}
    return {"root": root, "adapter": adapter, "data": data}


def test_image_text_batches_give_prompts_and_vae_latents_and_resume(sd3, tmp_path):
    adapter = sd3["adapter"]
    items = ImageTextItems(load_image_text(_write_set(tmp_path / "set")), RES)
    src = sources.ImageTextBatches(items, adapter, 2, 5, torch.device("cpu"))
    batch = src.next_batch()
    idx = [items.data.prompts.index(p) for p in batch.prompts]
    assert batch.latents.shape == (2, *adapter.latent_shape())
    images = items.images(idx)
    assert images.shape == (2, 3, RES, RES) and images.min() >= -1 and images.max() <= 1
    seeds = [derive_seed(5, "vae", 0, i) for i in idx]
    assert torch.equal(batch.latents, encode_images(adapter, images, seeds))
    expected = adapter.encode_prompts(batch.prompts).tensors["prompt_embeds"]
    assert torch.equal(batch.cond.tensors["prompt_embeds"], expected)
    state = src.state_dict()
    again = sources.ImageTextBatches(items, adapter, 2, 5, torch.device("cpu"))
    again.load_state_dict(state)
    x, y = src.next_batch(), again.next_batch()
    assert x.prompts == y.prompts and torch.equal(x.latents, y.latents)


def test_cache_with_latents_and_a_bad_image_writes_nothing(sd3, tmp_path):
    adapter = sd3["adapter"]
    config = validate(sd3["data"])
    items = ImageTextItems(load_image_text(_write_set(tmp_path / "set")), RES)
    out = build_cache(config, tmp_path / "c", items=items, adapter=adapter, batch_size=3, shard_size=3,
                      latent_sample=False, progress=False)
    cache = open_cache(out)
    assert cache.has_latents and cache.index["latent_shape"] == list(adapter.latent_shape())
    assert cache.index["tensors"]["latents"] == {"shape": list(adapter.latent_shape()), "dtype": "float32"}
    prompts, cond, latents = cache.items([0, 1, 2])
    mode = encode_images(adapter, items.images([0, 1, 2]), sample=False)
    assert prompts == items.data.prompts[:3] and torch.equal(latents, mode)
    cache.check_compatible(config, adapter)
    with pytest.raises(SenseflowError, match="resolution 16 but teacher.resolution is 32"):
        cache.check_compatible(validate(apply_overrides(sd3["data"], ["teacher.resolution=32"])))

    # seeded posterior samples are reproducible and independent of the batch size
    a = build_cache(config, tmp_path / "s1", items=items, adapter=adapter, batch_size=1, progress=False)
    b = build_cache(config, tmp_path / "s2", items=items, adapter=adapter, batch_size=4, progress=False)
    la, lb = open_cache(a).items(range(4))[2], open_cache(b).items(range(4))[2]
    assert torch.allclose(la, lb, atol=1e-5) and not torch.allclose(la, open_cache(out).items(range(4))[2])

    root = tmp_path / "truncated"
    path = _write_set(root)
    raw = (root / "img" / "3.png").read_bytes()
    (root / "img" / "3.png").write_bytes(raw[: len(raw) // 2])
    bad = ImageTextItems(load_image_text(path), RES)
    with pytest.raises(SenseflowError, match="3.png' cannot be decoded"):
        build_cache(config, tmp_path / "bad", items=bad, adapter=adapter, batch_size=2, shard_size=2, progress=False)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


@pytest.mark.skipif("image_text" not in PathsConfig.model_fields,
                    reason="paths.image_text / paths.lmdb are not wired into the config yet")
def test_config_keys_drive_the_cache_command_and_the_sources(sd3, tmp_path):
    import yaml

    from senseflow.cli import main
    from senseflow.data.lmdb_data import write_lmdb

    adapter = sd3["adapter"]
    json_path = _write_set(tmp_path / "set")
    data = apply_overrides(sd3["data"], [f"paths.image_text={json_path}", "paths.prompts=null"])
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(data))
    out = tmp_path / "c"
    assert main(["cache", str(config_file), "-o", str(out), "--no-progress", "--latents", "mode"]) == 0
    assert open_cache(out).has_latents and open_cache(out).index["source"]["kind"] == "image-text"
    source = sources.data_source(validate(data), adapter, torch.device("cpu"))
    assert isinstance(source, sources.ImageTextBatches) and source.next_batch().latents is not None
    both = apply_overrides(data, ["paths.prompts=x.txt"])
    with pytest.raises(SenseflowError, match="give one data source"):
        validate(both)

    write_lmdb(tmp_path / "db", torch.zeros(3, *adapter.latent_shape()), ["a cat", "a dog", "a red circle"])
    lm = validate(apply_overrides(sd3["data"], [f"paths.lmdb={tmp_path / 'db'}", "paths.prompts=null"]))
    source = sources.data_source(lm, adapter, torch.device("cpu"))
    assert isinstance(source, sources.LmdbBatches) and source.next_batch().latents.shape[0] == 2
    spec = sources.sample_spec(lm, adapter, torch.device("cpu"))
    assert spec.prompts == ["a cat", "a dog", "a red circle"]  # the first train.num_samples (8) items
