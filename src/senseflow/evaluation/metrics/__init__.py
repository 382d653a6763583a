"""Evaluation metrics, one module each; :mod:`.base` is the contract the evaluation runner relies on."""

from .base import Metric, MetricWeightsError, check_uint8_images, sha256_file

__all__ = ["Metric", "MetricWeightsError", "check_uint8_images", "sha256_file"]
