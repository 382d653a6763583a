"""The shipped toy evaluator: accurate on fresh images, sensitive to wrong prompts, sane metrics."""

from __future__ import annotations

import json
import math
import random
import sys

import pytest
import torch

from senseflow.toy.evaluator import ASSET_DIR, INFO_NAME, WEIGHTS_NAME, ToyEvaluator, scene_labels
from senseflow.toy.world import Scene, ShapeSpec, ToyWorld, evaluation_prompts, parse_caption, render_batch

FRESH_SEED = 424242  # neither the training stream (0) nor the held-out stream of the JSON


@pytest.fixture(scope="module")
def evaluator() -> ToyEvaluator:
    return ToyEvaluator.load()


@pytest.fixture(scope="module")
def fresh() -> tuple[torch.Tensor, list[str], list[Scene]]:
    return ToyWorld(seed=FRESH_SEED).batch(512, index=0)


def test_shipped_assets_are_small_safetensors_with_a_record():
    from safetensors import safe_open

    weights = ASSET_DIR / WEIGHTS_NAME
    assert weights.stat().st_size < 2 * 1024 * 1024
    with safe_open(str(weights), framework="pt") as f:
        assert len(list(f.keys())) > 0
    info = json.loads((ASSET_DIR / INFO_NAME).read_text())
    assert info["command"].startswith("python -m senseflow.toy.train_evaluator")
    assert {"seed", "steps", "eval_seed", "architecture", "heldout"} <= set(info)
    heads = info["heldout"]["heads"]
    for name in ("occupancy", "shape", "color", "size", "background"):
        assert heads[name] >= 0.99, name
    assert info["heldout"]["prompt_checks"]["attr_acc"] >= 0.99


def test_accuracy_on_fresh_images_is_at_least_99_percent(evaluator, fresh):
    images, captions, _ = fresh
    acc = evaluator.attribute_accuracy(images, captions)
    assert acc["attr_acc"] >= 0.99, acc
    for check in ("position", "shape", "color", "size", "background", "count"):
        assert acc[check] >= 0.98, (check, acc)
    assert acc["exact"] >= 0.95, acc


def test_raw_heads_match_the_labels(evaluator, fresh):
    images, _, scenes = fresh
    logits, labels = evaluator.predict(images[:128]), scene_labels(scenes[:128])
    assert (logits["shape"].argmax(-1) == labels["shape"]).float().mean() >= 0.99
    assert (logits["background"].argmax(-1) == labels["background"]).float().mean() >= 0.99


def test_mismatched_prompts_score_much_lower(evaluator, fresh):
    images, captions, _ = fresh
    shuffled = captions[1:] + captions[:1]
    good = evaluator.attribute_accuracy(images, captions)["attr_acc"]
    bad = evaluator.attribute_accuracy(images, shuffled)
    assert bad["attr_acc"] < good - 0.35, bad
    assert bad["exact"] < 0.05


@pytest.mark.parametrize("field, value", [("color", "green"), ("shape", "cross"), ("size", "large"),
                                          ("position", "bottom right")])
def test_single_wrong_attribute_is_caught(evaluator, field, value):
    true = ShapeSpec("circle", "red", "small", "top left")
    image = render_batch([Scene((true,), "white")], generator=random.Random(0))
    wrong = ShapeSpec(**{**true.__dict__, field: value})
    acc = evaluator.attribute_accuracy(image, [Scene((wrong,), "white").caption()])
    check = "position" if field == "position" else field
    assert acc[check] == 0.0 and acc["exact"] == 0.0
    assert evaluator.attribute_accuracy(image, [Scene((true,), "white")])["exact"] == 1.0


def test_open_prompts_are_judged_wherever_the_shapes_are(evaluator, fresh):
    images, _, scenes = fresh
    opened = [s.without_positions() for s in scenes[:256]]
    right = evaluator.attribute_accuracy(images[:256], opened)
    assert right["attr_acc"] >= 0.99 and right["exact"] >= 0.97, right
    # the shapes' order in an open prompt does not matter: each is matched to the cell that agrees
    swapped = [Scene(tuple(reversed(s.shapes)), s.background) for s in opened]
    assert evaluator.attribute_accuracy(images[:256], swapped)["attr_acc"] >= 0.99
    wrong = evaluator.attribute_accuracy(images[:256], [s.without_positions() for s in scenes[1:257]])
    assert wrong["attr_acc"] < right["attr_acc"] - 0.3, wrong


