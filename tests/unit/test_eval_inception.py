"""The FID Inception port against the reference layout (torchvision Inception3 + pytorch-fid FID blocks)."""

from __future__ import annotations

import pickle
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from senseflow.evaluation.metrics.base import MetricWeightsError
from senseflow.evaluation.metrics.inception import FIDInceptionV3, load_inception
from senseflow.evaluation.metrics.resize import center_crop, clean_resize

# Branch names of torchvision's InceptionA..E (torchvision/models/inception.py), which pytorch-fid's
# FIDInceptionA/C/E_1/E_2 subclass without renaming: the state dict of pt_inception-2015-12-05-*.pth.
A = ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3", "branch_pool"]
B = ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]
C = ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1", "branch7x7dbl_2", "branch7x7dbl_3",
     "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"]
D = ["branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"]
E = ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
     "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"]
BLOCKS = {"Mixed_5b": A, "Mixed_5c": A, "Mixed_5d": A, "Mixed_6a": B, "Mixed_6b": C, "Mixed_6c": C, "Mixed_6d": C,
          "Mixed_6e": C, "Mixed_7a": D, "Mixed_7b": E, "Mixed_7c": E}
STEM = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]


def reference_keys() -> set[str]:
    convs = STEM + [f"{block}.{branch}" for block, branches in BLOCKS.items() for branch in branches]
    keys = {f"{c}.{p}" for c in convs for p in ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean",
                                                 "bn.running_var")}
    return keys | {"fc.weight", "fc.bias"}


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = FIDInceptionV3().eval()
    with torch.no_grad():  # non-trivial BN statistics so a mis-wired buffer would show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def test_port_has_exactly_the_pytorch_fid_state_dict_keys(net):
    keys = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
    assert keys == reference_keys()


