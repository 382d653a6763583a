"""Exact quality measures of class-conditional samples against the true mixture.

Each number answers one question a picture would raise:

* ``class_acc`` -- does the sample belong to the class it was asked for (Bayes classifier over all
  components of all classes, class prior included)?
* ``precision`` -- is it inside a true component's 99% ellipsoid (``Mahalanobis^2 <= chi2_D(0.99)``)
  of its class?  Floor on true samples: 0.99 (a little more where ellipsoids overlap).
* ``coverage`` -- share of the (class, mode) pairs that receive at least ``coverage_share`` of
  their expected number of *precise* samples.
* ``mode_tv`` -- total variation between the true mode weights and the generated ones (each sample
  assigned to its most responsible mode within its class), averaged over classes.
* ``recall`` -- k-NN recall (Kynkäänniemi et al. 2019): share of true samples inside some generated
  sample's k-NN ball, per class.
* ``sw2`` -- sliced Wasserstein-2 to fresh true samples of the same classes (fixed projections),
  per class, averaged over classes.
* ``log_density`` -- mean ``log p(x | class)`` (higher = samples sit nearer the mode centres).
"""

from __future__ import annotations

import torch
from scipy.stats import chi2
from torch import Tensor

from .mixture import GaussianMixture

METRICS: tuple[str, ...] = ("class_acc", "precision", "coverage", "mode_tv", "recall", "sw2", "log_density")


