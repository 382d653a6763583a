"""The 2015-12-05 TF-Inception feature extractor that FID numbers in the literature are computed with.

Why the architecture is written here: the network behind every published FID (TensorFlow's
2015-12-05 Inception graph, as ported by pytorch-fid and shipped as TorchScript by NVIDIA for
StyleGAN2-ADA / clean-fid / DMD2) lives in pytorch-fid on top of ``torchvision.models.inception``,
and torchvision cannot be imported next to senseflow's CPU torch (its wheel links CUDA; see
docs/evaluation_metrics.md).  So this module re-states that network in plain torch -- torchvision's
``Inception3`` with pytorch-fid's FID blocks (``FIDInceptionA/C/E_1/E_2``: average pools that do not
count padding, and a max pool in the last block, as in the TF graph) -- with the same parameter
names, so pytorch-fid's ``pt_inception-2015-12-05-*.pth`` loads key by key.

Two weight files are accepted (the user has one of them locally; nothing is downloaded):

* NVIDIA's TorchScript ``inception-2015-12-05.pt`` (clean-fid, DMD2, StyleGAN2-ADA): run as shipped
  through ``torch.jit.load``; its ``layers`` module takes 299x299 inputs scaled ``(x - 128) / 128``,
  exactly as clean-fid's ``InceptionV3W(resize_inside=False)``.
* pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (a plain state dict, loaded with
  ``weights_only=True``) into :class:`FIDInceptionV3`; inputs scaled ``2 * x / 255 - 1`` as pytorch-fid.

Both give the 2048-d pool3 features.  Resizing to 299 happens before, in :mod:`.resize`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import MetricWeightsError
from .weights import load_state_dict

INCEPTION_SOURCE = ("NVIDIA's TorchScript inception-2015-12-05.pt (the file clean-fid and DMD2 download from "
                    "nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/) or pytorch-fid's "
                    "pt_inception-2015-12-05-6726825d.pth (github.com/mseitzer/pytorch-fid/releases)")
FEATURE_DIM = 2048


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, as the TF graph) + ReLU."""

    def __init__(self, cin: int, cout: int, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_no_pad(x: Tensor) -> Tensor:
    # TF's average pool ignores padded positions; torchvision's counts them (pytorch-fid's fix)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_no_pad(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, cin: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_no_pad(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """pytorch-fid's ``FIDInceptionE_1`` (``max_pool=False``) and ``FIDInceptionE_2`` (``max_pool=True``)."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        # the TF graph's last block max-pools here (a bug in the original graph that FID inherited)
        pool = (F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_no_pad(x))
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """InceptionV3 as pytorch-fid's ``fid_inception_v3()`` (1008 classes, no aux head), returning pool3 features.

    Parameter names equal torchvision's ``Inception3`` so ``pt_inception-2015-12-05-*.pth`` loads as is;
    the 1008-way ``fc`` is kept only so that file loads strictly (FID never uses it).
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[N, 3, 299, 299]`` scaled to [-1, 1]; returns pool3 ``[N, 2048]``."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


class InceptionFeatures(nn.Module):
    """299x299 float images in [0, 255] -> 2048-d pool3 features, from either weight file.

    ``num_features`` lets torchmetrics' ``FrechetInceptionDistance(feature=...)`` use this module; for
    the TorchScript file it is read off one forward pass (2048 for NVIDIA's file).
    """

    def __init__(self, net: nn.Module, scripted: bool, path: Path) -> None:
        super().__init__()
        self.net = net
        self.scripted = scripted
        self.path = path
        self.num_features = FEATURE_DIM
        if scripted:
            with torch.no_grad():
                self.num_features = int(self.net.layers.forward(torch.zeros(1, 3, 299, 299)).numel())

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (299, 299):
            raise ValueError(f"Inception features need 299x299 inputs (resize first), got {tuple(x.shape)}")
        x = x.float()
        if self.scripted:  # clean-fid: InceptionV3W(resize_inside=False)
            return self.net.layers.forward((x - 128) / 128).reshape(x.shape[0], self.num_features)
        return self.net(x / 255 * 2 - 1)  # pytorch-fid: normalize_input


def load_inception(path: str | Path | None, device: torch.device | str = "cpu") -> InceptionFeatures:
    """Load the FID Inception from NVIDIA's TorchScript ``.pt`` or pytorch-fid's ``.pth`` state dict."""
    if path is None:
        raise MetricWeightsError(f"FID needs the Inception weights file: pass {INCEPTION_SOURCE}")
    path = Path(path)
    if path.is_dir():
        found = sorted([*path.glob("inception-2015-12-05*.pt"), *path.glob("pt_inception-2015-12-05*.pth")])
        if not found:
            raise MetricWeightsError(f"no inception-2015-12-05.pt or pt_inception-2015-12-05-*.pth in {path}: "
                                     f"expected {INCEPTION_SOURCE}")
        path = found[0]
    if not path.is_file():
        raise MetricWeightsError(f"Inception weights {path} not found: expected {INCEPTION_SOURCE}")
    if _is_torchscript(path):
        try:
            net = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as exc:  # noqa: BLE001 -- a corrupt archive has many exception types
            raise MetricWeightsError(f"{path} is not a loadable TorchScript file ({exc.__class__.__name__}): "
                                     f"expected {INCEPTION_SOURCE}") from None
        if not hasattr(net, "layers"):
            raise MetricWeightsError(f"{path} is TorchScript without the 'layers' module of NVIDIA's "
                                     f"inception-2015-12-05.pt: expected {INCEPTION_SOURCE}")
        return InceptionFeatures(net, True, path).to(device).eval()
    state = load_state_dict(path, what="Inception weights", source=INCEPTION_SOURCE)
    net = FIDInceptionV3()
    expected = net.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in expected if not k.endswith("num_batches_tracked") and k not in state]
    unexpected = [k for k in state if k not in expected]
    bad = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or bad:
        what = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                else f"wrong shape {bad[:3]}")
        raise MetricWeightsError(f"{path} is not the pt_inception-2015-12-05 state dict ({what}): "
                                 f"expected {INCEPTION_SOURCE}")
    net.load_state_dict(state, strict=False)
    return InceptionFeatures(net, False, path).to(device).eval()


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files holding ``code/`` (a plain ``torch.save`` zip has ``data.pkl`` only)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.startswith("code/") for name in archive.namelist())
