"""senseflow evaluate's runner: resume after a kill, teacher-cache hits, index order, manifest hashes, reports."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from senseflow.evaluation.backends import MetricSpec
from senseflow.evaluation.promptset import expand
from senseflow.evaluation.runner import EvalPlan, evaluate
from senseflow.generate import image_seed
from tests.helpers.eval_fakes import MeanMetric, OrderMetric, SeedSource, seed_image

PROMPTS = [f"prompt {i}" for i in range(7)]


def plan_for(out: Path, sources, teacher=None, metrics=None, cache=None, batch_size=2, **kw) -> EvalPlan:
    metrics = metrics if metrics is not None else {"mean": MeanMetric(), "order": OrderMetric()}
    return EvalPlan(out=out, prompts=expand(PROMPTS, base_seed=5, per_prompt=1, source="test"), sources=sources,
                    teacher=teacher, metrics=[MetricSpec(n) for n in metrics], prebuilt=metrics,
                    cache_dir=cache or out / "cache", batch_size=batch_size, metric_batch_size=3, device="cpu",
                    progress=False, command=["senseflow", "evaluate", "test"], **kw)


def expected_numbers(offset: int = 0, ref_offset: int | None = None) -> dict[str, float]:
    """Hand computation straight from the seed rule, independent of the runner."""
    images = [seed_image(image_seed(5, i), offset=offset).astype(np.float64) for i in range(len(PROMPTS))]
    out = {"mean": float(np.mean([im.mean() for im in images])),
           "order": float(sum(k * im.mean() for k, im in enumerate(images)))}
    if ref_offset is not None:
        refs = [seed_image(image_seed(5, i), offset=ref_offset).astype(np.float64) for i in range(len(PROMPTS))]
        out["ref_gap"] = float(np.mean([np.abs(a - b).mean() for a, b in zip(images, refs)]))
    return out


def test_scores_equal_hand_computation_in_index_order(tmp_path):
    res = evaluate(plan_for(tmp_path / "out", [SeedSource("s")], batch_size=3))
    got = res["sources"]["s"]["metrics"]
    want = expected_numbers()
    assert got["mean"] == pytest.approx(want["mean"], rel=1e-12)
    assert got["order"] == pytest.approx(want["order"], rel=1e-12)    # index order, whatever the batching


def test_killed_evaluation_resumes_and_gives_the_same_numbers(tmp_path):
    clean = evaluate(plan_for(tmp_path / "clean", [SeedSource("s")]))
    killed = SeedSource("s", fail_after=3)
    with pytest.raises(KeyboardInterrupt):
        evaluate(plan_for(tmp_path / "run", [killed]))
    done = sorted(p.name for p in (tmp_path / "run/images/s").glob("*.png"))
    assert done == ["00000.png", "00001.png"]       # the first batch of 2; the killed batch left nothing
    assert not (tmp_path / "run/results.json").exists()
    again = SeedSource("s")
    resumed = evaluate(plan_for(tmp_path / "run", [again]))
    assert again.rendered == len(PROMPTS) - 2                         # only the missing indices were made
    assert resumed["sources"]["s"]["metrics"] == clean["sources"]["s"]["metrics"]


def test_changed_settings_are_made_again(tmp_path):
    evaluate(plan_for(tmp_path / "out", [SeedSource("s", offset=0)]))
    other = SeedSource("s", offset=1)     # same label, other settings: the old images must not be reused
    res = evaluate(plan_for(tmp_path / "out", [other]))
    assert other.rendered == len(PROMPTS)
    assert res["sources"]["s"]["metrics"]["mean"] == pytest.approx(expected_numbers(offset=1)["mean"], rel=1e-12)


def test_teacher_cache_hit_does_not_call_the_sampler(tmp_path):
    cache = tmp_path / "shared-cache"
    first = SeedSource("teacher", offset=7, cached=True)
    a = evaluate(plan_for(tmp_path / "a", [SeedSource("s")], teacher=first, cache=cache))
    assert first.rendered == len(PROMPTS)
    second = SeedSource("teacher", offset=7, cached=True)
    b = evaluate(plan_for(tmp_path / "b", [SeedSource("s")], teacher=second, cache=cache))
    assert second.calls == 0 and second.loads == 0                    # a hit: never sampled, never loaded
    assert a["sources"]["s"]["metrics"] == b["sources"]["s"]["metrics"]
    assert b["sources"]["s"]["metrics"]["ref_gap"] == pytest.approx(
        expected_numbers(0, ref_offset=7)["ref_gap"], rel=1e-12)      # the reference really is the teacher's
    for i in range(len(PROMPTS)):
        assert (tmp_path / f"a/images/teacher/{i:05d}.png").read_bytes() == \
               (tmp_path / f"b/images/teacher/{i:05d}.png").read_bytes()
    other_steps = SeedSource("teacher", offset=7, cached=True, steps=8)    # another key: a miss
    evaluate(plan_for(tmp_path / "c", [SeedSource("s")], teacher=other_steps, cache=cache))
    assert other_steps.rendered == len(PROMPTS)


def test_manifest_holds_every_sha(tmp_path):
    w1, w2 = tmp_path / "w1.safetensors", tmp_path / "w2.bin"
    w1.write_bytes(b"weights one")
    w2.write_bytes(b"weights two" * 100)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    from senseflow.evaluation.promptset import from_source
    plan = plan_for(tmp_path / "out", [SeedSource("s")], metrics={"mean": MeanMetric([w1, w2])})
    plan.prompts = from_source(str(prompts_file), None, 5, 1)
    evaluate(plan)
    m = json.loads((tmp_path / "out/manifest.json").read_text())
    assert m["weights_sha256"]["mean"] == {str(w1): hashlib.sha256(b"weights one").hexdigest(),
                                           str(w2): hashlib.sha256(b"weights two" * 100).hexdigest()}
    assert m["prompts"]["file_sha256"] == hashlib.sha256(prompts_file.read_bytes()).hexdigest()
    assert m["prompts"]["list_sha256"] == hashlib.sha256(json.dumps(PROMPTS).encode()).hexdigest()
    assert m["seeds"]["values"] == [image_seed(5, i) for i in range(len(PROMPTS))]
    assert m["command"] == ["senseflow", "evaluate", "test"]
    assert m["resolution"] == {"s": 8}
    assert m["packages"]["torch"] and m["packages"]["diffusers"]


def test_reports_mark_the_best_value_per_column(tmp_path):
    res = evaluate(plan_for(tmp_path / "out", [SeedSource("a", offset=0), SeedSource("b", offset=3)]))
    md = (tmp_path / "out/results.md").read_text()
    better = max(("a", "b"), key=lambda x: res["sources"][x]["metrics"]["mean"])   # "mean" is higher-is-better
    row = next(line for line in md.splitlines() if line.startswith(f"| {better} |"))
    assert f"**{res['sources'][better]['metrics']['mean']:.2f}**" in row
    page = (tmp_path / "out/index.html").read_text()
    for label in ("a", "b"):
        assert f"images/{label}/00000.png" in page
    assert "prompt 0" in page


def test_compare_merges_evaluations_of_the_same_prompts(tmp_path):
    from senseflow.evaluation.compare import compare
    from senseflow.teachers.base import SenseflowError

    evaluate(plan_for(tmp_path / "one", [SeedSource("s", offset=0)]))
    evaluate(plan_for(tmp_path / "two", [SeedSource("s", offset=2)]))
    compare([str(tmp_path / "one"), str(tmp_path / "two")], str(tmp_path / "both"))
    merged = json.loads((tmp_path / "both/results.json").read_text())
    assert list(merged["sources"]) == ["s", "two/s"]
    other = plan_for(tmp_path / "three", [SeedSource("s")])
    other.prompts = expand(PROMPTS[:3], 5, 1, "test")
    evaluate(other)
    with pytest.raises(SenseflowError, match="different prompt lists"):
        compare([str(tmp_path / "one"), str(tmp_path / "three")], str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