@pytest.mark.parametrize("field, value", [("color", "green"), ("shape", "cross"), ("size", "large")])
def test_open_prompt_catches_a_wrong_attribute_and_a_missing_shape(evaluator, field, value):
    true = ShapeSpec("circle", "red", "small", None)
    image = render_batch([Scene((true,), "white")], generator=random.Random(0))
    wrong = ShapeSpec(**{**true.__dict__, field: value})
    acc = evaluator.attribute_accuracy(image, [Scene((wrong,), "white").caption()])
    assert acc[field] == 0.0 and acc["position"] == 1.0 and acc["exact"] == 0.0
    two = Scene((true, ShapeSpec("square", "blue", "large", None)), "white")
    acc = evaluator.attribute_accuracy(image, [two])  # one shape drawn, two asked for
    assert acc["position"] == 0.5 and acc["count"] == 0.0


def test_frechet_distance_is_zero_on_itself_and_grows_with_distribution_shift(evaluator):
    prompts = evaluation_prompts(64) * 2
    real_a = evaluator.reference_images(prompts)
    real_b = render_batch([parse_caption(p) for p in prompts], generator=random.Random(1))
    same = evaluator.frechet_distance(real_a, real_a)
    resampled = evaluator.frechet_distance(real_a, real_b)
    noisy = evaluator.frechet_distance(real_a, (real_b + 0.3 * torch.randn(real_b.shape,
                                                generator=torch.Generator().manual_seed(0))).clamp(-1, 1))
    other_prompts = ToyWorld(seed=5).batch(128, 0)[0]
    shuffled_world = evaluator.frechet_distance(real_a, other_prompts)
    assert abs(same) < 1e-3 * resampled
    assert resampled < noisy and resampled < shuffled_world


def test_features_diversity_and_evaluate(evaluator):
    prompts = evaluation_prompts(16) * 4
    images = evaluator.reference_images(prompts)
    feats = evaluator.features(images)
    assert feats.shape == (64, evaluator.net.num_features)
    collapsed = images[:16].repeat(4, 1, 1, 1)  # every prompt gets one fixed image
    assert evaluator.diversity(images, prompts) > 0
    assert evaluator.diversity(collapsed, prompts) == pytest.approx(0.0, abs=1e-6)
    assert evaluator.diversity(collapsed, prompts, space="pixels") == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(evaluator.diversity(images[:16], prompts[:16]))  # no repeated prompt
    out = evaluator.evaluate(images, prompts, reference_teacher=images)
    assert {"attr_acc", "shape", "color", "size", "position", "background", "count", "exact",
            "fd_real", "fd_teacher", "diversity", "diversity_all", "pixel_diversity"} <= set(out)
    assert out["attr_acc"] >= 0.99 and out["fd_teacher"] == pytest.approx(0.0, abs=1e-3)
    assert out["pixel_diversity"] > 0


def test_torchmetrics_fid_does_not_pull_torchvision():
    import torchmetrics.image.fid  # noqa: F401

    assert "torchvision" not in sys.modules


def test_checks_per_image_add_up_to_attr_acc(evaluator, fresh):
    images, captions, _ = fresh
    good = captions[:64]
    wrong = good[1:] + good[:1]  # a different caption per image: most checks fail
    for prompts in (good, wrong):
        passed, made = evaluator.checks_per_image(images[:64], prompts)
        assert passed.shape == made.shape == (64,) and bool((passed <= made).all())
        expected = evaluator.attribute_accuracy(images[:64], prompts)["attr_acc"]
        assert float(passed.sum() / made.sum()) == pytest.approx(expected)
    # one shape: 4 checks + background + count; two shapes: 4 more
    assert {int(m) for m in made} == {6, 10}


def test_paired_gain_interval_over_prompts():
    from senseflow.toy.evaluator import paired_gain

    prompts = [f"p{k}" for k in range(32) for _ in range(4)]
    made = torch.full((128,), 6.0)
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 7, (128,), generator=g).double()
    same = paired_gain((base, made), (base, made), prompts)
    assert same["gain"] == 0.0 and same["ci95"] == [0.0, 0.0] and same["num_prompts"] == 32
    # a is better by one check on every image except on a few prompts: the interval excludes 0
    better = (base + 1).clamp(max=6)
    better[:8] = base[:8]
    r = paired_gain((better, made), (base, made), prompts)
    assert r["gain"] > 0 and 0 < r["ci95"][0] <= r["gain"] <= r["ci95"][1]
    # a gain carried by 2 of 32 prompts: positive, but its interval reaches 0
    lucky = base.clone()
    lucky[:8] = 6.0
    r = paired_gain((lucky, made), (base, made), prompts)
    assert r["gain"] > 0 and r["ci95"][0] <= 0.0 + 1e-12
    with pytest.raises(ValueError, match="same prompts"):
        paired_gain((base, made), (base, made + 1), prompts)