def sliced_w2(x: Tensor, y: Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 between two equal-size samples (random unit directions, sorted projections)."""
    if x.shape != y.shape:
        n = min(len(x), len(y))
        x, y = x[:n], y[:n]
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x.to(torch.float64) @ dirs, dim=0)
    py, _ = torch.sort(y.to(torch.float64) @ dirs, dim=0)
    return float((px - py).pow(2).mean().sqrt())


def knn_recall(real: Tensor, fake: Tensor, k: int = 5) -> float:
    """Share of ``real`` points within the k-NN radius (among ``fake``) of some ``fake`` point."""
    fake = fake.to(torch.float64)
    real = real.to(torch.float64)
    d_ff = torch.cdist(fake, fake)
    radius = d_ff.kthvalue(min(k + 1, len(fake)), dim=1).values  # +1: the point itself
    d_rf = torch.cdist(real, fake)
    return float((d_rf <= radius[None]).any(dim=1).double().mean())


def evaluate(mixture: GaussianMixture, samples: Tensor, labels: Tensor, reference: Tensor | None = None,
             generator: torch.Generator | None = None, coverage_share: float = 0.25, k: int = 5,
             projections: int = 256, recall_samples: int = 2000) -> dict[str, float]:
    """All of :data:`METRICS` for ``samples [N, D]`` drawn for ``labels [N]``.

    ``reference``: true samples for the same labels (drawn here from ``generator`` when absent),
    used by SW2 and recall only.
    """
    x = samples.detach().to(torch.float64).cpu()
    labels = labels.long().cpu()
    n = len(x)
    if reference is None:
        reference = mixture.sample(labels, generator)
    finite = torch.isfinite(x).all(dim=1)
    x = torch.where(finite[:, None], x, torch.full_like(x, 1e6))  # non-finite samples count as misses
    comp = mixture.component_log_probs(x)  # [N, C, M]
    joint = comp + torch.log(mixture.class_prior)[None, :, None]
    class_acc = float((joint.flatten(1).argmax(1) // mixture.modes_per_class == labels).double().mean())
    own = comp[torch.arange(n), labels]  # [N, M]
    maha = mixture.mahalanobis_sq(x)[torch.arange(n), labels]
    inside = maha <= float(chi2.ppf(0.99, mixture.dim))
    precise = inside.any(dim=1)
    mode = own.argmax(dim=1)
    covered, tvs, sw, rec = 0, [], [], []
    for c in range(mixture.num_classes):
        sel = labels == c
        nc = int(sel.sum())
        if nc == 0:
            continue
        counts = torch.bincount(mode[sel], minlength=mixture.modes_per_class).double()
        tvs.append(float(0.5 * (counts / nc - mixture.weights[c]).abs().sum()))
        precise_counts = torch.bincount(mode[sel & precise], minlength=mixture.modes_per_class).double()
        covered += int((precise_counts >= coverage_share * nc * mixture.weights[c]).sum())
        sw.append(sliced_w2(x[sel], reference[sel], projections, seed=c))
        if nc > k:  # at most recall_samples per class: cdist is quadratic
            rec.append(knn_recall(reference[sel][:recall_samples], x[sel][:recall_samples], k))
    present = [c for c in range(mixture.num_classes) if bool((labels == c).any())]
    logp = mixture.log_prob(x, labels)
    return {
        "class_acc": class_acc,
        "precision": float(precise.double().mean()),
        "coverage": covered / (len(present) * mixture.modes_per_class),
        "mode_tv": sum(tvs) / len(tvs),
        "recall": sum(rec) / len(rec) if rec else float("nan"),
        "sw2": sum(sw) / len(sw),
        "log_density": float(logp.clamp_min(-1e4).mean()),
    }


def mode_shape(mixture: GaussianMixture, samples: Tensor, labels: Tensor, inside_only: bool = True) -> Tensor:
    """Per-axis spread of the samples relative to the true components, axes ranked narrowest first, ``[D]``.

    Why: precision counts a sample outside its ellipsoid but not *which way* it left.  Each sample is
    assigned to its own class's nearest component (Mahalanobis); along that component's eigen-axes its
    whitened squared residual ``z_i^2 / lambda_i`` is 1 in expectation for true samples.  The mean over
    samples, with the axes of every component ordered from the smallest variance to the largest, says
    whether a student is too wide along the narrow axes (> 1 at the front: the finest structure is
    blurred) or too tight along the wide ones (< 1 at the back: mode seeking).  ``inside_only``: average
    over the samples inside the 99% ellipsoid (the shape of the modes, not of the trails between them).
    """
    x = samples.detach().to(torch.float64).cpu()
    n = len(x)
    rows = torch.arange(n)
    _, z, var, _ = mixture._component_terms(x, 0.0)
    whitened = (z * z / var)[rows, labels.long().cpu()]  # [N, M, D]
    nearest = whitened.sum(-1).argmin(1)
    per_axis = whitened[rows, nearest]  # [N, D]
    order = mixture.eigvals[labels.long().cpu(), nearest].argsort(dim=1)
    ranked = torch.gather(per_axis, 1, order)
    if inside_only:
        ranked = ranked[per_axis.sum(1) <= float(chi2.ppf(0.99, mixture.dim))]
    return ranked.mean(0) if len(ranked) else torch.full((mixture.dim,), float("nan"), dtype=torch.float64)


def outlier_profile(mixture: GaussianMixture, samples: Tensor, labels: Tensor, far: float = 2.0,
                    min_samples: int = 50) -> dict[str, float]:
    """Where the imprecise samples are, and what is wrong with the modes that hold the precise ones.

    Why: ``precision`` counts samples outside every 99% ellipsoid of their class, and ``mode_shape``
    says which axes are too wide, but neither tells a mode displaced from its true centre from one too
    wide around it, nor a sample that slipped past the edge of a mode from one stranded between two.
    Each sample is assigned to its class's nearest component (Mahalanobis^2 ``m2``; ``thr`` = the
    chi^2_D 99% threshold):

    * ``outside``: share with ``m2 > thr`` (1 - precision, up to ellipsoid overlaps); ``near``: with
      ``thr < m2 <= far * thr``; ``far``: beyond;
    * ``trail``: of the ``far`` samples, the share whose projection on the segment from their nearest
      component's mean to the second nearest's falls strictly inside it (10%-90%): stranded between
      two modes, the smear of a continuous map across a basin boundary;
    * over the (class, mode) pairs holding >= ``min_samples`` samples with ``m2 <= far * thr``:
      ``centre_offset``, the mean Euclidean distance of their sample mean from the true mean, and, along
      the component's 25% narrowest eigen-axes in units of each axis's true variance, ``narrow_offset2``
      (the squared whitened offset of the mean) and ``narrow_var`` (the whitened variance around the
      sample mean): ``mode_shape``'s narrow-axis excess is ``narrow_offset2 + narrow_var`` roughly.
    """
    x = samples.detach().to(torch.float64).cpu()
    labels = labels.long().cpu()
    n, d = x.shape
    rows = torch.arange(n)
    thr = float(chi2.ppf(0.99, mixture.dim))
    _, z, var, _ = mixture._component_terms(x, 0.0)
    m2 = (z * z / var)[rows, labels].sum(-1)  # [N, M]
    order = m2.argsort(dim=1)
    nearest, second = order[:, 0], order[:, 1]
    d1 = m2[rows, nearest]
    is_far = d1 > far * thr
    mu = mixture.means.to(torch.float64)
    ma, mb = mu[labels, nearest], mu[labels, second]
    along = ((x - ma) * (mb - ma)).sum(1) / ((mb - ma) ** 2).sum(1)
    trail = is_far & (along > 0.1) & (along < 0.9)
    q = max(1, d // 4)
    offsets, narrow_off, narrow_var = [], [], []
    for c in range(mixture.num_classes):
        for m in range(mixture.modes_per_class):
            sel = (labels == c) & (nearest == m) & ~is_far
            if int(sel.sum()) < max(2, min_samples):
                continue
            lam = mixture.eigvals[c, m].to(torch.float64)
            narrow = lam.argsort()[:q]
            zc = z[rows[sel], c, m][:, narrow] / lam[narrow].sqrt()
            offsets.append(float((x[sel].mean(0) - mu[c, m]).norm()))
            narrow_off.append(float(zc.mean(0).pow(2).mean()))
            narrow_var.append(float(zc.var(0).mean()))

    def mean(v: list[float]) -> float:
        return sum(v) / len(v) if v else float("nan")

    n_far = int(is_far.sum())
    return {
        "outside": float((d1 > thr).double().mean()),
        "near": float(((d1 > thr) & ~is_far).double().mean()),
        "far": n_far / n,
        "trail": float(trail.sum()) / n_far if n_far else float("nan"),
        "centre_offset": mean(offsets),
        "narrow_offset2": mean(narrow_off),
        "narrow_var": mean(narrow_var),
    }
