"""The toy DINOv2 (senseflow.toy.backbone): shipped, small, really pretrained, and usable by the VFM discriminator."""

from __future__ import annotations

import json

import pytest
import torch

from senseflow.discriminators.config import VFMDiscriminatorConfig, parse_vfm_config, resolve_builtin
from senseflow.discriminators.vfm import find_tokenizer_folder, load_clip_text, load_dinov2
from senseflow.rng import derive_seed
from senseflow.teachers.base import SenseflowError
from senseflow.toy import backbone as bb
from senseflow.toy.teacher import TEACHER_ASSET
from tests.unit.test_vfm_discriminator import one_line, single_thread  # noqa: F401  (fixture: one thread)

#: fresh procedural images: a ToyWorld stream the backbone never saw (its data / held-out seeds derive from 0)
FRESH = derive_seed("test-toy-dinov2-fresh") % (2 ** 31)
FIT = derive_seed("test-toy-dinov2-fit") % (2 ** 31)


@pytest.fixture(scope="module")
def shipped():
    return bb.load_backbone()


# -------------------------------------------------------------------------------------------------
# the shipped folder
# -------------------------------------------------------------------------------------------------
def test_shipped_backbone_loads_through_the_discriminator_loader_and_is_small(shipped):
    from transformers import Dinov2Model

    cfg = VFMDiscriminatorConfig(dinov2_path="builtin:toy-dinov2", clip_path="builtin:toy-clip")
    cfg.check_paths()
    folder = cfg.folder("dinov2_path")
    assert folder == str(bb.BACKBONE_ASSET)
    model = load_dinov2(folder)
    assert type(model) is Dinov2Model and not any(p.requires_grad for p in model.parameters())
    want = bb.backbone_config().to_dict()
    got = model.config.to_dict()
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "image_size", "patch_size",
                "layerscale_value", "use_mask_token", "use_swiglu_ffn", "num_channels"):
        assert got[key] == want[key], key
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), shipped[0].state_dict().values()))
    files = {p.name: p.stat().st_size for p in bb.BACKBONE_ASSET.iterdir()}
    assert set(files) == {"config.json", "model.safetensors", bb.DECODER_FILE, "training.json"}
    assert sum(files.values()) < 3_000_000
    record = json.loads((bb.BACKBONE_ASSET / "training.json").read_text())
    assert record["command"].startswith("senseflow toy train-backbone --out ")
    assert {"seed", "steps", "final_loss", "seconds", "heldout_loss"} <= set(record)


def _weighted_lstsq_loss(model, fit, fresh) -> float:
    """The masked-prediction loss of ``model`` with the best linear decoder for it (fitted on ``fit``)."""
    def features(images, mask):
        with torch.no_grad():
            h = model(pixel_values=bb.preprocess(images), bool_masked_pos=mask).last_hidden_state[:, 1:]
        w = bb.patch_weights(images, 4) * mask
        return torch.cat([h, torch.ones(*h.shape[:2], 1)], -1)[mask].double(), bb.patchify(images, 4)[mask].double(), \
            w[mask].double()
    h, t, w = features(*fit)
    gram = h.T @ (h * w[:, None]) + 1e-4 * torch.eye(h.shape[1], dtype=h.dtype)
    coef = torch.linalg.solve(gram, h.T @ (t * w[:, None]))
    he, te, we = features(*fresh)
    return float(((he @ coef - te).pow(2).mean(-1) * we).sum() / we.sum())


def test_shipped_backbone_predicts_masked_patches_of_fresh_images_far_better_than_random_init(shipped):
    model, decoder = shipped
    fresh = bb.fresh_batch(FRESH, 256, mask_seed=1)
    with torch.no_grad():
        loss = bb.masked_prediction_loss(model, decoder, *fresh).item()
    random_model = bb.create_backbone(seed=1).eval()
    with torch.no_grad():   # a randomly initialised model, as pretraining starts
        random_loss = bb.masked_prediction_loss(random_model, bb.create_decoder(random_model.config, 1), *fresh).item()
    # the strict baseline: random features with the best (least-squares) linear decoder for them
    probe_loss = _weighted_lstsq_loss(random_model, bb.fresh_batch(FIT, 256, mask_seed=2), fresh)
    assert loss < 0.1 * random_loss, (loss, random_loss)
    assert loss < 0.5 * probe_loss, (loss, probe_loss)


