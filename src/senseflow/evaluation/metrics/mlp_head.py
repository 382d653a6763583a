"""The linear MLP head of improved-aesthetic-predictor, reused verbatim by ImageReward.

``nn.Sequential(Linear(d, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout,
Linear(64, 16), Linear(16, 1))`` -- the ReLUs are commented out in both reference repositories, so the
head is affine; parameter names ``layers.{0,2,4,6,7}.{weight,bias}`` match their state dicts.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from .base import MetricWeightsError

LINEAR_INDEX = (0, 2, 4, 6, 7)
WIDTHS = (1024, 128, 64, 16, 1)


class LaionMLP(nn.Module):
    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def mlp_keys(prefix: str = "") -> list[str]:
    return [f"{prefix}layers.{i}.{p}" for i in LINEAR_INDEX for p in ("weight", "bias")]


def build_mlp(state: dict[str, Tensor], what: str, path: Path, source: str, input_size: int | None = None) -> LaionMLP:
    """A :class:`LaionMLP` from ``layers.*`` tensors, or one line naming what is missing or mis-shaped."""
    missing = [k for k in mlp_keys() if k not in state]
    if missing:
        raise MetricWeightsError(f"{what}: {path} lacks the MLP weights {', '.join(missing[:3])}; expected {source}")
    found = int(state["layers.0.weight"].shape[1])
    if input_size is not None and found != input_size:
        raise MetricWeightsError(f"{what}: the MLP in {path} takes {found}-d embeddings but the model gives "
                                 f"{input_size}-d; expected {source}")
    mlp = LaionMLP(found)
    try:
        mlp.load_state_dict({k: state[k] for k in mlp_keys()}, strict=True)
    except RuntimeError as exc:
        raise MetricWeightsError(f"{what}: the MLP in {path} has the wrong shapes "
                                 f"({str(exc).splitlines()[-1].strip()[:120]}); expected {source}") from None
    return mlp.eval()
