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


def hinge_fake_loss(logits: Tensor) -> Tensor:
    """``mean(relu(1 + D(x)))``: the hinge for inputs D should call fake."""
    return F.relu(1.0 + logits).mean()


def hinge_discriminator_loss(real_logits: Tensor, fake_logits: Tensor, mismatch_logits: Tensor | None = None,
                             mismatch_share: float = 0.0) -> Tensor:
    """``mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))``.

    With ``mismatch_logits`` (D on real images paired with another prompt) GAN-CLS's matching-aware form: the
    mismatched pairs take the share w = ``mismatch_share`` of the fake side, ``(1 - w) * fake + w * mismatch``.
    A share, not an extra term: added on top, a D that cannot yet separate anything pays least at a constant
    logit of -1 and stalls there (docs/toy.md); as a share every constant in [-1, 1] costs the same.
    """
    real = F.relu(1.0 - real_logits).mean()
    if mismatch_logits is None:
        return real + hinge_fake_loss(fake_logits)
    w = mismatch_share
    return real + (1.0 - w) * hinge_fake_loss(fake_logits) + w * hinge_fake_loss(mismatch_logits)


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