# -------------------------------------------------------------------------------------------------
# training
# -------------------------------------------------------------------------------------------------
def test_cli_writes_a_loadable_folder_atomically_and_reruns_identically(tmp_path):
    from transformers import Dinov2Model

    for name in ("a", "b", "b"):   # the second "b" replaces the first
        assert bb.main(["--out", str(tmp_path / name), "--steps", "2", "--batch-size", "4", "--seed", "7"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]   # no temp / old folders left behind
    for f in ("model.safetensors", bb.DECODER_FILE):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    model = Dinov2Model.from_pretrained(str(tmp_path / "a"), local_files_only=True)
    assert model.config.hidden_size == bb.backbone_config().hidden_size
    record = json.loads((tmp_path / "a" / "training.json").read_text())
    assert record["command"] == (f"senseflow toy train-backbone --out {tmp_path / 'a'} --steps 2 --batch-size 4 "
                                 f"--lr 0.0015 --seed 7")
    assert record["seed"] == 7 and record["steps"] == 2 and record["final_loss"] > 0 and record["seconds"] >= 0


def test_a_tiny_training_run_lowers_the_loss_and_is_deterministic():
    arch = dict(hidden_size=32, num_layers=2, num_heads=2)
    runs = [bb.train_backbone(60, seed=5, batch_size=16, lr=3e-3, warmup=1, progress=False, **arch) for _ in range(2)]
    (a, da, _), (b, db, _) = runs
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert all(torch.equal(x, y) for x, y in zip(da.state_dict().values(), db.state_dict().values()))
    model, decoder, info = runs[0]
    init = bb.create_backbone(5, **arch)
    before = bb.heldout_loss(init, bb.create_decoder(init.config, 5), FRESH, n=64)
    after = bb.heldout_loss(model, decoder, FRESH, n=64)
    assert after < 0.5 * before, (before, after)
    assert info["final_loss"] < before


def test_mask_and_patch_helpers():
    g = torch.Generator().manual_seed(0)
    mask = bb.random_mask(5, 64, g)
    assert mask.shape == (5, 64) and (mask.sum(1) == 32).all()
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    p = bb.patchify(x, 4)
    assert p.shape == (2, 4, 48)
    assert torch.equal(p[1, 2].reshape(4, 4, 3).permute(2, 0, 1), x[1, :, 4:8, 0:4])   # token 2 = bottom-left
    images = -torch.ones(1, 3, 8, 8)
    images[0, :, 0:2, 5:7] = 0.5    # content in token 1 only
    assert bb.patch_weights(images, 4).tolist() == [[bb.BACKGROUND_WEIGHT, 1.0, bb.BACKGROUND_WEIGHT,
                                                     bb.BACKGROUND_WEIGHT]]


# -------------------------------------------------------------------------------------------------
# built-in names
# -------------------------------------------------------------------------------------------------
def test_toy_clip_builtin_is_the_shipped_teacher_text_encoder():
    from transformers import CLIPTextModelWithProjection

    folder = resolve_builtin("clip_path", "builtin:toy-clip")
    assert folder == str(TEACHER_ASSET / "text_encoder")
    assert find_tokenizer_folder(folder) == TEACHER_ASSET / "tokenizer"
    clip, tokenizer = load_clip_text(folder)
    ref = CLIPTextModelWithProjection.from_pretrained(str(TEACHER_ASSET / "text_encoder"), local_files_only=True)
    assert all(torch.equal(a, b) for a, b in zip(clip.state_dict().values(), ref.state_dict().values()))
    assert tokenizer(["a red circle"]).input_ids[0]
    assert resolve_builtin("clip_path", "/some/folder") == "/some/folder"


@pytest.mark.parametrize("key,value,available", [
    ("dinov2_path", "builtin:nope", "builtin:toy-dinov2"),
    ("dinov2_path", "builtin:toy-clip", "builtin:toy-dinov2"),   # names are per key
    ("clip_path", "builtin:toy-dinov2", "builtin:toy-clip"),
])
def test_unknown_builtin_fails_with_one_line(key, value, available):
    data = {"dinov2_path": "builtin:toy-dinov2", "clip_path": "builtin:toy-clip", key: value}
    cfg = parse_vfm_config(data)
    with pytest.raises(SenseflowError) as e:
        cfg.check_paths()
    msg = one_line(e)
    assert f"discriminator.{key}" in msg and value in msg and f"available: {available}" in msg


# -------------------------------------------------------------------------------------------------
# the toy VFM recipe
# -------------------------------------------------------------------------------------------------
def test_toy_vfm_recipe_trains_the_heads_and_leaves_the_backbones_alone(tmp_path):
    from senseflow.api import build_trainer
    from senseflow.config import load_config
    from senseflow.toy.demo import RECIPES
    from senseflow.train.trainer import TrainerHooks

    config = load_config(RECIPES / "senseflow_vfm.yaml", [
        "train.steps=2", "train.batch_size=4", "train.num_samples=2", "train.progress=false",
        "train.tensorboard=false", "train.device=cpu", "train.log_every=1", f"paths.output={tmp_path / 'run'}"])
    assert config.method.adversarial_weight > 0 and config.discriminator.dinov2_path == "builtin:toy-dinov2"
    seen: list[dict[str, float]] = []
    trainer = build_trainer(config, resume="never",
                            hooks=TrainerHooks(on_log=[lambda t, step: seen.append(dict(t.last_logs))]))
    d = trainer.method.models.discriminator
    assert d is not None and d.layers == list(range(7))
    heads = {k: v.clone() for k, v in d.heads.state_dict().items()}
    frozen = [p.clone() for p in list(d.dinov2.parameters()) + list(d.clip_text.parameters())]
    shipped = load_dinov2(bb.BACKBONE_ASSET)
    trainer.fit()
    assert any(not torch.equal(v, heads[k]) for k, v in d.heads.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(frozen, list(d.dinov2.parameters()) + list(d.clip_text.parameters())))
    assert all(torch.equal(a, b) for a, b in zip(d.dinov2.state_dict().values(), shipped.state_dict().values()))
    assert {"loss_d", "d_accuracy", "d_real", "d_fake"} <= set(seen[0]) and "loss_adv_g" in seen[0]
    assert all(torch.isfinite(torch.tensor(v)) for logs in seen for v in logs.values())
