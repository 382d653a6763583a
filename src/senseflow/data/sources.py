"""Batch sources (the trainer's ``BatchSource``) for caches, image-text JSON and DMD2 LMDBs.

Every source walks its items like :class:`~senseflow.data.prompts.PromptStream` does prompts: a
fresh permutation per epoch (seeded by ``derive_seed(train.seed, "data")``, as prompt-file runs),
each rank taking a disjoint shard of it, and ``(epoch, position)`` saved in every checkpoint so a
resumed run sees exactly the batches it would have seen.  Because a cache keeps the order of its
prompt file, training from a cache draws the same prompts, in the same order, as training from the
prompt file itself.

:func:`data_source` and :func:`sample_spec` are what :mod:`senseflow.build` calls; they return
``None`` when the config uses none of these inputs (plain prompt files, the toy world).
"""

from __future__ import annotations

from typing import Any

import torch

from ..methods.base import Batch
from ..rng import derive_seed
from ..teachers.base import ModelAdapter, SenseflowError
from .cache import PromptCache
from .prompts import PromptStream


class IndexedSource:
    """Endless, rank-sharded, resumable batches of item indices ``0 .. num_items-1``."""

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if num_items < world_size:
            raise SenseflowError(f"{num_items} data items cannot be shared among {world_size} processes")
        self.num_items = num_items
        # a range is a sequence too: the stream needs no list of millions of indices
        self.stream = PromptStream(range(num_items), batch_size, seed, rank, world_size)  # type: ignore[arg-type]

    def next_indices(self) -> list[int]:
        return self.stream.next_prompts()  # type: ignore[return-value]  # the "prompts" are indices

    def state_dict(self) -> dict[str, Any]:
        return {**self.stream.state_dict(), "num_items": self.num_items}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("num_items")
        if saved is not None and int(saved) != self.num_items:
            raise SenseflowError(f"the checkpoint was trained on {int(saved)} data items but this data has "
                                 f"{self.num_items}: resume with the same data")
        self.stream.load_state_dict(state)


