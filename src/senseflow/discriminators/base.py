"""The adversarial slot: a discriminator module with its two losses.

Methods call :meth:`AdversarialTerm.generator_loss` inside G's loss and
:meth:`AdversarialTerm.discriminator_loss` in the ``discriminator`` phase.  The trainer makes
only the current phase's parameters trainable, so G's adversarial gradient can never reach the
discriminator (the released SenseFlow code leaks it).  Frozen backbones inside a discriminator
keep ``requires_grad=False``; :meth:`trainable_parameters` lists what its optimiser owns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Iterator

import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from ..methods.base import Batch, LossOutput


def hinge_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """``mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))``."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_generator_loss(fake_logits: Tensor) -> Tensor:
    """Per-sample ``-mean(D(G))`` (mean over every logit of a sample)."""
    return -fake_logits.flatten(1).mean(dim=1)


class AdversarialTerm(nn.Module, ABC):
    """A discriminator and its losses, plugged into a method's adversarial slot."""

    @abstractmethod
    def generator_loss(self, x0: Tensor, batch: "Batch") -> Tensor:
        """Per-sample adversarial loss ``[B]`` for G's ``x0`` samples (gradient flows into ``x0``)."""

    @abstractmethod
    def discriminator_loss(self, x0_fake: Tensor, batch: "Batch") -> "LossOutput":
        """The discriminator's loss on real data (from ``batch``) vs detached ``x0_fake``."""

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)
