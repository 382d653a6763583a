"""Random streams with explicit roles, so multi-GPU randomness is right by construction.

``shared`` draws are identical on every rank (the backward-simulation step index, the per-batch
guidance scale): the official SenseFlow release drew them per rank and let ranks disagree.
``local`` draws differ per rank (all noise): the official release seeded every GPU identically
and so trained on duplicated noise.  Both streams' states are part of every checkpoint.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from several parts (stable across Python runs, unlike ``hash``)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class RandomStreams:
    """A shared generator (same on all ranks) and a local one (different per rank)."""

    def __init__(self, seed: int, rank: int = 0, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.seed = seed
        self.rank = rank
        self.shared = torch.Generator(device=self.device).manual_seed(derive_seed(seed, "shared"))
        self.local = torch.Generator(device=self.device).manual_seed(derive_seed(seed, "local", rank))

    # -- local (per-rank) draws ---------------------------------------------------------------
    def randn(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.randn(tuple(shape), generator=self.local, device=self.device, dtype=dtype)

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(x.shape, dtype=x.dtype).to(x.device)

    # -- shared (all-rank) draws --------------------------------------------------------------
    def shared_randint(self, low: int, high: int) -> int:
        """Uniform integer in ``[low, high)``, identical on every rank."""
        return int(torch.randint(low, high, (1,), generator=self.shared, device=self.device).item())

    def shared_uniform(self, low: float = 0.0, high: float = 1.0) -> float:
        u = torch.rand(1, generator=self.shared, device=self.device, dtype=torch.float64).item()
        return low + (high - low) * u

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return {"shared": self.shared.get_state(), "local": self.local.get_state(),
                "torch_cpu": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.shared.set_state(state["shared"])
        self.local.set_state(state["local"])
        torch.set_rng_state(state["torch_cpu"])
