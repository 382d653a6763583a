"""Training batches from the procedural world: prompts, their conditioning and real images.

The stream is addressed by a batch index, so its state is one integer and a resumed run sees
exactly the batches it would have seen.  Each rank draws from its own index sub-sequence.
"""

from __future__ import annotations

import torch

from ..methods.base import Batch
from ..rng import derive_seed
from ..teachers.base import ModelAdapter
from .world import ToyWorld, evaluation_prompts


def world_prompts(source: str) -> list[str]:
    """The fixed evaluation prompts of a built-in toy world (``TOY_WORLDS``): open ones for an open world."""
    from ..config import opens_positions

    return evaluation_prompts(open_positions=opens_positions(source))


class ToyWorldBatches:
    def __init__(self, adapter: ModelAdapter, batch_size: int, seed: int, device: torch.device,
                 rank: int = 0, world_size: int = 1, with_images: bool = True, open_positions: float = 0.0) -> None:
        self.world = ToyWorld(seed=derive_seed(seed, "toy-distill-data") % (2 ** 31), open_positions=open_positions)
        self.adapter, self.batch_size, self.device = adapter, batch_size, device
        self.rank, self.world_size = rank, world_size
        self.with_images = with_images
        self.index = 0

    def next_batch(self) -> Batch:
        images, captions, _ = self.world.batch(self.batch_size, self.index * self.world_size + self.rank)
        self.index += 1
        cond = self.adapter.encode_prompts(captions).to(self.device)
        latents = self.adapter.encode(images.to(self.device)) if self.with_images else None
        return Batch(list(captions), cond, latents)

    def state_dict(self) -> dict[str, int]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.index = int(state["index"])
