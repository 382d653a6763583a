"""FD-DINOv2 against a scipy Frechet distance on hand-extracted CLS features; AESv2 against its affine MLP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from senseflow.evaluation.metrics.base import MetricWeightsError
from senseflow.evaluation.metrics.registry import build_metric
from tests.helpers.eval_models import make_tiny_clip_folder
from tests.helpers.tiny_models import make_tiny_dinov2_folder

CPU = torch.device("cpu")


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)


def _scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    return make_tiny_dinov2_folder(tmp_path_factory.mktemp("dino") / "dinov2", hidden_size=8, num_layers=2,
                                   image_size=16)


def test_fd_dinov2_equals_a_scipy_frechet_distance_of_the_cls_tokens(dino_dir):
    from transformers import Dinov2Model

    real, fake = _images(40, 16, 0), _images(40, 16, 1) // 2
    metric = build_metric("fd_dinov2", str(dino_dir), device=CPU, batch_size=16, size=16)
    assert metric.requires == frozenset({"real"})
    metric.update_real(real)
    metric.update(fake, ["p"] * 40)
    model = Dinov2Model.from_pretrained(str(dino_dir)).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():  # 16 px images at size 16: the resize is an identity; CLS after the final LayerNorm
        feats = [model(pixel_values=(x.float() / 255 - mean) / std).last_hidden_state[:, 0].double().numpy()
                 for x in (real, fake)]
    expected = _scipy_frechet(feats[1], feats[0])
    assert expected > 0.01
    assert metric.compute()["fd_dinov2"] == pytest.approx(expected, rel=1e-3, abs=1e-4)


def test_fd_dinov2_against_reference_is_zero_for_the_teacher_itself(dino_dir):
    metric = build_metric("fd_dinov2", str(dino_dir), device=CPU, against="reference", size=16)
    assert metric.requires == frozenset({"reference"})
    teacher = _images(12, 32, 2)  # 32 px resized to 16
    metric.update(teacher, ["p"] * 12, reference=teacher)
    assert abs(metric.compute()["fd_dinov2_t"]) < 1e-3
    metric.reset()
    metric.update((teacher // 3).to(torch.uint8), ["p"] * 12, reference=teacher)
    assert metric.compute()["fd_dinov2_t"] > 0.01
    assert {p.name for p in metric.weight_files()} == {"config.json", "model.safetensors"}


def test_fd_dinov2_wrong_folder_is_one_line(tmp_path):
    clip = make_tiny_clip_folder(tmp_path / "clip")
    for folder, message in ((clip, "model_type 'clip'"), (tmp_path / "none", "does not exist")):
        with pytest.raises(MetricWeightsError, match=message) as err:
            build_metric("fd_dinov2", str(folder), device=CPU)
        assert "\n" not in str(err.value) and "facebook/dinov2-large" in str(err.value)


def test_aesthetic_is_the_linear_mlp_of_the_normalised_clip_image_embedding(tmp_path):
    from transformers import CLIPModel

    folder = make_tiny_clip_folder(tmp_path / "clip_l14", projection_dim=16)
    torch.manual_seed(3)
    dims = [16, 1024, 128, 64, 16, 1]
    state = {}
    for idx, (i, o) in zip((0, 2, 4, 6, 7), zip(dims, dims[1:])):
        state[f"layers.{idx}.weight"] = torch.randn(o, i) * 0.05
        state[f"layers.{idx}.bias"] = torch.randn(o) * 0.05
    torch.save(state, folder / "sac+logos+ava1-l14-linearMSE.pth")
    images = _images(3, 32, 4)
    metric = build_metric("aesthetic", str(folder), device=CPU)
    metric.update(images, ["a", "b", "c"])
    model = CLIPModel.from_pretrained(str(folder)).eval()
    px = (images.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        e = model.visual_projection(model.vision_model(pixel_values=px).pooler_output)
        x = e / e.norm(dim=-1, keepdim=True)
        for idx in (0, 2, 4, 6, 7):  # no activations between the layers (commented out in the reference)
            x = x @ state[f"layers.{idx}.weight"].T + state[f"layers.{idx}.bias"]
    torch.testing.assert_close(metric.scores().float(), x[:, 0], rtol=1e-4, atol=1e-5)
    assert folder / "sac+logos+ava1-l14-linearMSE.pth" in metric.weight_files()
    del state["layers.7.bias"]
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(MetricWeightsError, match="lacks the MLP weights layers.7.bias"):
        build_metric("aesthetic", str(folder), device=CPU, mlp=str(tmp_path / "short.pth"))
    (folder / "sac+logos+ava1-l14-linearMSE.pth").unlink()
    with pytest.raises(MetricWeightsError, match="no sac\\+logos"):
        build_metric("aesthetic", str(folder), device=CPU)
