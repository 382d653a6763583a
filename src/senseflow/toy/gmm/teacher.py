"""Teachers of the Gaussian-mixture world, both behind the ordinary custom-model contract.

* :class:`ExactVelocity` -- a parameter-free backbone returning the exact rectified-flow velocity
  ``(x_t - E[x0 | x_t, class]) / t``: the perfect teacher, for measuring what distillation loses
  when the teacher is not the limit.
* :class:`VelocityMLP` -- a small network teacher, fitted to the exact posterior (regression on
  noise-free targets: it converges in seconds).  The generator and the fake score are copies of a
  backbone, as with a real model, so this is what they start from.

Both are called as ``backbone(x_t, t, label=class_weighting)`` by
:class:`~senseflow.teachers.custom.CallableAdapter` (velocity prediction); the prompt encoder maps
``"class 3"`` to a one-hot row and ``""`` to zeros (= the unconditional mixture, CFG's branch).
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...schedules import RectifiedFlow
from ...teachers.base import FeatureTap, SenseflowError
from ...teachers.custom import CallableAdapter
from .mixture import GaussianMixture

#: velocities are computed from x0 with t clamped here (the limit t -> 0 is finite but 0/0 numerically)
MIN_T = 1e-4


def class_prompt(label: int) -> str:
    return f"class {int(label)}"


class ClassPromptEncoder:
    """``"class k"`` -> one-hot row; ``""`` -> zeros (no class).  Anything else is a one-line error."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def __call__(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        out = torch.zeros(len(prompts), self.num_classes)
        for i, p in enumerate(prompts):
            p = p.strip()
            if not p:
                continue
            head, _, num = p.partition(" ")
            if head != "class" or not num.isdigit() or not 0 <= int(num) < self.num_classes:
                raise SenseflowError(f"gmm prompt {p!r}: expected 'class k' with k in 0..{self.num_classes - 1} or ''")
            out[i, int(num)] = 1.0
        return {"label": out}


