"""Small helpers the family adapter tests share: seeded latents, time vectors, the one-line error check."""

from __future__ import annotations

import torch


def latents(adapter, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` standard-normal latents of the adapter's shape, from a generator seeded with ``seed``."""
    return torch.randn(n, *adapter.latent_shape(), generator=torch.Generator().manual_seed(seed))


def ones(n: int, value: float = 1.0) -> torch.Tensor:
    """A ``[n]`` float64 time vector filled with ``value``."""
    return torch.full((n,), value, dtype=torch.float64)


def one_line_error(excinfo) -> str:
    """The raised error's message, asserting the project's rule that it is one line."""
    msg = str(excinfo.value)
    assert "\n" not in msg, f"error message is not one line: {msg!r}"
    return msg
