"""Discriminators and adversarial losses (the adversarial slot of DMD2 / SenseFlow)."""
from .base import AdversarialTerm, hinge_discriminator_loss, hinge_generator_loss

__all__ = ["AdversarialTerm", "hinge_discriminator_loss", "hinge_generator_loss"]
