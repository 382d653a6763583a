"""The compositional check: GenEval's judging rules on hand-made detections, its prompt templates, OWLv2 plumbing."""

from __future__ import annotations

import json

import pytest
import torch

from senseflow.evaluation.metrics.base import MetricWeightsError
from senseflow.evaluation.metrics.compositional import (Detection, judge, nms, parse_prompt, relative_position)
from senseflow.evaluation.metrics.registry import build_metric
from tests.helpers.eval_models import make_tiny_clip_folder, make_tiny_owlv2_folder

CPU = torch.device("cpu")


def box(x0, y0, x1, y1, score=0.9):
    return Detection(score, (x0, y0, x1, y1))


def test_prompt_templates_become_geneval_requirements():
    assert parse_prompt("a photo of a bench") == {"tag": "single_object", "include": [{"class": "bench", "count": 1}]}
    assert parse_prompt("a photo of a cow and a handbag")["include"] == [{"class": "cow", "count": 1},
                                                                         {"class": "handbag", "count": 1}]
    assert parse_prompt("a photo of three benches") == {
        "tag": "counting", "include": [{"class": "bench", "count": 3}], "exclude": [{"class": "bench", "count": 4}]}
    assert parse_prompt("a photo of four wine glasses")["include"] == [{"class": "wine glass", "count": 4}]
    assert parse_prompt("a photo of a pink car") == {"tag": "colors",
                                                     "include": [{"class": "car", "count": 1, "color": "pink"}]}
    assert parse_prompt("a photo of a dog right of a teddy bear") == {
        "tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                       {"class": "dog", "count": 1, "position": ["right of", 0]}]}
    assert parse_prompt("a photo of a brown giraffe and a white stop sign")["include"] == [
        {"class": "giraffe", "count": 1, "color": "brown"}, {"class": "stop sign", "count": 1, "color": "white"}]
    assert parse_prompt("an astronaut riding a horse") is None


def test_relative_position_follows_geneval_margins():
    left, right = box(0, 40, 20, 60), box(80, 40, 100, 60)
    assert relative_position(left, right) == {"left of"}
    assert relative_position(right, left) == {"right of"}
    assert relative_position(box(40, 0, 60, 20), box(40, 80, 60, 100)) == {"above"}  # image y grows downwards
    # centres 10 px apart, widths 20 + 20: the 0.1 x 40 = 4 px margin leaves 6 px -> still "left of"
    assert relative_position(box(0, 0, 20, 20), box(10, 0, 30, 20)) == {"left of"}
    # 3 px apart: inside the margin, no relation at all
    assert relative_position(box(0, 0, 20, 20), box(3, 0, 23, 20)) == set()
    # diagonal at 45 degrees: dx = dy = 0.707 > 0.5, both relations
    assert relative_position(box(50, 50, 60, 60), box(0, 0, 10, 10)) == {"right of", "below"}


def test_judge_counts_exactly_checks_colour_and_position_of_the_top_objects():
    never = lambda cls, d: pytest.fail("no colour asked")  # noqa: E731
    spec = parse_prompt("a photo of two dogs")
    assert judge(spec, {"dog": [box(0, 0, 10, 10), box(50, 0, 60, 10)]}, never)
    assert not judge(spec, {"dog": [box(0, 0, 10, 10)]}, never)
    assert not judge(spec, {"dog": [box(0, 0, 10, 10)] * 3}, never)  # the exclusion of count + 1
    colours = {(0, 0, 10, 10): "red", (50, 0, 60, 10): "blue"}
    of = lambda cls, d: colours[d.box]  # noqa: E731
    spec = parse_prompt("a photo of a red car and a blue bench")
    assert judge(spec, {"car": [box(0, 0, 10, 10)], "bench": [box(50, 0, 60, 10)]}, of)
    assert not judge(spec, {"car": [box(50, 0, 60, 10)], "bench": [box(0, 0, 10, 10)]}, of)
    # only the most confident car is judged: a second, blue, car does not matter
    assert judge(parse_prompt("a photo of a red car"), {"car": [box(0, 0, 10, 10), box(50, 0, 60, 10, 0.5)]}, of)
    spec = parse_prompt("a photo of a dog right of a cat")
    assert judge(spec, {"cat": [box(0, 0, 10, 10)], "dog": [box(50, 0, 60, 10)]}, never)
    assert not judge(spec, {"cat": [box(50, 0, 60, 10)], "dog": [box(0, 0, 10, 10)]}, never)
    assert not judge(spec, {"dog": [box(50, 0, 60, 10)]}, never)  # no target: not matched


def test_nms_keeps_the_best_of_overlapping_boxes():
    dets = [box(0, 0, 10, 10, 0.5), box(1, 0, 11, 10, 0.9), box(50, 50, 60, 60, 0.4)]
    kept = nms(dets, 0.5)  # IoU of the first two = 90 / 110 = 0.82
    assert [d.score for d in kept] == [0.9, 0.4]
    assert len(nms(dets, 0.9)) == 3


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("comp")
    return make_tiny_owlv2_folder(root / "owlv2"), make_tiny_clip_folder(root / "clip")


def test_owlv2_detections_are_every_patch_box_in_pixels(folders):
    from transformers import Owlv2ForObjectDetection

    owl, clip = folders
    metric = build_metric("compositional", str(owl), device=CPU, clip=str(clip), nms_iou=1.0, max_objects=1000)
    image = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8)
    dets = metric.detect(image, ["cat", "dog"], threshold=-1.0)
    assert len(dets["cat"]) == len(dets["dog"]) == (32 // 8) ** 2  # one box per patch, nothing suppressed
    model = Owlv2ForObjectDetection.from_pretrained(str(owl)).eval()
    padded = torch.full((3, 64, 64), 128, dtype=torch.uint8)
    padded[:, :48] = image
    from senseflow.evaluation.metrics.resize import pil_resize_uint8

    px = pil_resize_uint8(padded[None], 32).float() / 255
    px = (px - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    tok = metric.tokenizer(["a photo of a cat", "a photo of a dog"], padding="max_length", max_length=16,
                           return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=px)
    best = int(out.logits[0, :, 0].argmax())
    cx, cy, w, h = (out.pred_boxes[0, best] * 64).tolist()  # boxes are relative to the padded square
    assert dets["cat"][0].box == pytest.approx((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), abs=1e-3)
    assert dets["cat"][0].score == pytest.approx(float(torch.sigmoid(out.logits[0, best, 0])), abs=1e-5)
    assert metric.colour(image, "cat", dets["cat"][0]) in ("red", "orange", "yellow", "green", "blue", "purple",
                                                           "pink", "brown", "black", "white")


def test_scores_are_per_tag_means_then_their_mean(folders, tmp_path, monkeypatch):
    owl, clip = folders
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text("\n".join(json.dumps(m) for m in [
        {"prompt": "p1", "tag": "single_object", "include": [{"class": "cat", "count": 1}]},
        {"prompt": "p2", "tag": "single_object", "include": [{"class": "dog", "count": 1}]},
        {"prompt": "p3", "tag": "counting", "include": [{"class": "cat", "count": 2}],
         "exclude": [{"class": "cat", "count": 3}]}]) + "\n")
    metric = build_metric("compositional", str(owl), device=CPU, metadata=str(meta))
    planted = {"cat": [box(0, 0, 5, 5), box(10, 10, 15, 15)], "dog": []}
    monkeypatch.setattr(metric, "detect", lambda image, classes, threshold: {c: planted[c] for c in classes})
    metric.update(torch.zeros(3, 3, 16, 16, dtype=torch.uint8), ["p1", "p2", "p3"])
    out = metric.compute()
    # single_object: cat found, dog not -> 0.5; counting: exactly two cats -> 1.0; overall = mean of tags
    assert out == {"compositional": 0.75, "compositional_counting": 1.0, "compositional_single_object": 0.5}
    assert meta in metric.weight_files()
    assert [r["correct"] for r in metric.per_image()] == [True, False, True]
    assert metric.per_image()[2]["detected"] == {"cat": 2}


def test_compositional_weight_and_metadata_errors_are_one_line(folders, tmp_path):
    owl, clip = folders
    meta = tmp_path / "m.jsonl"
    meta.write_text(json.dumps({"prompt": "p", "tag": "colors", "include": [{"class": "car", "count": 1,
                                                                             "color": "red"}]}) + "\n")
    cases = [((str(clip),), {}, "model_type 'clip'"), ((str(owl),), {"metadata": str(meta)}, "pass clip="),
             ((str(owl),), {"metadata": str(tmp_path / "none.jsonl")}, "does not exist"),
             ((None,), {}, "no weights given")]
    for args, kwargs, message in cases:
        with pytest.raises(MetricWeightsError, match=message) as err:
            build_metric("compositional", *args, device=CPU, **kwargs)
        assert "\n" not in str(err.value)
