"""A ground-truth world: class-conditional Gaussian mixtures with the exact rectified-flow posterior.

``mixture`` (the distribution and its exact posterior), ``teacher`` (exact and MLP backbones behind
the custom-model contract), ``metrics`` (exact quality against the mixture), ``run`` (distillation
with the real methods and Trainer), ``bench`` (``senseflow toy gmm``).  See docs/ground_truth.md.
"""

from .metrics import evaluate
from .mixture import GaussianMixture
from .teacher import ExactVelocity, GMMAdapter, VelocityMLP, fit_mlp_teacher

__all__ = ["GaussianMixture", "ExactVelocity", "GMMAdapter", "VelocityMLP", "fit_mlp_teacher", "evaluate"]
