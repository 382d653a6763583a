"""The few-step generator G: a trainable copy of the teacher backbone evaluated at K anchor times.

Sampling, the deterministic step and backward simulation live here so that every method (DMD2,
SenseFlow, SiD) trains exactly the sampler users will run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor, nn

from .rng import RandomStreams
from .schedules import NoiseSchedule, as_time
from .teachers.base import Conditioning, Denoiser

Sampler = Literal["stochastic", "euler"]


@dataclass
class GeneratorInput:
    """A training input for G: the noisy state, its anchor index and time, and the next anchor time."""

    x_t: Tensor
    index: int
    t: Tensor  # native time, float64 [B]
    t_next: Tensor  # next anchor (or clean), float64 [B]
    backward_simulated: bool


class FewStepGenerator(nn.Module):
    """G: predicts ``x0`` at anchors ``tau_1 > ... > tau_K`` (native times of the schedule).

    The first anchor is treated as pure noise (``x = eps``), as in the released SenseFlow and
    DMD2 code (SDXL's index 999 is not exactly pure noise, but the official code feeds ``eps``;
    for forward diffusion of real latents see ``training_input(pure_first_anchor=...)``).
    """

    #: how backward simulation steps between anchors: fresh noise, as the released trainers do
    #: (a subclass may probe another sampler; the Gaussian-mixture runner's ``EulerSimulated``)
    simulation_sampler: Sampler = "stochastic"
    #: the anchor indices a training input is drawn from, uniformly; ``None`` = every anchor, as the released
    #: trainers do (a probe may train only some: the Gaussian-mixture runner's ``RunSpec.trained_anchors``)
    trained_anchors: tuple[int, ...] | None = None
    #: called with each training input's anchor index (a probe's hook: the mixture runner's per-anchor fake scores)
    anchor_listener: Callable[[int], None] | None = None

    def __init__(self, denoiser: Denoiser, anchors: Sequence[float] | Tensor,
                 first_input_time: float | None = None) -> None:
        """``first_input_time``: query the backbone at this native time for the first anchor, with the
        noise scaled as that time's noise term (``add_noise(0, eps, t_in)``: SiD's ``G(sigma_init z,
        sigma_init)``).  ``None`` (default) = the anchor itself, as the released SenseFlow/DMD2 code."""
        super().__init__()
        self.denoiser = denoiser
        self.first_input_time = first_input_time
        a = as_time(anchors).flatten().cpu()
        if len(a) == 0:
            raise ValueError("a generator needs at least one anchor")
        if len(a) > 1 and not bool((a[1:] < a[:-1]).all()):
            raise ValueError(f"anchors must be strictly decreasing, got {a.tolist()}")
        self.anchors: list[float] = a.tolist()
        if first_input_time is not None and not self.schedule.t_clean < first_input_time < self.anchors[0]:
            raise ValueError(f"first_input_time must lie between clean data ({self.schedule.t_clean:g}) and the "
                             f"first anchor ({self.anchors[0]:g}) in native time, got {first_input_time}")

    @property
    def schedule(self) -> NoiseSchedule:
        return self.denoiser.schedule

    @property
    def num_steps(self) -> int:
        return len(self.anchors)

    def time(self, index: int, batch: int, device: torch.device | str) -> Tensor:
        """Native time of anchor ``index`` (``index == K`` means clean data), as ``[batch]`` float64."""
        value = self.anchors[index] if index < self.num_steps else self.schedule.t_clean
        return torch.full((batch,), value, dtype=torch.float64, device=device)

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """``x0`` prediction of G (no guidance: the student is guidance-free)."""
        if self.first_input_time is not None and bool((t == self.anchors[0]).all()):
            # at a pure-noise first anchor (t = 1 for flows) a copy of the teacher predicts the class
            # mean for every noise: a 1-step student starts collapsed.  At an earlier time the copy's
            # prediction depends on the noise, so G starts diverse.
            t_in = torch.full_like(t, self.first_input_time)
            return self.denoiser(self.schedule.add_noise(torch.zeros_like(x_t), x_t, t_in), t_in, cond)
        return self.denoiser(x_t, t, cond)

    def step(self, x_t: Tensor, x0: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        """Deterministic (Euler/DDIM) move from ``t`` to ``t_next`` given an ``x0`` prediction."""
        return self.schedule.step(x_t, x0, t, t_next)

    def advance(self, x_t: Tensor, x0: Tensor, index: int, sampler: Sampler, rng: RandomStreams | None,
                generator: torch.Generator | None = None) -> Tensor:
        """From anchor ``index`` with prediction ``x0`` to anchor ``index + 1``."""
        n = x_t.shape[0]
        t_next = self.time(index + 1, n, x_t.device)
        if sampler == "euler":
            return self.step(x_t, x0, self.time(index, n, x_t.device), t_next)
        if sampler != "stochastic":
            raise ValueError(f"unknown sampler {sampler!r}; expected 'stochastic' or 'euler'")
        if generator is not None:
            eps = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
        elif rng is not None:
            eps = rng.randn_like(x0)
        else:
            eps = torch.randn_like(x0)
        return self.schedule.add_noise(x0, eps, t_next)

    def sample(self, noise: Tensor, cond: Conditioning, sampler: Sampler = "stochastic",
               rng: RandomStreams | None = None, generator: torch.Generator | None = None,
               num_steps: int | None = None) -> Tensor:
        """Run the K-step sampler from pure noise and return the final ``x0`` prediction.

        ``stochastic`` re-noises each prediction to the next anchor with FRESH noise (the default
        of the SenseFlow tables); ``euler`` takes deterministic ODE steps.
        """
        steps = self.num_steps if num_steps is None else num_steps
        if not 1 <= steps <= self.num_steps:
            raise ValueError(f"num_steps must be in 1..{self.num_steps}, got {steps}")
        x = noise
        x0 = noise
        for i in range(steps):
            x0 = self(x, self.time(i, x.shape[0], x.device), cond)
            if i + 1 < steps:
                x = self.advance(x, x0, i, sampler, rng, generator)
        return x0

    @torch.no_grad()
    def simulate(self, noise: Tensor, cond: Conditioning, k: int, rng: RandomStreams) -> Tensor:
        """Backward simulation: ``k`` no-grad ``simulation_sampler`` steps from pure noise -> state at anchor ``k``."""
        if not 0 <= k < self.num_steps:
            raise ValueError(f"k must be in 0..{self.num_steps - 1}, got {k}")
        x = noise
        for i in range(k):
            x0 = self(x, self.time(i, x.shape[0], x.device), cond)
            x = self.advance(x, x0, i, self.simulation_sampler, rng)
        return x

    def training_input(self, cond: Conditioning, shape: tuple[int, ...], rng: RandomStreams,
                       real_x0: Tensor | None = None, backward_probability: float = 1.0,
                       dtype: torch.dtype = torch.float32, pure_first_anchor: bool = True) -> GeneratorInput:
        """Draw G's training input: backward simulation, or forward diffusion of real latents.

        The anchor index ``k`` and the backward/forward choice come from the shared stream (equal
        on all ranks, so every rank runs the same number of G forwards); all noise is per rank.
        ``pure_first_anchor``: at ``k = 0`` forward diffusion feeds pure noise, as sampling does and
        as the released SDXL trainer does (``noisy_image[timesteps == 999] = noise``); ``False``
        diffuses the real latents to the first anchor (SDXL 999: ``0.068 x0 + 0.998 eps``).
        """
        n = shape[0]
        if self.trained_anchors is None:
            k = rng.shared_randint(0, self.num_steps)
        else:
            k = self.trained_anchors[rng.shared_randint(0, len(self.trained_anchors))]
        use_backward = real_x0 is None or rng.shared_uniform() < backward_probability
        noise = rng.randn(shape, dtype=dtype)
        if use_backward:
            x_t = self.simulate(noise, cond, k, rng)
        elif k == 0 and pure_first_anchor:
            x_t = noise
        else:
            x_t = self.schedule.add_noise(real_x0.to(noise.dtype), noise, self.time(k, n, noise.device))
        if self.anchor_listener is not None:
            self.anchor_listener(k)
        return GeneratorInput(x_t=x_t, index=k, t=self.time(k, n, x_t.device), t_next=self.time(k + 1, n, x_t.device),
                              backward_simulated=use_backward)