def test_port_parameter_count_matches_torchvision_inception_v3(net):
    # torchvision inception_v3: 27,161,264 parameters; minus its aux head (conv0 768->128 1x1 + BN,
    # conv1 128->768 5x5 + BN, fc 768->1000) = 3,326,696; pytorch-fid's fc has 1008 classes (+8 x 2049)
    assert sum(p.numel() for p in net.parameters()) == 27_161_264 - 3_326_696 + 8 * 2049
    shapes = net.state_dict()
    assert tuple(shapes["Conv2d_1a_3x3.conv.weight"].shape) == (32, 3, 3, 3)
    assert tuple(shapes["Mixed_6b.branch7x7dbl_5.conv.weight"].shape) == (192, 128, 1, 7)
    assert tuple(shapes["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape) == (384, 384, 3, 1)
    assert tuple(shapes["Mixed_7b.branch_pool.conv.weight"].shape) == (192, 1280, 1, 1)
    assert tuple(shapes["fc.weight"].shape) == (1008, 2048)


@pytest.mark.slow
def test_port_feature_maps_and_pool3(net):
    maps = OrderedDict()
    hooks = [getattr(net, name).register_forward_hook(lambda m, i, o, n=name: maps.__setitem__(n, o))
             for name in ("Mixed_5d", "Mixed_6e", "Mixed_7c")]
    x = torch.rand(1, 3, 299, 299) * 2 - 1
    with torch.no_grad():
        feats = net(x)
    for h in hooks:
        h.remove()
    # InceptionV3 at 299 px: 35x35x288, 17x17x768, 8x8x2048; pool3 = spatial mean of Mixed_7c
    assert tuple(maps["Mixed_5d"].shape) == (1, 288, 35, 35)
    assert tuple(maps["Mixed_6e"].shape) == (1, 768, 17, 17)
    assert tuple(maps["Mixed_7c"].shape) == (1, 2048, 8, 8)
    assert tuple(feats.shape) == (1, 2048)
    torch.testing.assert_close(feats, maps["Mixed_7c"].mean(dim=(2, 3)))


def test_fid_blocks_pool_like_the_tf_graph():
    from senseflow.evaluation.metrics.inception import FIDInceptionA, FIDInceptionE

    # an all-ones input: TF's average pool (padding not counted) keeps 1 at the border, torchvision's gives 4/9
    block = FIDInceptionA(4, pool_features=1)
    seen = {}
    block.branch_pool.register_forward_hook(lambda m, i, o: seen.__setitem__("in", i[0]))
    block(torch.ones(1, 4, 5, 5))
    torch.testing.assert_close(seen["in"], torch.ones(1, 4, 5, 5))
    last = FIDInceptionE(4, max_pool=True)
    last.branch_pool.register_forward_hook(lambda m, i, o: seen.__setitem__("max", i[0]))
    x = torch.zeros(1, 4, 3, 3)
    x[..., 1, 1] = 1.0
    last(x)
    torch.testing.assert_close(seen["max"], torch.ones(1, 4, 3, 3))  # a 3x3 max pool spreads the centre


@pytest.mark.slow
def test_pth_state_dict_loads_key_by_key_and_scales_like_pytorch_fid(net, tmp_path):
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    feats = load_inception(path)
    loaded = feats.net.state_dict()
    for key, value in net.state_dict().items():
        assert torch.equal(loaded[key], value), key
    seen = {}

    class Recorder(nn.Module):
        def forward(self, x):
            seen["x"] = x
            return x.mean(dim=(2, 3))

    feats.net = Recorder()
    images = torch.randint(0, 256, (2, 3, 299, 299)).float()
    feats(images)
    torch.testing.assert_close(seen["x"], images / 255 * 2 - 1)  # pytorch-fid's normalize_input
    assert load_inception(tmp_path).path == path  # a folder holding the file works too


def test_incomplete_or_pickled_inception_is_one_line(net, tmp_path):
    state = net.state_dict()
    del state["Mixed_6c.branch7x7_2.conv.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(MetricWeightsError, match="missing") as err:
        load_inception(tmp_path / "broken.pth")
    assert "\n" not in str(err.value)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(MetricWeightsError, match="pickled code") as err:
        load_inception(tmp_path / "evil.pth")
    assert "\n" not in str(err.value)
    for bad in (tmp_path / "nope.pt", None, tmp_path / "empty"):
        if bad is not None and bad.name == "empty":
            bad.mkdir()
        with pytest.raises(MetricWeightsError, match="inception-2015-12-05") as err:
            load_inception(bad)
        assert "\n" not in str(err.value)


class _Layers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 2048, 1)

    def forward(self, x):
        return self.proj(F.adaptive_avg_pool2d(x, 1))


class _ScriptedInception(nn.Module):
    """The interface of NVIDIA's inception-2015-12-05.pt that clean-fid uses: ``.layers`` on (x - 128) / 128."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _Layers()

    def forward(self, x, return_features: bool = False):
        return self.layers(x)


def test_torchscript_inception_runs_its_layers_on_clean_fid_scaling(tmp_path):
    torch.manual_seed(0)
    module = _ScriptedInception().eval()
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    feats = load_inception(path)
    assert feats.scripted
    x = torch.randint(0, 256, (3, 3, 299, 299)).float()
    mean = ((x - 128) / 128).mean(dim=(2, 3))
    expected = mean @ module.layers.proj.weight[:, :, 0, 0].T + module.layers.proj.bias
    with torch.no_grad():
        torch.testing.assert_close(feats(x), expected, rtol=1e-4, atol=1e-4)


def test_clean_resize_is_antialiased_bicubic_without_quantisation():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 64, 80), generator=gen, dtype=torch.uint8)
    up = clean_resize(images, 299)
    assert up.dtype == torch.float32 and tuple(up.shape) == (2, 3, 299, 299)
    assert not torch.equal(up, up.round())  # float output, not re-quantised to uint8
    down = clean_resize(torch.randint(0, 256, (1, 3, 600, 600), generator=gen, dtype=torch.uint8), 299)
    # torch's antialiased bicubic is written to match PIL's filter (a = -0.5)
    big = torch.randint(0, 256, (1, 3, 600, 600), generator=gen, dtype=torch.uint8)
    ref = F.interpolate(big.float(), size=(299, 299), mode="bicubic", antialias=True).clamp(0, 255)
    assert (clean_resize(big, 299) - ref).abs().mean() < 0.5
    assert down.min() >= 0 and down.max() <= 255
    assert torch.equal(clean_resize(torch.full((1, 3, 40, 40), 77, dtype=torch.uint8), 299),
                       torch.full((1, 3, 299, 299), 77.0))


def test_center_crop_takes_the_middle_299_patch():
    images = torch.arange(2 * 3 * 400 * 500).reshape(2, 3, 400, 500) % 251
    crop = center_crop(images.to(torch.uint8), 299)
    top, left = round((400 - 299) / 2), round((500 - 299) / 2)
    assert torch.equal(crop, images[..., top:top + 299, left:left + 299].to(torch.uint8))
    with pytest.raises(ValueError, match="at least"):
        center_crop(torch.zeros(1, 3, 256, 256, dtype=torch.uint8), 299)
