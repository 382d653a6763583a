"""Small distillation setups on the generic adapter (pure PyTorch, fast on CPU)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from senseflow.generator import FewStepGenerator
from senseflow.methods import DistillationModels
from senseflow.schedules import RectifiedFlow, anchors
from senseflow.teachers.base import Denoiser, freeze
from senseflow.teachers.custom import CallableAdapter, HashedWordEncoder, tiny_example

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a small white cross"]


def tiny_models(resolution: int = 8, unit_anchors=(1.0, 0.75, 0.5, 0.25), seed: int = 0,
                shift: float = 1.0) -> DistillationModels:
    adapter, backbone = tiny_example(resolution=resolution, seed=seed, shift=shift)
    teacher = Denoiser(freeze(backbone), adapter)
    generator = FewStepGenerator(Denoiser(adapter.make_student(backbone).requires_grad_(True).train(), adapter),
                                 anchors(adapter.schedule, unit_anchors))
    fake = Denoiser(adapter.make_fake_score(backbone).requires_grad_(True).train(), adapter)
    return DistillationModels(teacher=teacher, generator=generator, fake_score=fake)


class LinearVelocity(nn.Module):
    """``v(x, t) = a * x``: a backbone whose Euler steps can be computed by hand."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a)))

    def forward(self, x: Tensor, t: Tensor, text: Tensor) -> Tensor:
        return self.a * x


def linear_models(a_teacher: float, a_student: float, unit_anchors=(1.0, 0.75, 0.5, 0.25)) -> DistillationModels:
    adapter = CallableAdapter(RectifiedFlow(), (1, 2, 2), prompt_encoder=HashedWordEncoder(dim=4))
    teacher = Denoiser(freeze(LinearVelocity(a_teacher)), adapter)
    gen = FewStepGenerator(Denoiser(LinearVelocity(a_student), adapter), anchors(adapter.schedule, unit_anchors))
    fake = Denoiser(LinearVelocity(a_teacher), adapter)
    return DistillationModels(teacher=teacher, generator=gen, fake_score=fake)
