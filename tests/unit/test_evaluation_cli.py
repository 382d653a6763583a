"""``senseflow evaluate`` from the command line: bad inputs are one line with nothing written; the toy world end to end."""

import json
from pathlib import Path

import pytest
import torch

from senseflow.cli import main

EXIT_USER_ERROR = 2


@pytest.fixture(scope="module")
def toy_student(tmp_path_factory) -> Path:
    """A 4-anchor student made from the shipped toy teacher's weights (no training: the runner is under test)."""
    from senseflow.export import export_student
    from senseflow.generator import FewStepGenerator
    from senseflow.schedules import anchors as unit_to_native
    from senseflow.teachers.base import Denoiser
    from senseflow.toy.teacher import load_toy_teacher

    run = tmp_path_factory.mktemp("toyrun")
    adapter, backbone = load_toy_teacher()
    gen = FewStepGenerator(Denoiser(backbone, adapter), unit_to_native(adapter.schedule, [1.0, 0.75, 0.5, 0.25]))
    export_student(gen, run / "student", {"family": "toy", "teacher": "builtin:toy", "resolution": 32,
                                          "sampler": "stochastic", "method": "none", "step": 0})
    return run


def one_line_error(capsys, argv, out: Path) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == EXIT_USER_ERROR, err
    assert err.startswith("senseflow: error: ") and "\n" not in err, err
    assert not out.exists(), "nothing may be written for bad input"
    return err


def test_bad_inputs_are_one_line_and_write_nothing(tmp_path, capsys, toy_student):
    out = tmp_path / "out"
    base = ["evaluate", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    toy = ["--prompts", "builtin:toy-world", "--num-prompts", "2"]
    err = one_line_error(capsys, base + ["--student", str(tmp_path / "nope")] + toy, out)
    assert "does not exist" in err and "student/" in err
    (tmp_path / "empty").mkdir()
    err = one_line_error(capsys, base + ["--pipeline", str(tmp_path / "empty")] + toy, out)
    assert "model_index.json" in err and "huggingface-cli download" in err
    err = one_line_error(capsys, base + ["--teacher", str(tmp_path / "empty")] + toy, out)
    assert "model_index.json" in err
    err = one_line_error(capsys, base + ["--student", str(toy_student), "--metrics", "nosuch"] + toy, out)
    assert "unknown metric 'nosuch'" in err and "toy" in err
    err = one_line_error(capsys, base + ["--student", str(toy_student), "--weights", f"toy={tmp_path / 'empty'}"]
                         + toy, out)
    assert "evaluator.safetensors" in err and "train_evaluator" in err
    err = one_line_error(capsys, base + ["--student", str(toy_student), "--preset", "senseflow-coco5k"], out)
    assert "--coco-annotations" in err and "cocodataset.org" in err
    err = one_line_error(capsys, base + ["--student", f"{toy_student},steps=9"] + toy, out)
    assert "steps must be in 1..4" in err
    err = one_line_error(capsys, base + ["--student", str(toy_student), "--prompts", str(tmp_path / "p.txt")], out)
    assert "not found" in err


def test_bad_coco_files_are_one_line(tmp_path, capsys, toy_student):
    out = tmp_path / "out"
    images = tmp_path / "val2017"
    images.mkdir()
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                                     "annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1]}]}))
    base = ["evaluate", "--out", str(out), "--student", str(toy_student), "--preset", "dmd2-coco10k",
            "--coco-images", str(images)]
    err = one_line_error(capsys, base + ["--coco-annotations", str(instances)], out)
    assert "captions" in err
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                                    "annotations": [{"image_id": 1, "id": 3, "caption": "a cat"}]}))
    err = one_line_error(capsys, base + ["--coco-annotations", str(captions)], out)
    assert "lacks 1 of the 1" in err and "a.png" in err
    err = one_line_error(capsys, base + ["--coco-annotations", str(tmp_path / "missing.json")], out)
    assert "captions_val2017.json" in err


