"""DMD (v1)'s regression loss on teacher ODE pairs, as a probe in the ground-truth world.

Why it is here: every distribution-matching 1-step student on the mixture plateaus at precision
~0.68-0.72, yet the same network regressed onto its teacher's ODE map (paired noise -> teacher
sample; ``benchmarks/gmm_one_step_capacity.py``) reaches 0.77 after 1000 and 0.86 after 4000
steps.  DMD (Yin et al., CVPR 2024, "One-step diffusion with distribution matching distillation")
trains its 1-step generator with exactly such a term next to the distribution-matching loss
(``L = L_DM + lambda_reg L_reg`` on precomputed noise -> ODE-sample pairs, LPIPS there, lambda_reg
0.25); DMD2 removed it because the pairs are expensive for large models.  On the mixture the
pairs are cheap, so the term can be measured.

It is not a library option: the library's data pipeline has no paired-noise dataset, and the
released DMD2 / SenseFlow code has no such term.  :func:`install` adds it to a built DMD2 /
SenseFlow method through the method's ``extra_generator_losses`` hook; the distance is the mean
squared error (the mixture is not an image, so LPIPS does not apply).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ...rng import RandomStreams
from ...sampling import sample_ode
from ...teachers.base import Conditioning, Denoiser, SenseflowError
from .mixture import GaussianMixture
from .teacher import GMMAdapter, class_prompt


@torch.no_grad()
def ode_pairs(mixture: GaussianMixture, backbone: torch.nn.Module, n: int, steps: int = 32,
              seed: int = 7) -> dict[str, Tensor]:
    """``n`` (noise, label, teacher ODE sample) triples: Euler with ``steps`` uniform steps, no CFG."""
    adapter = GMMAdapter(mixture)
    g = torch.Generator().manual_seed(seed)
    labels = mixture.sample_labels(n, g)
    noise = torch.randn(n, mixture.dim, generator=g)
    teacher = Denoiser(backbone, adapter)
    x0 = [sample_ode(teacher, noise[i:i + 4096], adapter.encode_prompts([class_prompt(int(c))
                                                                          for c in labels[i:i + 4096]]), steps, None)
          for i in range(0, n, 4096)]
    return {"noise": noise, "labels": labels, "x0": torch.cat(x0).float()}


def load_or_make_pairs(mixture: GaussianMixture, backbone: torch.nn.Module, n: int, steps: int,
                       cache: Path | None) -> dict[str, Tensor]:
    """:func:`ode_pairs`, cached as safetensors in ``cache`` (the file name carries n and steps)."""
    from ...train.checkpoint import read_safetensors, save_safetensors

    if cache is None:
        return ode_pairs(mixture, backbone, n, steps)
    if cache.is_file():
        return read_safetensors(cache)
    pairs = ode_pairs(mixture, backbone, n, steps)
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(None, cache, tensors={k: v.contiguous() for k, v in pairs.items()})
    return pairs


class ODERegression:
    """``lambda_reg * mse(G(noise), teacher ODE sample)`` on a random batch of the pairs, each G step.

    ``cond``: the pairs' conditioning (any model; ``benchmarks/toy_demo_screen.py --regression``); without it
    the pairs carry mixture ``labels``.  ``first_anchor``: allow a multi-step generator, whose prediction at
    the pure-noise anchor -- the 1-step sample backward simulation trains -- is regressed.
    """

    def __init__(self, method, pairs: dict[str, Tensor], weight: float, batch_size: int, seed: int,
                 cond: Conditioning | None = None, first_anchor: bool = False) -> None:
        if method.models.generator.num_steps != 1 and not first_anchor:
            raise SenseflowError("gmm: the regression loss is DMD's 1-step term: use steps = 1")
        self.method, self.pairs, self.weight, self.batch_size = method, pairs, float(weight), int(batch_size)
        self.adapter, self.cond = method.models.teacher.adapter, cond
        self.g = torch.Generator().manual_seed(seed)
        self.inner = method.extra_generator_losses

    def __call__(self, gin, x: Tensor, batch, rng: RandomStreams) -> dict[str, tuple[float, Tensor]]:
        losses = dict(self.inner(gin, x, batch, rng))
        idx = torch.randint(0, len(self.pairs["noise"]), (self.batch_size,), generator=self.g)
        gen = self.method.models.generator
        cond = self.cond[idx.to(x.device)] if self.cond is not None else \
            self.adapter.encode_prompts([class_prompt(int(c)) for c in self.pairs["labels"][idx]])
        pred = gen(self.pairs["noise"][idx], gen.time(0, self.batch_size, x.device), cond).float()
        losses["reg"] = (self.weight, torch.nn.functional.mse_loss(pred, self.pairs["x0"][idx]))
        return losses


def install(method, pairs: dict[str, Tensor], weight: float, batch_size: int, seed: int,
            cond: Conditioning | None = None, first_anchor: bool = False) -> ODERegression:
    """Add the regression term to ``method``'s generator loss (its ``extra_generator_losses`` hook)."""
    if not hasattr(method, "extra_generator_losses"):
        raise SenseflowError(f"gmm: the regression loss needs a DMD2 / SenseFlow method, not {type(method).__name__}")
    term = ODERegression(method, pairs, weight, batch_size, seed, cond, first_anchor)
    method.extra_generator_losses = term
    return term