class ExactVelocity(nn.Module):
    """The exact velocity field of a mixture; no parameters (the teacher contract only calls it)."""

    def __init__(self, mixture: GaussianMixture) -> None:
        super().__init__()
        self.mixture = mixture

    def forward(self, x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        x0 = self.mixture.posterior_mean(x, t, label).to(device=x.device, dtype=x.dtype)
        tt = t.to(x.dtype).clamp_min(MIN_T).reshape(-1, *([1] * (x.ndim - 1)))
        return (x - x0) / tt


class VelocityMLP(nn.Module):
    """``(x_t, t, label) -> velocity``: residual MLP with sinusoidal time features and FiLM.

    Time and class enter every block (scale and shift), so a copy used as a 1-step generator is
    still conditioned on the noise level it is asked about and on the class.
    """

    def __init__(self, dim: int, num_classes: int, width: int = 128, depth: int = 3, time_features: int = 16) -> None:
        super().__init__()
        self.dim, self.num_classes, self.width, self.depth = dim, num_classes, width, depth
        self.time_features = time_features
        self.inp = nn.Linear(dim, width)
        self.cond = nn.Sequential(nn.Linear(2 * time_features + num_classes, width), nn.SiLU(),
                                  nn.Linear(width, 2 * width * depth))
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(),
                                                  nn.Linear(width, width)) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)

    def forward(self, x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        freqs = torch.exp(torch.arange(self.time_features, device=x.device, dtype=x.dtype)
                          * (-math.log(1000.0) / self.time_features))
        ang = t.to(x.dtype)[:, None] * freqs[None] * 1000.0
        c = self.cond(torch.cat([ang.sin(), ang.cos(), label.to(x.dtype)], dim=1)).chunk(2 * self.depth, dim=1)
        h = self.inp(x)
        for i, block in enumerate(self.blocks):
            h = h + block(h) * (1 + c[2 * i]) + c[2 * i + 1]
        return self.out(torch.nn.functional.silu(self.norm_out(h)))


class GMMAdapter(CallableAdapter):
    """The custom adapter with one addition: the student and fake score may start from a backbone
    other than the teacher's (an exact, parameter-free teacher has nothing to copy)."""

    def __init__(self, mixture: GaussianMixture, student_init: nn.Module | None = None) -> None:
        super().__init__(RectifiedFlow(shift=1.0), (mixture.dim,),
                         prompt_encoder=ClassPromptEncoder(mixture.num_classes), output_norm="norm_out")
        self.mixture = mixture
        self.student_init = student_init

    def make_student(self, teacher_backbone: nn.Module) -> nn.Module:
        return copy.deepcopy(self.student_init if self.student_init is not None else teacher_backbone)

    def feature_tap(self, backbone: nn.Module, layer: str | None = None) -> FeatureTap | None:
        """DMD2's GAN head reads the MLP's middle residual block (``[B, width]`` vectors)."""
        if not isinstance(backbone, VelocityMLP):
            return None
        name = layer or f"blocks.{backbone.depth // 2}"
        return FeatureTap(name, backbone.width, (1, 1)) if name.startswith("blocks.") else None

    def make_fake_score(self, teacher_backbone: nn.Module) -> nn.Module:
        return copy.deepcopy(self.student_init if self.student_init is not None else teacher_backbone)


#: time laws of the backbone fit (``fit_mlp_teacher(time_law=...)``)
TIME_LAWS: tuple[str, ...] = ("logit_normal", "uniform", "mixed")


def fit_times(n: int, law: str, g: torch.Generator) -> Tensor:
    """Training times of the backbone fit, float64 ``[n]`` in ``[MIN_T, 1]``.

    * ``logit_normal`` -- sigmoid(N(0, 1)), SD3's law: only 1.4% of draws below t = 0.1, where the
      posterior mean turns from "nearest mode" into "this sample" (components are 0.05-0.15 wide);
    * ``uniform`` -- U(0, 1): ten times more mass below 0.1;
    * ``mixed`` -- half of each.
    """
    if law not in TIME_LAWS:
        raise SenseflowError(f"teacher time law {law!r}: choose from {', '.join(TIME_LAWS)}")
    ln = torch.sigmoid(torch.randn(n, generator=g, dtype=torch.float64))
    if law == "logit_normal":
        t = ln
    else:
        u = torch.rand(n, generator=g, dtype=torch.float64)
        t = u if law == "uniform" else torch.where(torch.arange(n) % 2 == 0, ln, u)
    return t.clamp(MIN_T, 1.0)


def fit_mlp_teacher(mixture: GaussianMixture, width: int = 128, depth: int = 3, steps: int = 2000,
                    batch_size: int = 512, lr: float = 1e-3, seed: int = 0, progress: bool = True,
                    time_law: str = "logit_normal") -> VelocityMLP:
    """Fit a :class:`VelocityMLP` to the exact velocity (MSE, times from ``time_law`` (:func:`fit_times`),
    cosine-decayed lr).  Regression on exact targets is flow matching without its label noise."""
    if steps < 1:
        raise SenseflowError("teacher steps must be >= 1")
    if time_law not in TIME_LAWS:
        raise SenseflowError(f"teacher time law {time_law!r}: choose from {', '.join(TIME_LAWS)}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = VelocityMLP(mixture.dim, mixture.num_classes, width, depth)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    exact = ExactVelocity(mixture)
    for _ in tqdm(range(steps), desc="gmm teacher", disable=not progress, dynamic_ncols=True):
        labels = mixture.sample_labels(batch_size, g)
        x0 = mixture.sample(labels, g)
        t = fit_times(batch_size, time_law, g)
        # a tenth of the batch at the anchor t = 1 exactly: the 1-step generator is evaluated there
        t[: batch_size // 10] = 1.0
        eps = torch.randn(batch_size, mixture.dim, generator=g, dtype=torch.float64)
        x_t = (1 - t)[:, None] * x0 + t[:, None] * eps
        onehot = mixture.class_weights(labels)
        drop = torch.rand(batch_size, generator=g) < 0.1  # 10% unconditional: CFG works on this teacher
        onehot[drop] = 0.0
        with torch.no_grad():
            target = exact(x_t, t, onehot).float()
        pred = net(x_t.float(), t.float(), onehot.float())
        loss = (pred - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
    return net.eval()