@pytest.mark.slow
def test_toy_evaluate_end_to_end(tmp_path, capsys, toy_student):
    """The README command in miniature: shipped toy teacher + a toy student, scored by the toy evaluator."""
    from senseflow.evaluation.store import read_png
    from senseflow.evaluation.toy_metric import uint8_to_signed
    from senseflow.toy.evaluator import ToyEvaluator

    out = tmp_path / "eval"
    argv = ["evaluate", "--student", f"{toy_student},steps=2", "--prompts", "builtin:toy-world", "--num-prompts",
            "3", "--per-prompt", "2", "--teacher-steps", "4", "--out", str(out), "--cache-dir",
            str(tmp_path / "cache"), "--batch-size", "6", "--no-progress"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    label = f"{toy_student.name}-2step"
    assert set(res["sources"]) == {"teacher", label}
    student = res["sources"][label]["metrics"]
    # the numbers are the toy evaluator's on exactly the PNGs written (independent recomputation)
    prompts = [x["prompt"] for x in json.loads((out / "prompts.json").read_text())["items"]]
    imgs = torch.stack([read_png(out / f"images/{label}/{i:05d}.png") for i in range(6)])
    refs = torch.stack([read_png(out / f"images/teacher/{i:05d}.png") for i in range(6)])
    want = ToyEvaluator.load().evaluate(uint8_to_signed(imgs), prompts, reference_teacher=uint8_to_signed(refs))
    for key in ("attr_acc", "fd_real", "fd_teacher", "diversity"):
        assert student[key] == pytest.approx(want[key], rel=1e-6, abs=1e-6), key
    assert "fd_teacher" not in res["sources"]["teacher"]["metrics"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["weights_sha256"]["toy"].values())[0] == __import__("senseflow.evaluation.metrics.base",
                                                                             fromlist=["x"]).sha256_file(
        Path(list(manifest["weights_sha256"]["toy"])[0]))
    assert manifest["sources"]["teacher"]["steps"] == 4 and manifest["sources"][label]["steps"] == 2
    page = (out / "index.html").read_text()
    assert f"images/{label}/00000.png" in page and "images/teacher/00000.png" in page
    assert "| teacher | teacher | 4 |" in (out / "results.md").read_text()
    # re-running the same command resumes: nothing is sampled again, the numbers stay
    assert main(argv) == 0
    assert json.loads((out / "results.json").read_text())["sources"][label]["metrics"] == student
    capsys.readouterr()


def test_teacher_curve_on_the_toy_teacher(tmp_path, capsys):
    out = tmp_path / "curve"
    err = one_line_error(capsys, ["evaluate", "--teacher-curve", "--out", str(out), "--prompts", "builtin:toy-world"],
                         out)
    assert "--teacher" in err
    err = one_line_error(capsys, ["evaluate", "--teacher-curve", "--teacher", "builtin:toy", "--out", str(out),
                                  "--prompts", "builtin:toy-world", "--curve-points", "1"], out)
    assert "--curve-points must be >= 2" in err
    assert main(["evaluate", "--teacher-curve", "--teacher", "builtin:toy", "--prompts", "builtin:toy-world",
                 "--num-prompts", "2", "--teacher-steps", "2", "--curve-points", "3", "--out", str(out)]) == 0
    curve = json.loads((out / "curve.json").read_text())
    assert curve["t_unit"] == pytest.approx([1 / 6, 0.5, 5 / 6]) and curve["num_images"] == 2
    assert all(x >= 0 and x == x for x in curve["xi"])
    # the toy teacher denoises almost-clean inputs far better than almost-pure noise
    assert curve["xi"][0] < curve["xi"][-1]
    assert (out / "curve.png").stat().st_size > 1000
    capsys.readouterr()


def test_preset_on_local_coco_files_through_the_metric_registry(tmp_path, capsys, toy_student, monkeypatch):
    """dmd2-coco10k on a synthetic COCO: first captions, real images centre-cropped to 512, metric via the registry."""
    import sys
    import types

    import numpy as np
    from PIL import Image

    from senseflow.evaluation.coco import load_real_image
    from tests.helpers.eval_fakes import MeanMetric

    class RealStats(MeanMetric):
        name = "fid"
        requires = frozenset({"real"})

        def reset(self):
            super().reset()
            self.real = []

        def update_real(self, images):
            self.real.append(images)

        def compute(self):
            real = torch.cat(self.real)
            return {"num_real": float(real.shape[0]), "real_side": float(real.shape[-1]),
                    "real_mean": float(real.double().mean()), **super().compute()}

    built = {}

    def build_metric(name, weights, *, device, batch_size=32, **options):
        built[name] = (weights, options)
        return RealStats()

    monkeypatch.setitem(sys.modules, "senseflow.evaluation.metrics.registry",
                        types.SimpleNamespace(METRICS={"fid": "test"}, build_metric=build_metric))
    folder = tmp_path / "val2014"
    folder.mkdir()
    images, anns = [], []
    for k, iid in enumerate([9, 4, 6]):
        Image.fromarray(np.full((600, 700 + k, 3), 40 * k, np.uint8)).save(folder / f"{iid}.jpg", quality=95)
        images.append({"id": iid, "file_name": f"{iid}.jpg"})
        anns += [{"image_id": iid, "id": 50 - iid, "caption": f"a red circle {iid}"},
                 {"image_id": iid, "id": 90 + iid, "caption": "a blue square"}]
    ann = tmp_path / "captions_val2014.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns}))
    weights = tmp_path / "inception.pt"
    weights.write_bytes(b"x")
    out = tmp_path / "eval"
    assert main(["evaluate", "--preset", "dmd2-coco10k", "--student", f"{toy_student},steps=1", "--no-teacher",
                 "--coco-annotations", str(ann), "--coco-images", str(folder), "--num-prompts", "3", "--metrics", "fid",
                 "--weights", f"fid={weights}", "--out", str(out), "--cache-dir", str(tmp_path / "c"),
                 "--no-progress"]) == 0
    assert built == {"fid": (str(weights), {})}
    items = json.loads((out / "prompts.json").read_text())["items"]
    assert [x["prompt"] for x in items] == ["a red circle 4", "a red circle 6", "a red circle 9"]   # id order
    from senseflow.generate import image_seed
    assert [x["seed"] for x in items] == [image_seed(10, i) for i in range(3)]                     # DMD2's seed 10
    m = json.loads((out / "results.json").read_text())["sources"][f"{toy_student.name}-1step"]["metrics"]
    assert m["num_real"] == 3 and m["real_side"] == 512
    want = np.mean([load_real_image(folder / f"{i}.jpg", 512).double().mean().item() for i in (4, 6, 9)])
    assert m["real_mean"] == pytest.approx(want)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["protocol"]["name"] == "dmd2-coco10k" and manifest["protocol"]["comparable"] is False
    assert manifest["real_images"] == {"count": 3, "resize": 512, "rule": manifest["real_images"]["rule"]}
    capsys.readouterr()