class CachedBatches(IndexedSource):
    """Batches from a prompt/latent cache: conditioning (and latents) read lazily from the shards."""

    def __init__(self, cache: PromptCache, batch_size: int, seed: int, device: torch.device, rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__(len(cache), batch_size, seed, rank, world_size)
        self.cache, self.device = cache, device

    def next_batch(self) -> Batch:
        prompts, cond, latents = self.cache.items(self.next_indices())
        return Batch(prompts, cond.to(self.device), None if latents is None else latents.to(self.device))


class ImageTextBatches(IndexedSource):
    """Batches from a SenseFlow image-text JSON: prompts encoded and images VAE-encoded on the fly.

    The VAE posterior sample of item ``i`` in epoch ``e`` uses the seed ``(seed, "vae", e, i)``, so
    the latents too are identical after a resume.
    """

    def __init__(self, items, adapter: ModelAdapter, batch_size: int, seed: int, device: torch.device,
                 rank: int = 0, world_size: int = 1) -> None:
        super().__init__(len(items), batch_size, seed, rank, world_size)
        self.items, self.adapter, self.device, self.seed = items, adapter, device, seed

    def next_batch(self) -> Batch:
        idx = self.next_indices()
        prompts = self.items.prompts(idx)
        seeds = [derive_seed(self.seed, "vae", self.stream.epoch, i) for i in idx]
        latents = self.items.latents(idx, self.adapter, self.device, seeds=seeds)
        with torch.no_grad():
            cond = self.adapter.encode_prompts(prompts)
        return Batch(prompts, cond.to(self.device), latents)


class LmdbBatches(IndexedSource):
    """Batches from a DMD2 LMDB: stored latents, prompts encoded with the teacher's text encoders."""

    def __init__(self, items, adapter: ModelAdapter, batch_size: int, seed: int, device: torch.device,
                 rank: int = 0, world_size: int = 1) -> None:
        super().__init__(len(items), batch_size, seed, rank, world_size)
        items.db.check_adapter(adapter)
        self.items, self.adapter, self.device = items, adapter, device

    def next_batch(self) -> Batch:
        idx = self.next_indices()
        prompts = self.items.prompts(idx)
        with torch.no_grad():
            cond = self.adapter.encode_prompts(prompts)
        return Batch(prompts, cond.to(self.device), self.items.latents(idx, device=self.device))


# -------------------------------------------------------------------------------------------------
# What the builder calls
# -------------------------------------------------------------------------------------------------
def cache_path(config) -> str | None:
    return getattr(config.paths, "cache", None)


def use_cache(config, adapter: ModelAdapter, path: str | None = None) -> PromptCache:
    """Open the configured cache, check it belongs to this teacher / resolution, install its uncond."""
    from .cache import open_cache

    cache = open_cache(path or cache_path(config))
    cache.check_compatible(config, adapter)
    # only families with a CFG branch have an unconditional embedding (FLUX is guidance-distilled)
    if "cfg" in adapter.guidance_kinds and type(adapter).set_unconditional is not ModelAdapter.set_unconditional:
        adapter.set_unconditional(cache.unconditional())
    return cache


def data_source(config, adapter: ModelAdapter, device: torch.device, rank: int = 0, world_size: int = 1,
                cache: PromptCache | None = None):
    """The batch source for ``paths.cache`` / ``paths.image_text`` / ``paths.lmdb``; None for other data."""
    seed = derive_seed(config.train.seed, "data")
    batch = config.train.batch_size
    if cache is not None or cache_path(config) is not None:
        cache = cache or use_cache(config, adapter)
        return CachedBatches(cache, batch, seed, device, rank, world_size)
    if getattr(config.paths, "image_text", None) is not None or getattr(config.paths, "lmdb", None) is not None:
        from .cache import source_items
        items = source_items(config)
        cls = ImageTextBatches if getattr(config.paths, "image_text", None) is not None else LmdbBatches
        return cls(items, adapter, batch, seed, device, rank, world_size)
    return None


def sample_spec(config, adapter: ModelAdapter, device: torch.device, cache: PromptCache | None = None):
    """Sample-grid prompts, conditioning and fixed noise (``build_samples``) for these data inputs; else None.

    From a cache: its ``eval`` prompts when ``paths.eval_prompts`` is set (they were cached by
    ``senseflow cache``), otherwise its first ``train.num_samples`` items -- no text encoder needed.
    """
    from ..train.trainer import SampleSpec

    n = config.train.num_samples
    if cache is None and cache_path(config) is None:
        if getattr(config.paths, "image_text", None) is None and getattr(config.paths, "lmdb", None) is None:
            return None
        if config.paths.eval_prompts is not None:
            return None  # build_samples encodes the eval prompt file as usual
        from .cache import source_items
        items = source_items(config, check_images="none")
        prompts = items.prompts(range(min(n, len(items))))
        with torch.no_grad():
            cond = adapter.encode_prompts(prompts)
    else:
        from .cache import open_cache
        cache = cache or open_cache(cache_path(config))
        if config.paths.eval_prompts is not None:
            cached = cache.eval_set()
            if cached is None:
                raise SenseflowError(f"paths.eval_prompts is set but cache {str(cache.path)!r} holds no eval prompts: "
                                     f"rebuild it with `senseflow cache` (it caches paths.eval_prompts) or unset "
                                     f"paths.eval_prompts")
            prompts, cond = cached
            prompts, cond = prompts[:n], cond[:n]
            _check_eval_prompts(config, prompts, cache)
        else:
            prompts, cond, _ = cache.items(range(min(n, len(cache))))
    g = torch.Generator().manual_seed(derive_seed(config.train.seed, "grid-noise"))
    noise = torch.randn((len(prompts), *adapter.latent_shape()), generator=g).to(device)
    return SampleSpec(list(prompts), cond.to(device), noise)


def _check_eval_prompts(config, cached: list[str], cache: PromptCache) -> None:
    from pathlib import Path

    path = config.paths.eval_prompts
    if path.startswith("builtin:"):
        from .cache import _eval_prompts
        current = _eval_prompts(config)
    elif Path(path).is_file():
        from .prompts import load_prompts
        current = load_prompts(path)
    else:
        return
    if current[:len(cached)] != cached:
        raise SenseflowError(f"the prompts in paths.eval_prompts differ from those cached in {str(cache.path)!r}: "
                             f"rebuild the cache with `senseflow cache --overwrite`")
