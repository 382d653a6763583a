"""Prompt/latent caches: `senseflow cache`, bit-exact contents, training without text encoders, validation."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import yaml

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from senseflow import api  # noqa: E402
from senseflow.cli import main  # noqa: E402
from senseflow.config import PathsConfig, apply_overrides, validate  # noqa: E402
from senseflow.data import sources  # noqa: E402
from senseflow.data.cache import (INDEX, PromptItems, build_cache, open_cache)  # noqa: E402
from senseflow.data.lmdb_data import LmdbItems, LmdbLatents, write_lmdb  # noqa: E402
from senseflow.data.prompts import PromptStream  # noqa: E402
from senseflow.rng import derive_seed  # noqa: E402
from senseflow.teachers.base import SenseflowError  # noqa: E402
from senseflow.teachers.sd3 import SD3Adapter  # noqa: E402
from tests.helpers.tiny_models import make_tiny_sd3_folder  # noqa: E402

PROMPTS = ["a red cat", "a blue dog", "a green circle", "a small square", "a big triangle", "a white cross",
           "a photo of a cat", "a painting of a dog", "a yellow circle on a black square"]
EVAL = ["a red circle", "a blue square", "a cat"]
RES = 16
SEQ = 8  # T5 tokens (teacher.options.max_sequence_length): keeps the conditioning small


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS") == "1":
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    teacher = make_tiny_sd3_folder(root / "sd3", "sd3").path
    other = make_tiny_sd3_folder(root / "sd3-other", "sd3", seed=1).path
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "eval.txt").write_text("\n".join(EVAL) + "\n")
    data = {
        "paths": {"teacher": str(teacher), "prompts": str(root / "prompts.txt"), "eval_prompts": str(root / "eval.txt"),
                  "output": str(root / "run")},
        "teacher": {"family": "sd3", "resolution": RES, "options": {"max_sequence_length": SEQ}},
        "method": {"name": "dmd2", "ttur": 2, "real_guidance": {"cfg": 3.0}},
        "optim": {"generator": {"lr": 1e-4}, "fake_score": {"lr": 1e-4}},
        "train": {"steps": 2, "batch_size": 2, "device": "cpu", "progress": False, "tensorboard": False,
                  "num_samples": 2, "log_every": 1},
    }
    config_file = root / "run.yaml"
    config_file.write_text(yaml.safe_dump(data))
    cache = root / "cache"
    assert main(["cache", str(config_file), "--output", str(cache), "--batch-size", "4", "--shard-size", "4",
                 "--no-progress"]) == 0
    adapter, _ = SD3Adapter.from_pretrained(teacher, resolution=RES, max_sequence_length=SEQ)
    return {"root": root, "teacher": teacher, "other": other, "data": data, "config_file": config_file,
            "cache": cache, "adapter": adapter}


def _config(world, *overrides):
    return validate(apply_overrides(world["data"], list(overrides)))


def _copy(world, tmp_path):
    dst = tmp_path / "cache"
    shutil.copytree(world["cache"], dst)
    return dst


def test_cache_holds_exactly_what_the_encoders_give(world):
    cache_dir, adapter = world["cache"], world["adapter"]
    names = sorted(p.name for p in cache_dir.iterdir())
    assert names == sorted([INDEX, "eval.safetensors", "shard-00000.safetensors", "shard-00001.safetensors",
                            "shard-00002.safetensors", "uncond.safetensors"])
    assert not cache_dir.with_name("cache.partial").exists()
    index = json.loads((cache_dir / INDEX).read_text())
    assert index["num_items"] == len(PROMPTS) and index["resolution"] == RES and index["latents"] is False
    assert index["teacher"]["family"] == "sd3" and index["teacher"]["folder"] == str(world["teacher"].resolve())
    assert set(index["teacher"]["components"]) == {"text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                                                   "tokenizer_2", "tokenizer_3", "vae"}
    assert index["teacher"]["encoding_options"] == {"max_sequence_length": SEQ}
    assert [s["num_items"] for s in index["shards"]] == [4, 4, 1]
    assert index["tensors"] == {"cond.prompt_embeds": {"shape": [77 + SEQ, 32], "dtype": "float32"},
                                "cond.pooled_prompt_embeds": {"shape": [32], "dtype": "float32"}}
    assert index["created_by"].startswith("senseflow ") and index["source"]["kind"] == "prompts"

    from safetensors.torch import load_file
    for s in range(3):
        stored = load_file(str(cache_dir / f"shard-{s:05d}.safetensors"))
        expected = adapter.encode_prompts(PROMPTS[4 * s:4 * s + 4])  # the same batches as --batch-size 4
        for key, value in expected.tensors.items():
            assert torch.equal(stored[f"cond.{key}"], value), (s, key)
    cache = open_cache(cache_dir)
    prompts, cond, latents = cache.items([5, 0, 8])
    assert prompts == [PROMPTS[5], PROMPTS[0], PROMPTS[8]] and latents is None
    first = adapter.encode_prompts(PROMPTS[:4]).tensors["prompt_embeds"][0]
    assert torch.equal(cond.tensors["prompt_embeds"][1], first)
    uncond = cache.unconditional()
    for key, value in adapter.encode_prompts([""]).tensors.items():
        assert torch.equal(uncond.tensors[key], value), key
    eval_prompts, eval_cond = cache.eval_set()
    assert eval_prompts == EVAL
    expected = adapter.encode_prompts(EVAL).tensors["pooled_prompt_embeds"]
    assert torch.equal(eval_cond.tensors["pooled_prompt_embeds"], expected)


def _trainer_from_cache(world, monkeypatch, cache_dir, *overrides):
    """With paths.cache wired into the config, the real builder; until then, the calls it will make."""
    if "cache" in PathsConfig.model_fields:
        return api.build_trainer(_config(world, f"paths.cache={cache_dir}", *overrides))
    config = _config(world, "teacher.options.load_text_encoders=false", *overrides)
    monkeypatch.setattr(api, "build_data", lambda c, a, d, r=0, w=1: sources.data_source(
        c, a, d, r, w, cache=sources.use_cache(c, a, str(cache_dir))))
    monkeypatch.setattr(api, "build_samples", lambda c, a, d: sources.sample_spec(c, a, d, cache=open_cache(cache_dir)))
    return api.build_trainer(config)


def test_training_from_the_cache_without_text_encoders(world, monkeypatch, tmp_path):
    out = tmp_path / "run"
    trainer = _trainer_from_cache(world, monkeypatch, world["cache"], f"paths.output={out}", "train.steps=2")
    adapter = trainer.method.models.teacher.adapter
    assert adapter.clip_encoders == [] and adapter.t5_encoder is None, "text encoders must not be loaded"
    with pytest.raises(SenseflowError, match="without text encoders"):
        adapter.encode_prompts(["a cat"])
    cached_uncond = open_cache(world["cache"]).unconditional()
    assert torch.equal(adapter.unconditional(1).tensors["prompt_embeds"], cached_uncond.tensors["prompt_embeds"])
    assert trainer.samples.prompts == EVAL[:2]
    # the cache walks its items exactly like a prompt-file run walks the prompt file
    stream = PromptStream(PROMPTS, 2, derive_seed(0, "data"))
    probe = sources.CachedBatches(open_cache(world["cache"]), 2, derive_seed(0, "data"), torch.device("cpu"))
    for _ in range(6):
        assert probe.next_batch().prompts == stream.next_prompts()
    logs = trainer.fit()
    assert trainer.step == 2 and logs and all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    state = trainer.data.state_dict()
    assert state["position"] == 4 and state["num_items"] == len(PROMPTS)
    resumed = _trainer_from_cache(world, monkeypatch, world["cache"], f"paths.output={out}", "train.steps=3")
    assert resumed.step == 2 and resumed.data.state_dict() == state


def test_cached_source_resumes_and_shards_by_rank(world):
    cache = open_cache(world["cache"])
    seed, dev = 7, torch.device("cpu")
    a = sources.CachedBatches(cache, 3, seed, dev)
    for _ in range(4):  # crosses an epoch boundary (9 items, 3 per batch)
        a.next_batch()
    state = a.state_dict()
    b = sources.CachedBatches(open_cache(world["cache"]), 3, seed, dev)
    b.load_state_dict(state)
    for _ in range(3):
        x, y = a.next_batch(), b.next_batch()
        assert x.prompts == y.prompts
        assert torch.equal(x.cond.tensors["prompt_embeds"], y.cond.tensors["prompt_embeds"])
    ranks = [sources.CachedBatches(cache, 2, seed, dev, rank=r, world_size=2) for r in range(2)]
    seen = [set(r.next_batch().prompts) | set(r.next_batch().prompts) for r in ranks]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 8  # 9 items: one left out per epoch, equal shards
    other = sources.CachedBatches(cache, 3, seed, dev)
    with pytest.raises(SenseflowError, match="trained on 5 data items"):
        other.load_state_dict({**state, "num_items": 5})


def test_a_cache_from_another_teacher_or_setting_is_rejected(world):
    cache = open_cache(world["cache"])
    cache.check_compatible(_config(world))  # the right teacher passes
    cache.check_compatible(_config(world, "teacher.resolution=32"))  # prompt-only caches do not depend on it
    with pytest.raises(SenseflowError, match=r"different text_encoder .*fingerprint") as err:
        cache.check_compatible(_config(world, f"paths.teacher={world['other']}"))
    assert "\n" not in str(err.value)
    with pytest.raises(SenseflowError, match="max_sequence_length"):
        cache.check_compatible(_config(world, "teacher.options.max_sequence_length=16"))
    with pytest.raises(SenseflowError, match="teacher family 'sd3' but teacher.family is 'flux'"):
        cache.check_compatible(_config(world, "teacher.family=flux"))


def test_a_missing_or_corrupt_cache_is_one_line(world, tmp_path):
    with pytest.raises(SenseflowError, match="not found"):
        open_cache(tmp_path / "nowhere")
    bad = _copy(world, tmp_path)
    (bad / INDEX).write_text("{ not json")
    with pytest.raises(SenseflowError, match="index.json is corrupt"):
        open_cache(bad)
    (bad / INDEX).write_text(json.dumps({"format": "senseflow-cache", "version": 1}))
    with pytest.raises(SenseflowError, match="corrupt"):
        open_cache(bad)
    (bad / INDEX).unlink()
    with pytest.raises(SenseflowError, match="no index.json"):
        open_cache(bad)
    shutil.rmtree(bad)
    bad = _copy(world, tmp_path)
    (bad / "shard-00001.safetensors").unlink()
    with pytest.raises(SenseflowError, match="shard-00001.safetensors listed in index.json is missing"):
        open_cache(bad)
    (bad / "shard-00001.safetensors").write_bytes(b"garbage")
    with pytest.raises(SenseflowError, match="shard-00001.safetensors is unreadable"):
        open_cache(bad).items([5])


def test_bad_input_writes_nothing(world, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    out = tmp_path / "c"
    rc = main(["cache", str(world["config_file"]), "--set", f"paths.prompts={empty}", "--output", str(out)])
    assert rc == 2 and not out.exists() and not out.with_name("c.partial").exists()
    rc = main(["cache", str(world["config_file"]), "--output", str(world["cache"])])  # exists, no --overwrite
    assert rc == 2
    rc = main(["cache", str(world["config_file"])])  # nowhere to put it
    assert rc == 2


def test_an_interrupted_build_leaves_no_cache_and_resumes(world, tmp_path, monkeypatch, capsys):
    import senseflow.data.cache as cache_mod

    config, adapter = _config(world), world["adapter"]
    out = tmp_path / "c"
    real_save, calls = cache_mod._save, []

    def crash_after_two(tensors, path, metadata):
        calls.append(path.name)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        real_save(tensors, path, metadata)

    monkeypatch.setattr(cache_mod, "_save", crash_after_two)
    with pytest.raises(RuntimeError):
        build_cache(config, out, batch_size=4, shard_size=4, adapter=adapter, progress=False)
    assert not out.exists() and sorted(p.name for p in out.with_name("c.partial").iterdir()) == [
        "plan.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    with pytest.raises(SenseflowError, match="incomplete"):
        open_cache(out)
    monkeypatch.setattr(cache_mod, "_save", real_save)
    build_cache(config, out, batch_size=4, shard_size=4, adapter=adapter, progress=False)
    assert "resuming" in capsys.readouterr().out and not out.with_name("c.partial").exists()
    ref, got = open_cache(world["cache"]), open_cache(out)
    _, c1, _ = ref.items(range(len(PROMPTS)))
    _, c2, _ = got.items(range(len(PROMPTS)))
    assert all(torch.equal(c1.tensors[k], c2.tensors[k]) for k in c1.tensors)
    # --overwrite replaces a complete cache atomically
    build_cache(config, out, batch_size=2, shard_size=5, adapter=adapter, progress=False, overwrite=True)
    assert [s[2] for s in open_cache(out).shards] == [5, 4] and not out.with_name("c.old").exists()


def test_lmdb_latents_read_cache_and_train_batches(world, tmp_path):
    adapter = world["adapter"]
    torch.manual_seed(0)
    latents = torch.randn(5, *adapter.latent_shape())
    path = write_lmdb(tmp_path / "db", latents, PROMPTS[:5])
    db = LmdbLatents(path)
    assert len(db) == 5 and db.latent_shape == tuple(adapter.latent_shape()) and db.prompt(3) == PROMPTS[3]
    assert torch.equal(db.latent(2), latents[2].half())  # DMD2 stores float16
    exact = LmdbLatents(write_lmdb(tmp_path / "db32", latents, PROMPTS[:5], dtype="float32"))
    assert torch.equal(exact.latent(4), latents[4])

    source = sources.LmdbBatches(LmdbItems(db), adapter, 2, 3, torch.device("cpu"))
    batch = source.next_batch()
    idx = [PROMPTS.index(p) for p in batch.prompts]
    assert torch.equal(batch.latents, latents[idx].half().float())
    assert torch.equal(batch.cond.tensors["pooled_prompt_embeds"],
                       adapter.encode_prompts(batch.prompts).tensors["pooled_prompt_embeds"])

    out = build_cache(_config(world), tmp_path / "lc", items=LmdbItems(db), adapter=adapter, progress=False,
                      batch_size=2, shard_size=3)
    cache = open_cache(out)
    assert cache.has_latents and cache.index["source"]["kind"] == "lmdb"
    prompts, _, cached = cache.items([4, 1])
    assert prompts == [PROMPTS[4], PROMPTS[1]] and torch.equal(cached, latents[[4, 1]].half().float())
    with pytest.raises(SenseflowError, match="resolution 16 but teacher.resolution is 32"):
        cache.check_compatible(_config(world, "teacher.resolution=32"))

    wrong = LmdbLatents(write_lmdb(tmp_path / "wrong", torch.zeros(2, 4, 4, 4), PROMPTS[:2]))
    with pytest.raises(SenseflowError, match=r"shape \[4, 4, 4\] but the teacher .* needs \[4, 8, 8\]"):
        sources.LmdbBatches(LmdbItems(wrong), adapter, 2, 0, torch.device("cpu"))
    with pytest.raises(SenseflowError, match="not found"):
        LmdbLatents(tmp_path / "nothing")
    import lmdb
    env = lmdb.open(str(tmp_path / "foreign"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"something", b"else")
    env.close()
    with pytest.raises(SenseflowError, match="no 'latents_shape'"):
        LmdbLatents(tmp_path / "foreign")


def test_prompt_items_and_toy_world_refusal(world):
    items = PromptItems(["x", "y"])
    assert items.prompts([1, 0]) == ["y", "x"] and not items.has_latents
    from senseflow.data.cache import source_items
    with pytest.raises(SenseflowError, match="cannot be cached"):
        source_items(_config(world, "paths.prompts=builtin:toy-world"))
