"""Will the first batch fit?  Checked before the first step, reported as one line, never a hang.

``train.batch_size`` is bounded in the config, but a bounded batch can still need more memory
than the device has (a 1024 px batch of 4096 images is 64 GiB of latents before any network runs).
:func:`check_batch_memory` compares a LOWER bound on the first micro-batch's need -- the latent-sized
tensors every method holds at once (the noise, the noisy input, the generated sample and a
prediction: :data:`LATENT_COPIES`), activations not counted -- with the memory the device has free,
so it refuses only batches that certainly do not fit.  Running out of memory inside the first step
anyway is turned into the same kind of one-line error by :func:`out_of_memory`.
"""

from __future__ import annotations

import math
import os

import torch

from ..teachers.base import SenseflowError

#: latent-sized float32 tensors alive at once in any method's step (noise, x_t, generated x0, a prediction)
LATENT_COPIES = 4
GIB = 1024 ** 3


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` (CUDA: free device memory; CPU: the OS's available memory), or ``None``."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, RuntimeError, AttributeError):
        return None


def batch_bytes(micro_batch: int, latent_shape: tuple[int, ...]) -> int:
    """The lower bound on one micro-batch's memory (float32 latents, :data:`LATENT_COPIES` of them)."""
    return LATENT_COPIES * micro_batch * math.prod(latent_shape) * 4


def check_batch_memory(batch_size: int, grad_accum: int, latent_shape: tuple[int, ...], device: torch.device,
                       available: int | None = None) -> None:
    """One-line :class:`SenseflowError` when the first micro-batch certainly does not fit on ``device``."""
    micro = batch_size // grad_accum
    need = batch_bytes(micro, tuple(latent_shape))
    have = available_bytes(device) if available is None else available
    if have is not None and need > have:
        raise SenseflowError(
            f"train.batch_size {batch_size} (micro-batch {micro} of shape {list(latent_shape)}) needs at least "
            f"{need / GIB:.1f} GiB for its latents alone, but the {device.type} device has {have / GIB:.1f} GiB "
            f"free: lower train.batch_size or raise train.grad_accum")


def out_of_memory(exc: BaseException, cfg, device: torch.device) -> SenseflowError | None:
    """The one-line error for running out of memory in the first step, or ``None`` for any other error."""
    text = str(exc)
    oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower() \
        or "can't allocate memory" in text or "DefaultCPUAllocator" in text
    if not oom:
        return None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return SenseflowError(f"the first training step ran out of {device.type} memory with train.batch_size "
                          f"{cfg.batch_size} and train.grad_accum {cfg.grad_accum}: lower the batch, raise grad_accum, "
                          "use train.precision amp_bf16, or shard with parallel.strategy fsdp")
