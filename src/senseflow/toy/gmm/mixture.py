"""Class-conditional Gaussian mixtures with the exact rectified-flow posterior mean.

Why: on a mixture the data distribution, its noised marginals and ``E[x0 | x_t, class]`` are
known in closed form, so a distilled student can be judged against the truth instead of against
another network.  With ``x_t = (1 - t) x0 + t eps`` and component ``k`` = ``N(mu_k, S_k)``:

* ``x_t | k ~ N(a mu_k, a^2 S_k + s^2 I)`` with ``a = 1 - t``, ``s = t``;
* ``E[x0 | x_t, k] = mu_k + a S_k (a^2 S_k + s^2 I)^-1 (x_t - a mu_k)``;
* ``E[x0 | x_t, c] = sum_k r_k E[x0 | x_t, k]`` with responsibilities
  ``r_k ∝ w_k N(x_t; a mu_k, a^2 S_k + s^2 I)`` over the components of class ``c``.

Every covariance is held through its eigendecomposition ``S = U diag(l) U^T`` so the noised
covariance ``U diag(a^2 l + s^2) U^T`` is inverted exactly at every ``t``, ``t = 0`` and ``t = 1``
included.  A *class weighting* (a probability vector over classes per sample, or all zeros for
"no class": the class prior) selects the mixture, so the unconditional branch of CFG is the
exact marginal too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ...teachers.base import SenseflowError


@dataclass
class GaussianMixture:
    """``C`` classes of ``M`` Gaussian components each in ``D`` dimensions (all float64).

    ``means [C, M, D]``, ``eigvecs [C, M, D, D]`` and ``eigvals [C, M, D]`` (covariance
    ``U diag(l) U^T``), component weights ``weights [C, M]`` (rows sum to 1) and the class prior
    ``class_prior [C]``.
    """

    means: Tensor
    eigvecs: Tensor
    eigvals: Tensor
    weights: Tensor
    class_prior: Tensor

    def __post_init__(self) -> None:
        c, m, d = self.means.shape
        if self.eigvecs.shape != (c, m, d, d) or self.eigvals.shape != (c, m, d):
            raise SenseflowError(f"mixture: covariances must be [C, M, D, D] for means [C, M, D] = {[c, m, d]}")
        if self.weights.shape != (c, m) or self.class_prior.shape != (c,):
            raise SenseflowError("mixture: weights must be [C, M] and class_prior [C]")
        if bool((self.eigvals <= 0).any()):
            raise SenseflowError("mixture: covariances must be positive definite")
        ones = torch.ones(c, dtype=torch.float64)
        if bool((self.weights < 0).any()) or not torch.allclose(self.weights.sum(1), ones):
            raise SenseflowError("mixture: each class's component weights must be >= 0 and sum to 1")

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_covariances(cls, means: Tensor, covariances: Tensor, weights: Tensor | None = None,
                         class_prior: Tensor | None = None) -> "GaussianMixture":
        """Build from full covariances ``[C, M, D, D]`` (symmetric positive definite)."""
        means = torch.as_tensor(means, dtype=torch.float64)
        cov = torch.as_tensor(covariances, dtype=torch.float64)
        c, m, _ = means.shape
        vals, vecs = torch.linalg.eigh(0.5 * (cov + cov.transpose(-1, -2)))
        w = torch.full((c, m), 1.0 / m, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64)
        prior = torch.full((c,), 1.0 / c, dtype=torch.float64) if class_prior is None else \
            torch.as_tensor(class_prior, dtype=torch.float64)
        return cls(means, vecs, vals, w, prior)

    @classmethod
    def random(cls, dim: int = 16, classes: int = 4, modes_per_class: int = 5, seed: int = 0,
               spread: float = 0.5, scale: tuple[float, float] = (0.05, 0.15),
               weight_concentration: float | None = 5.0) -> "GaussianMixture":
        """A random well-separated mixture: means ``~ N(0, spread^2 I)`` (in D = 16 the modes of a
        class lie ~5.7 spread apart, components ~0.1 wide),
        anisotropic covariances with standard deviations in ``scale`` along random axes, and
        Dirichlet(``weight_concentration``) component weights (``None``: equal weights).

        Unequal weights make mode-weight drift visible; anisotropy makes the ellipsoid test
        sharper than a ball.
        """
        if dim < 1 or classes < 1 or modes_per_class < 1:
            raise SenseflowError("mixture: dim, classes and modes_per_class must be >= 1")
        if not 0 < scale[0] <= scale[1]:
            raise SenseflowError(f"mixture: scale must be 0 < low <= high, got {scale}")
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(classes, modes_per_class, dim, generator=g, dtype=torch.float64) * spread
        q, _ = torch.linalg.qr(torch.randn(classes, modes_per_class, dim, dim, generator=g, dtype=torch.float64))
        u = torch.rand(classes, modes_per_class, dim, generator=g, dtype=torch.float64)
        std = scale[0] + (scale[1] - scale[0]) * u
        if weight_concentration is None:
            w = torch.full((classes, modes_per_class), 1.0 / modes_per_class, dtype=torch.float64)
        else:
            w = _gamma(classes, modes_per_class, float(weight_concentration), g)
            w = w / w.sum(1, keepdim=True)
        prior = torch.full((classes,), 1.0 / classes, dtype=torch.float64)
        return cls(means, q, std.pow(2), w, prior)

    # -- shapes --------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return int(self.means.shape[0])

    @property
    def modes_per_class(self) -> int:
        return int(self.means.shape[1])

    @property
    def dim(self) -> int:
        return int(self.means.shape[2])

    @property
    def covariances(self) -> Tensor:
        return self.eigvecs @ torch.diag_embed(self.eigvals) @ self.eigvecs.transpose(-1, -2)

    def shifted(self, offset: float) -> "GaussianMixture":
        """The same mixture with every mean moved by ``offset`` along the first axis (a test of the metrics)."""
        means = self.means.clone()
        means[..., 0] += offset
        return GaussianMixture(means, self.eigvecs, self.eigvals, self.weights, self.class_prior)

    # -- sampling ------------------------------------------------------------------------------------
    def sample_labels(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.multinomial(self.class_prior, n, replacement=True, generator=generator)

    def sample(self, labels: Tensor, generator: torch.Generator | None = None,
               return_modes: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """One draw ``x0 ~ p(x0 | class)`` per label (float64 ``[N, D]``)."""
        labels = labels.long().cpu()
        n = labels.shape[0]
        modes = torch.multinomial(self.weights[labels], 1, replacement=True, generator=generator).squeeze(1)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        vecs = self.eigvecs[labels, modes]
        x = self.means[labels, modes] + (vecs @ (self.eigvals[labels, modes].sqrt() * z).unsqueeze(-1)).squeeze(-1)
        return (x, modes) if return_modes else x

    # -- densities -----------------------------------------------------------------------------------
    def class_weights(self, labels: Tensor) -> Tensor:
        """Per-sample class weighting ``[N, C]`` from integer labels ``[N]`` or weightings ``[N, C]``.

        A row of zeros means "no class" and becomes the class prior (CFG's unconditional branch).
        """
        if labels.ndim == 1:
            return torch.nn.functional.one_hot(labels.long().cpu(), self.num_classes).to(torch.float64)
        w = labels.detach().to(torch.float64).cpu()
        if w.shape[1] != self.num_classes:
            raise SenseflowError(f"mixture: class weighting has {w.shape[1]} columns for {self.num_classes} classes")
        total = w.sum(1, keepdim=True)
        return torch.where(total > 0, w / total.clamp_min(1e-300), self.class_prior.expand_as(w))

    def _component_terms(self, x: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For every sample and EVERY component: log N(x; a mu, a^2 S + s^2 I), the rotated residual
        ``z = U^T (x - a mu)``, the noised eigenvalues and ``a`` (shapes ``[N, C, M]``, ``[N, C, M, D]``, ...)."""
        x = x.to(torch.float64).cpu()
        n = x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float64).cpu().expand(n) if not isinstance(t, Tensor) or t.ndim == 0 \
            else t.to(torch.float64).cpu()
        a = (1.0 - t).reshape(n, 1, 1, 1)
        s = t.reshape(n, 1, 1, 1)
        resid = x[:, None, None, :] - a * self.means[None]  # [N, C, M, D]
        z = torch.einsum("cmde,ncmd->ncme", self.eigvecs, resid)
        var = a * a * self.eigvals[None] + s * s  # [N, C, M, D]
        logn = -0.5 * (z * z / var).sum(-1) - 0.5 * torch.log(2 * math.pi * var).sum(-1)
        return logn, z, var, a

    def log_prob(self, x: Tensor, labels: Tensor, t: Tensor | float = 0.0) -> Tensor:
        """``log p_t(x | class)`` of the noised mixture (``t = 0``: the data density), ``[N]``."""
        logn, _, _, _ = self._component_terms(x, t)
        cw = self.class_weights(labels)
        logw = torch.log(cw[:, :, None] * self.weights[None]).flatten(1)  # [N, C*M], -inf where excluded
        return torch.logsumexp(logw + logn.flatten(1), dim=1)

    def posterior_mean(self, x_t: Tensor, t: Tensor | float, labels: Tensor) -> Tensor:
        """Exact ``E[x0 | x_t, class]`` (float64 ``[N, D]``; see the module docstring)."""
        logn, z, var, a = self._component_terms(x_t, t)
        cw = self.class_weights(labels)
        logits = (torch.log(cw[:, :, None] * self.weights[None]) + logn).flatten(1)
        r = torch.softmax(logits, dim=1).reshape(logn.shape)  # [N, C, M]
        gain = a * self.eigvals[None] / var  # [N, C, M, D]: a l / (a^2 l + s^2)
        delta = torch.einsum("cmde,ncme->ncmd", self.eigvecs, gain * z)
        comp_mean = self.means[None] + delta
        return (r[..., None] * comp_mean).sum((1, 2))

    def component_log_probs(self, x: Tensor) -> Tensor:
        """``log w_k + log N(x; mu_k, S_k)`` for every component, ``[N, C, M]`` (clean data)."""
        logn, _, _, _ = self._component_terms(x, 0.0)
        return torch.log(self.weights)[None] + logn

    def mahalanobis_sq(self, x: Tensor) -> Tensor:
        """Squared Mahalanobis distance of every sample to every component, ``[N, C, M]``."""
        _, z, var, _ = self._component_terms(x, 0.0)
        return (z * z / var).sum(-1)


def _gamma(rows: int, cols: int, concentration: float, g: torch.Generator) -> Tensor:
    """Gamma(k, 1) draws from a seeded generator (Marsaglia-Tsang; torch's Gamma takes no generator)."""
    k = concentration if concentration >= 1 else concentration + 1.0
    d = k - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(rows * cols, dtype=torch.float64)
    for i in range(rows * cols):
        while True:
            x = float(torch.randn(1, generator=g, dtype=torch.float64))
            v = (1.0 + c * x) ** 3
            u = float(torch.rand(1, generator=g, dtype=torch.float64))
            if v > 0 and math.log(u) < 0.5 * x * x + d - d * v + d * math.log(v):
                out[i] = d * v
                break
        if concentration < 1:
            out[i] *= float(torch.rand(1, generator=g, dtype=torch.float64)) ** (1.0 / concentration)
    return out.reshape(rows, cols)
