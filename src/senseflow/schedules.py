"""Noise schedules: what ``x_t`` means at time ``t`` and how predictions convert into each other.

Every schedule answers the same few questions -- ``alpha(t)``, ``sigma(t)``, how to turn a native
network prediction into ``x0`` / ``eps`` and back, and how the *unit* time ``u in [0, 1]`` (the
"index space" in which anchors, margins and samplers are specified, ``index = 1000 * u``) maps
to the schedule's native time (after a shift, or onto DDPM's integer index).  Keeping this
contract small lets the generator, the methods and the samplers stay family-agnostic: the
deterministic step is written once as a DDIM step, which *is* the Euler step for rectified flow.

All time arithmetic is done in float64; coefficients are cast to the data dtype only when they
multiply a tensor.

Native times:
  * rectified flow: ``t = sigma in [0, 1]`` (0 = clean data, 1 = pure noise);
  * DDPM: the float-valued integer index ``t in {0..T-1}``; ``-1`` stands for clean data;
  * TrigFlow: the angle ``s in [0, pi/2]``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

Prediction = Literal["x0", "epsilon", "v", "velocity"]
"""Native output parameterisations.

``velocity``: rectified-flow velocity ``eps - x0`` (SD3, FLUX, SANA).
``v``: variance-preserving v-prediction ``alpha * eps - sigma * x0`` (DDPM v-models; TrigFlow's F).
``epsilon``: the noise.  ``x0``: the clean sample.
"""

PREDICTIONS: tuple[str, ...] = ("x0", "epsilon", "v", "velocity")


def as_time(t: Tensor | float | Sequence[float], device: torch.device | str | None = None) -> Tensor:
    """Return ``t`` as a float64 tensor (time is never handled in low precision)."""
    if isinstance(t, Tensor):
        return t.to(dtype=torch.float64, device=device if device is not None else t.device)
    return torch.as_tensor(t, dtype=torch.float64, device=device)


def expand_like(coef: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample (or scalar) coefficient to broadcast over ``x`` and cast it to ``x``'s dtype."""
    coef = coef.to(device=x.device)
    if coef.ndim == 0:
        return coef.to(x.dtype)
    return coef.reshape(coef.shape[0], *([1] * (x.ndim - 1))).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Pure conversions (alpha, sigma already broadcastable to x)
# ---------------------------------------------------------------------------------------------
def x0_from_eps(x_t: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (x_t - sigma * eps) / alpha


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (x_t - alpha * x0) / sigma


def flow_velocity(x0: Tensor, eps: Tensor) -> Tensor:
    """Rectified-flow velocity ``d x_t / dt = eps - x0``."""
    return eps - x0


def score_from_eps(eps: Tensor, sigma: Tensor) -> Tensor:
    """Score of the noised marginal, ``grad log p_t(x_t) = -eps / sigma``."""
    return -eps / sigma


def eps_from_score(score: Tensor, sigma: Tensor) -> Tensor:
    return -score * sigma


# ---------------------------------------------------------------------------------------------
# Time shifts (unit time -> shifted time) and their inverses
# ---------------------------------------------------------------------------------------------
def static_shift(u: Tensor, shift: float) -> Tensor:
    """SD3's shift: ``t = s u / (1 + (s - 1) u)``."""
    u = as_time(u)
    return shift * u / (1.0 + (shift - 1.0) * u)


def inverse_static_shift(t: Tensor, shift: float) -> Tensor:
    t = as_time(t)
    return t / (shift - (shift - 1.0) * t)


def dynamic_shift(u: Tensor, mu: float) -> Tensor:
    """FLUX's resolution-dependent shift: ``t = e^mu / (e^mu + (1/u - 1))``; ``u = 0`` maps to 0."""
    u = as_time(u)
    em = math.exp(mu)
    safe = torch.where(u > 0, u, torch.ones_like(u))
    out = em / (em + (1.0 / safe - 1.0))
    return torch.where(u > 0, out, torch.zeros_like(u))


def inverse_dynamic_shift(t: Tensor, mu: float) -> Tensor:
    t = as_time(t)
    em = math.exp(mu)
    safe = torch.where(t > 0, t, torch.ones_like(t))
    out = 1.0 / (1.0 + em * (1.0 / safe - 1.0))
    return torch.where(t > 0, out, torch.zeros_like(t))


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's ``mu`` as a linear function of the number of latent tokens (1.15 at 1024x1024)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return float(image_seq_len * slope + (base_shift - slope * base_seq_len))


# ---------------------------------------------------------------------------------------------
# TrigFlow <-> rectified flow (SANA-Sprint teachers)
# ---------------------------------------------------------------------------------------------
def trigflow_to_flow(x: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Map a TrigFlow state ``x = cos(s) x0 + sin(s) eps`` to rectified flow ``(x_t, t)``."""
    s = as_time(s)
    denom = torch.sin(s) + torch.cos(s)
    t = torch.sin(s) / denom
    return x / expand_like(denom, x), t


def flow_to_trigflow(x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`trigflow_to_flow`: ``s = atan(t / (1 - t))``, ``x = x_t (sin s + cos s)``."""
    t = as_time(t)
    s = torch.atan2(t, 1.0 - t)
    denom = torch.sin(s) + torch.cos(s)
    return x_t * expand_like(denom, x_t), s


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------
class NoiseSchedule(ABC):
    """The contract every schedule implements (see module docstring)."""

    prediction: str
    num_train_timesteps: int = 1000

    def __init__(self, prediction: str) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTIONS}")
        self.prediction = prediction

    # -- time ----------------------------------------------------------------------------------
    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def sigma(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def from_unit(self, u: Tensor | float | Sequence[float]) -> Tensor:
        """Unit time (index space / 1000, unshifted) -> native time."""

    @abstractmethod
    def to_unit(self, t: Tensor | float | Sequence[float]) -> Tensor:
        """Native time -> unit time."""

    @property
    @abstractmethod
    def t_clean(self) -> float:
        """Native time of clean data (the end of sampling)."""

    def omega(self, t: Tensor) -> Tensor:
        """SenseFlow's adversarial time weight ``(1 - sigma_t)^2 = alpha_t^2`` (SDXL: ``abar_t``)."""
        return self.alpha(as_time(t)) ** 2

    # -- state <-> prediction ----------------------------------------------------------------
    def coefficients(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        t = as_time(t, device=x.device)
        return expand_like(self.alpha(t), x), expand_like(self.sigma(t), x)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        a, s = self.coefficients(t, x0)
        return a * x0 + s * eps

    def to_x0(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Convert a native prediction into an ``x0`` prediction."""
        a, s = self.coefficients(t, x_t)
        p = self.prediction
        if p == "x0":
            return pred
        if p == "epsilon":
            return x0_from_eps(x_t, pred, a, s)
        if p == "v":
            return a * x_t - s * pred
        return self._velocity_to_x0(pred, x_t, a, s)

    def to_eps(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        a, s = self.coefficients(t, x_t)
        return eps_from_x0(x_t, x0, a, s)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The native regression target for ``(x0, eps)`` -- the teacher's own training target."""
        p = self.prediction
        if p == "x0":
            return x0
        if p == "epsilon":
            return eps
        a, s = self.coefficients(t, x0)
        if p == "v":
            return a * eps - s * x0
        return self._velocity_target(x0, eps)

    def from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Native prediction that corresponds to an ``x0`` prediction at ``(x_t, t)``."""
        return self.target(x0, self.to_eps(x0, x_t, t), t)

    def _velocity_to_x0(self, pred: Tensor, x_t: Tensor, a: Tensor, s: Tensor) -> Tensor:
        raise ValueError(f"{type(self).__name__} does not support 'velocity' predictions")

    def _velocity_target(self, x0: Tensor, eps: Tensor) -> Tensor:
        raise ValueError(f"{type(self).__name__} does not support 'velocity' predictions")

    def step(self, x_t: Tensor, x0: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        """Deterministic step ``t -> t_next`` given an ``x0`` prediction (DDIM; Euler for flows).

        Writing it through ``(x0, eps_hat)`` means the same code serves every schedule, and for
        rectified flow it is exactly the Euler ODE step ``x_t + (t_next - t) v``.
        """
        t_next = as_time(t_next, device=x_t.device)
        a_n, s_n = self.coefficients(t_next, x_t)
        eps_hat = self.to_eps(x0, x_t, t)
        # at t_next == clean the eps term vanishes exactly; avoid 0 * inf when sigma_t is 0 too
        return a_n * x0 + torch.where(s_n == 0, torch.zeros_like(eps_hat), s_n * eps_hat)

    def default_training_time(self, n: int, generator: torch.Generator | None, device: torch.device | str,
                              table: bool = True) -> Tensor:
        """The time law the teacher was trained with (used by the fake-score loss).

        ``table``: draw it as the released trainers do, through the scheduler's 1000-entry table
        (differs from the continuous law only where a table carries a shift: rectified flow).
        """
        raise NotImplementedError

    def unshifted(self, u: Tensor | float | Sequence[float]) -> Tensor:
        """Unit time as native time WITHOUT the teacher's shift (SiD-DiT's anchors, ``use_sd3_shift=False``).

        Only rectified flow has a shift to leave out; other schedules map unit time as usual.
        """
        return self.from_unit(u)


class RectifiedFlow(NoiseSchedule):
    """``alpha_t = 1 - t``, ``sigma_t = t``; optional static (SD3) or dynamic (FLUX) shift of unit time."""

    def __init__(self, shift: float = 1.0, mu: float | None = None, prediction: str = "velocity") -> None:
        super().__init__(prediction)
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        if mu is not None and shift != 1.0:
            raise ValueError("give either a static shift or a dynamic mu, not both")
        self.shift = float(shift)
        self.mu = None if mu is None else float(mu)

    def __repr__(self) -> str:
        return f"RectifiedFlow(shift={self.shift}, mu={self.mu}, prediction={self.prediction!r})"

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - as_time(t)

    def sigma(self, t: Tensor) -> Tensor:
        return as_time(t)

    def from_unit(self, u: Tensor | float | Sequence[float]) -> Tensor:
        u = as_time(u)
        if self.mu is not None:
            return dynamic_shift(u, self.mu)
        return static_shift(u, self.shift)

    def to_unit(self, t: Tensor | float | Sequence[float]) -> Tensor:
        t = as_time(t)
        if self.mu is not None:
            return inverse_dynamic_shift(t, self.mu)
        return inverse_static_shift(t, self.shift)

    @property
    def t_clean(self) -> float:
        return 0.0

    def _velocity_to_x0(self, pred: Tensor, x_t: Tensor, a: Tensor, s: Tensor) -> Tensor:
        return x_t - s * pred

    def _velocity_target(self, x0: Tensor, eps: Tensor) -> Tensor:
        return flow_velocity(x0, eps)

    def unshifted(self, u: Tensor | float | Sequence[float]) -> Tensor:
        return as_time(u)

    def default_training_time(self, n: int, generator: torch.Generator | None, device: torch.device | str,
                              table: bool = True) -> Tensor:
        """SD3/FLUX training law: ``u ~`` logit-normal(0, 1).

        ``table=True`` (the released SenseFlow trainers and diffusers' SD3 scripts): ``u`` indexes
        the scheduler's sigma table, ``sigma = table[floor(1000 u)]`` with ``table[i] = shift((1000 - i)
        / 1000)``.  ``FlowMatchEulerDiscreteScheduler`` bakes a static shift into that table at
        construction but not FLUX's dynamic one, so SD3 (shift 3) gets shift3(logit-normal) (median
        sigma 0.75) and FLUX the unshifted law.  ``table=False``: logit-normal on native time.
        """
        u = logit_normal(n, 0.0, 1.0, generator, device)
        if not table:
            return u
        T = self.num_train_timesteps
        idx = torch.floor(u * T).clamp(0, T - 1)
        s = (T - idx) / T
        return s if self.mu is not None else static_shift(s, self.shift)


class DDPM(NoiseSchedule):
    """Discrete variance-preserving schedule from ``alphas_cumprod`` (SDXL and friends).

    Native time is the integer index as a float; unit time ``u`` maps to ``round(u T) - 1`` so
    that ``{1, .75, .5, .25}`` gives the SDXL anchors ``{999, 749, 499, 249}`` and ``u = 0`` gives
    ``-1``, which stands for clean data.
    """

    def __init__(self, alphas_cumprod: Tensor, prediction: str = "epsilon") -> None:
        if prediction == "velocity":
            raise ValueError("DDPM schedules use 'epsilon', 'v' or 'x0' predictions")
        super().__init__(prediction)
        abar = as_time(alphas_cumprod).cpu()
        if abar.ndim != 1 or len(abar) < 2 or not bool(((abar > 0) & (abar <= 1)).all()):
            raise ValueError("alphas_cumprod must be a 1-D tensor of values in (0, 1]")
        # prepend the clean state so index -1 is looked up at position 0
        self._abar = torch.cat([torch.ones(1, dtype=torch.float64), abar])
        self.num_train_timesteps = len(abar)

    @classmethod
    def scaled_linear(cls, beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000,
                      prediction: str = "epsilon") -> "DDPM":
        """The SD / SDXL schedule."""
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1.0 - betas, dim=0), prediction)

    def __repr__(self) -> str:
        return f"DDPM(T={self.num_train_timesteps}, prediction={self.prediction!r})"

    def _lookup(self, t: Tensor) -> Tensor:
        t = as_time(t)
        idx = torch.round(t).long().clamp(-1, self.num_train_timesteps - 1) + 1
        return self._abar.to(t.device)[idx]

    def alpha(self, t: Tensor) -> Tensor:
        return self._lookup(t).sqrt()

    def sigma(self, t: Tensor) -> Tensor:
        return (1.0 - self._lookup(t)).clamp_min(0).sqrt()

    def from_unit(self, u: Tensor | float | Sequence[float]) -> Tensor:
        u = as_time(u)
        return (torch.round(u * self.num_train_timesteps) - 1).clamp(-1, self.num_train_timesteps - 1)

    def to_unit(self, t: Tensor | float | Sequence[float]) -> Tensor:
        return (as_time(t) + 1.0) / self.num_train_timesteps

    @property
    def t_clean(self) -> float:
        return -1.0

    def default_training_time(self, n: int, generator: torch.Generator | None, device: torch.device | str,
                              table: bool = True) -> Tensor:
        """Uniform integer index in ``{0..T-1}``."""
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=device).to(torch.float64)


class TrigFlow(NoiseSchedule):
    """``x = cos(s) x0 + sin(s) eps``, ``s in [0, pi/2]`` (SANA-Sprint); F-prediction is ``v`` here."""

    def __init__(self, prediction: str = "v") -> None:
        if prediction == "velocity":
            raise ValueError("TrigFlow uses 'v' (its F prediction), 'epsilon' or 'x0'")
        super().__init__(prediction)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.cos(as_time(t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sin(as_time(t))

    def from_unit(self, u: Tensor | float | Sequence[float]) -> Tensor:
        """Unit time is rectified-flow time: ``s = atan(u / (1 - u))``."""
        u = as_time(u)
        return torch.atan2(u, 1.0 - u)

    def to_unit(self, t: Tensor | float | Sequence[float]) -> Tensor:
        s = as_time(t)
        return torch.sin(s) / (torch.sin(s) + torch.cos(s))

    @property
    def t_clean(self) -> float:
        return 0.0

    def default_training_time(self, n: int, generator: torch.Generator | None, device: torch.device | str,
                              table: bool = True) -> Tensor:
        return self.from_unit(logit_normal(n, 0.0, 1.0, generator, device))


# ---------------------------------------------------------------------------------------------
# Time samplers
# ---------------------------------------------------------------------------------------------
def uniform(n: int, low: float, high: float, generator: torch.Generator | None = None,
            device: torch.device | str = "cpu") -> Tensor:
    """``U(low, high)`` in float64."""
    return low + (high - low) * torch.rand(n, generator=generator, device=device, dtype=torch.float64)


def logit_normal(n: int, mean: float, std: float, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> Tensor:
    """``sigmoid(N(mean, std^2))`` in float64."""
    z = torch.randn(n, generator=generator, device=device, dtype=torch.float64)
    return torch.sigmoid(mean + std * z)


@dataclass(frozen=True)
class TimeSampler:
    """A timestep law: ``kind`` in ``uniform`` / ``logit_normal`` / ``teacher``, drawn in unit time.

    ``shift=True`` maps the draw through the schedule's ``from_unit`` (shift / DDPM index);
    ``shift=False`` uses the draw as native time directly (e.g. FLUX's unshifted logit-normal DMD
    times).  ``teacher`` defers to the schedule's own training law (``shift`` then selects its
    released table form, see :meth:`NoiseSchedule.default_training_time`).  ``low``/``high`` clip
    the unit-time range (DMD: 0.02..0.98).  ``discrete`` (uniform only): draw the integer index
    ``i`` uniformly in ``{round(1000 low) .. round(1000 high)}`` and use ``u = (i + 1) / 1000``, as
    the released DMD2 / SenseFlow trainers do (``randint(20, 981)``: SDXL index 20..980, SD3.5
    ``sigmas[i] = shift((i + 1) / 1000)``).
    """

    kind: str = "uniform"
    low: float = 0.0
    high: float = 1.0
    mean: float = 0.0
    std: float = 1.0
    shift: bool = True
    discrete: bool = False

    def sample(self, n: int, schedule: NoiseSchedule, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> Tensor:
        if self.kind == "teacher":
            return schedule.default_training_time(n, generator, device, table=self.shift)
        if self.kind == "uniform" and self.discrete:
            T = schedule.num_train_timesteps
            lo, hi = round(self.low * T), round(self.high * T)
            i = torch.randint(lo, hi + 1, (n,), generator=generator, device=device).to(torch.float64)
            u = (i + 1.0) / T
        elif self.kind == "uniform":
            u = uniform(n, self.low, self.high, generator, device)
        elif self.kind == "logit_normal":
            u = logit_normal(n, self.mean, self.std, generator, device).clamp(self.low, self.high)
        else:
            raise ValueError(f"unknown time sampler {self.kind!r}")
        return schedule.from_unit(u) if self.shift else u


def anchors(schedule: NoiseSchedule, units: Sequence[float]) -> Tensor:
    """Native anchor times for unit anchors (e.g. ``[1, .75, .5, .25]`` -> SD3.5's ``[1, .9, .75, .5]``)."""
    return schedule.from_unit(list(units))


def sid_anchors(num_steps: int) -> list[float]:
    """SiD-DiT's unshifted anchors ``t_k = 1 - (k - 1) / K``, ``k = 1..K``."""
    return [1.0 - k / num_steps for k in range(num_steps)]
