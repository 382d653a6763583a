"""Metric modules: Frechet maths, the FID Inception port's layout, resize protocol, registry, weight checks."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from senseflow.evaluation.metrics.base import MetricWeightsError
from senseflow.evaluation.metrics.frechet import FrechetDistance
from senseflow.evaluation.metrics.registry import METRICS, build_metric, metric_class, metric_requires
from senseflow.teachers.base import SenseflowError


class Identity(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x):
        return x


# ---------------------------------------------------------------- Frechet distance

def test_frechet_of_a_set_against_itself_is_zero_and_a_shift_adds_its_squared_norm():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=gen, dtype=torch.float64).float()
    fd = FrechetDistance(Identity(8))
    fd.update(x, real=True)
    fd.update(x, real=False)
    assert abs(fd.compute()) < 1e-3
    distances = []
    for step in (0.5, 1.0, 2.0):
        shift = torch.full((8,), step)
        fd.reset()
        fd.update(x, real=True)
        fd.update(x + shift, real=False)
        distances.append(fd.compute())
        # same covariance, means apart by `shift`: d^2 = ||shift||^2 = 8 step^2
        assert distances[-1] == pytest.approx(8 * step ** 2, rel=1e-3, abs=1e-3)
    assert distances == sorted(distances)


def test_frechet_of_scaled_gaussians_matches_closed_form():
    # N(0, I) vs N(0, s^2 I) in d dims: d^2 = d (1 - s)^2 (Dowson & Landau); sample estimate within a few %
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20000, 4, generator=gen)
    y = torch.randn(20000, 4, generator=gen) * 2.0
    fd = FrechetDistance(Identity(4))
    fd.update(x, real=True)
    fd.update(y, real=False)
    assert fd.compute() == pytest.approx(4.0, rel=0.05)


def test_frechet_with_too_few_images_is_one_line():
    fd = FrechetDistance(Identity(3))
    fd.update(torch.zeros(1, 3), real=True)
    fd.update(torch.zeros(5, 3), real=False)
    with pytest.raises(ValueError, match="at least 2 images"):
        fd.compute()


# ---------------------------------------------------------------- FID / FID-T through the registry

class _Layers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 16, 4, stride=4)  # 16 features keep the Frechet eigen-solve instant

    def forward(self, x):
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 4))


class _ScriptedInception(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = _Layers()

    def forward(self, x, return_features: bool = False):
        return self.layers(x)


@pytest.fixture(scope="module")
def inception_pt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(_ScriptedInception().eval()), str(path))
    return path


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)


def test_fid_t_of_the_teacher_against_itself_is_zero_and_grows_with_a_shift(inception_pt):
    metric = build_metric("fid_t", str(inception_pt), device=torch.device("cpu"), batch_size=3)
    assert metric.requires == frozenset({"reference"})
    teacher = _images(6, 320, 0)
    metric.update(teacher, ["p"] * 6, reference=teacher)
    same = metric.compute()
    assert set(same) == {"fid_t", "patch_fid_t"}
    assert abs(same["fid_t"]) < 1e-2 and abs(same["patch_fid_t"]) < 1e-2
    values = []
    for shift in (20, 60):
        metric.reset()
        student = (teacher.int() + shift).clamp(0, 255).to(torch.uint8)
        metric.update(student, ["p"] * 6, reference=teacher)
        values.append(metric.compute())
    assert 0 < values[0]["fid_t"] < values[1]["fid_t"]
    assert 0 < values[0]["patch_fid_t"] < values[1]["patch_fid_t"]
    assert metric.weight_files() == [inception_pt]


def test_fid_against_real_images_uses_update_real(inception_pt):
    metric = build_metric("fid", str(inception_pt), device=torch.device("cpu"), patch=True)
    assert metric.requires == frozenset({"real"})
    real = _images(5, 300, 1)
    metric.update_real(real)
    metric.update(real, ["p"] * 5)
    out = metric.compute()
    assert set(out) == {"fid", "patch_fid"} and abs(out["fid"]) < 1e-2
    with pytest.raises(ValueError, match="uint8"):
        metric.update(real.float(), ["p"] * 5)
    with pytest.raises(SenseflowError, match="at least 299x299 px, got 256x256; pass patch=False"):
        metric.update(_images(2, 256, 3), ["p"] * 2)


def test_registry_names_and_unknown_names():
    assert set(METRICS) == {"fid", "fid_t", "clip_score", "pickscore", "hps", "image_reward", "aesthetic",
                            "fd_dinov2", "compositional"}
    with pytest.raises(SenseflowError, match="known metrics: fid, fid_t") as err:
        build_metric("fidd", None, device=torch.device("cpu"))
    assert "\n" not in str(err.value)
    with pytest.raises(SenseflowError, match="no option colour"):
        build_metric("fid_t", None, device=torch.device("cpu"), colour=True)
    assert metric_class("fid").requires == frozenset({"real"})
    assert metric_requires("fid_t") == frozenset({"reference"})
    assert metric_requires("fd_dinov2") == frozenset({"real"})
    assert metric_requires("fd_dinov2", against="reference") == frozenset({"reference"})
    assert metric_requires("clip_score", prefix="A photo depicts ") == frozenset()


@pytest.mark.parametrize("name", sorted(METRICS))
def test_every_metric_refuses_missing_weights_in_one_line(name, tmp_path):
    for weights, message in ((None, "no weights given|weights file"), (str(tmp_path / "missing"), "not exist|not found")):
        with pytest.raises(MetricWeightsError, match=message) as err:
            build_metric(name, weights, device=torch.device("cpu"))
        text = str(err.value)
        assert "\n" not in text and ("huggingface.co" in text or "inception-2015-12-05" in text), text


def test_a_folder_of_the_wrong_kind_is_one_line(tmp_path):
    from tests.helpers.eval_models import make_tiny_clip_folder

    clip = make_tiny_clip_folder(tmp_path / "clip")
    with pytest.raises(MetricWeightsError, match="model_type 'clip', expected blip") as err:
        build_metric("image_reward", str(clip), device=torch.device("cpu"))
    assert "convert-weights image-reward" in str(err.value)
    with pytest.raises(MetricWeightsError, match="no inception-2015-12-05.pt") as err:
        build_metric("fid_t", str(clip), device=torch.device("cpu"))
    assert "\n" not in str(err.value)
