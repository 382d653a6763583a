"""SiD2a's parameter-free discriminator: the fake network's pooled hidden states as logits.

SiD-DiT (Zhou et al. 2025, data-aided variant SiD2a) reads the fake score network's hidden states
after its FINAL norm layer -- before the output projection / unpatchify -- and averages them over
the tokens; every channel is one logit (``[B, D]``).  No parameter is added: the fake network is the
discriminator, trained in its own update with ``BCE(real -> 1, fake -> 0)``.

* Which layer: ``adapter.output_norm_name(backbone)`` (SD3 / SD3.5 / FLUX / SANA: ``"norm_out"``; any
  adapter that names its final norm works), read with a forward hook during the forward the method
  already runs (no extra network call for fakes).
* Pooling: token sequences ``[B, N, D]`` are averaged over ``N``; convolutional maps ``[B, C, H, W]``
  (UNets, the toy conv net) over ``H, W``; ``[B, D]`` is returned as is.
* Guidance batches: with CFG the adapter runs ``[cond; uncond]`` in one forward, so the first ``B``
  rows of the FIRST call inside the capture are the conditional branch; :func:`pool_conditional`
  keeps those.

The losses follow the released SiD-DiT code: logits clamped to ``[-10, 10]``, BCE averaged over the
logits of a sample; the method scales them to its sum-over-elements convention.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..teachers.base import Denoiser, SenseflowError

LOGIT_CLAMP = 10.0


def pool_tokens(h: Tensor) -> Tensor:
    """``[B, N, D] -> [B, D]`` (mean over tokens); ``[B, C, H, W] -> [B, C]`` (mean over space)."""
    if h.ndim == 2:
        return h
    if h.ndim == 3:
        return h.mean(dim=1)
    return h.flatten(2).mean(dim=2)


def norm_layer_name(denoiser: Denoiser) -> str:
    """The qualified name of the fake network's final norm, or a one-line error."""
    name = denoiser.adapter.output_norm_name(denoiser.backbone)
    if not name:
        raise SenseflowError(f"SiD adversarial (SiD2a) needs the fake network's final norm layer, but "
                             f"{type(denoiser.adapter).__name__} names none (output_norm_name): use a family "
                             f"that provides it or set method.adversarial: false")
    if name not in dict(denoiser.backbone.named_modules()):
        raise SenseflowError(f"SiD adversarial: no submodule {name!r} in {type(denoiser.backbone).__name__}")
    return name


@contextlib.contextmanager
def record_outputs(module: nn.Module, name: str) -> Iterator[list[Tensor]]:
    """Every output of submodule ``name`` during forwards inside the context, in call order."""
    calls: list[Tensor] = []
    target = module.get_submodule(name)

    def hook(_m, _inp, out):
        calls.append(out[0] if isinstance(out, (tuple, list)) else out)

    handle = target.register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def tie_unused_output(value: Tensor, output: Tensor, backbone: nn.Module) -> Tensor:
    """``value`` plus ``0 * output`` when ``backbone`` is FSDP2-sharded and gradients are on.

    FSDP2 re-gathers a module's parameters for backward from hooks on its forward OUTPUT; a loss
    that only reads a hooked inner layer (a discriminator's features) never triggers them, so the
    root's parameters are still freed when backward reaches them.  The zero-weight tie fixes that
    at the cost of a backward through the rest of the network; single process: ``value`` as is.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return value
    if not (torch.is_grad_enabled() and isinstance(backbone, FSDPModule)):
        return value
    return value + 0.0 * output.float().mean()


def pool_conditional(calls: list[Tensor], batch_size: int) -> Tensor:
    """Pooled logits ``[B, D]`` of the conditional rows of the first recorded call."""
    if not calls:
        raise RuntimeError("SiD2a: the fake network's final norm layer did not run inside the capture")
    return pool_tokens(calls[0][:batch_size]).float()


class PooledFeatureDiscriminator:
    """Reads ``[B, D]`` logits from a denoiser's final norm during a forward (holds no parameters).

    Usage::

        disc = PooledFeatureDiscriminator(fake_score)
        with disc.capture() as calls:
            x0 = fake_score(x_t, t, cond, guidance)
        logits = disc.logits(calls, len(x_t))
    """

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser
        self.layer = norm_layer_name(denoiser)

    def capture(self):
        return record_outputs(self.denoiser.backbone, self.layer)

    @staticmethod
    def logits(calls: list[Tensor], batch_size: int) -> Tensor:
        return pool_conditional(calls, batch_size)


def bce_real_fake(real_logits: Tensor, fake_logits: Tensor, clamp: float = LOGIT_CLAMP) -> Tensor:
    """Per-sample ``(BCE(real -> 1) + BCE(fake -> 0)) / 2``, each averaged over the sample's logits: ``[B]``."""
    real = F.binary_cross_entropy_with_logits(real_logits.clamp(-clamp, clamp), torch.ones_like(real_logits),
                                              reduction="none").flatten(1).mean(dim=1)
    fake = F.binary_cross_entropy_with_logits(fake_logits.clamp(-clamp, clamp), torch.zeros_like(fake_logits),
                                              reduction="none").flatten(1).mean(dim=1)
    return 0.5 * (real + fake)


def bce_generator(fake_logits: Tensor, clamp: float = LOGIT_CLAMP) -> Tensor:
    """Per-sample non-saturating ``BCE(D(fake) -> 1)`` averaged over the sample's logits: ``[B]``."""
    return F.binary_cross_entropy_with_logits(fake_logits.clamp(-clamp, clamp), torch.ones_like(fake_logits),
                                              reduction="none").flatten(1).mean(dim=1)
