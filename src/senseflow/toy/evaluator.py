"""The toy world's built-in evaluator: a small CNN that reads each grid cell, plus metrics.

Why: distillation on the toy world must be *measured* (prompt following, distribution match,
diversity) on CPU, with no Inception/CLIP weights available.  Because every toy prompt states
exactly what should be in which grid cell, a classifier trained on procedural images gives an exact
prompt-following score, and its penultimate features serve as the embedding for Fréchet distances.

Classifier formulation: for each of the 9 grid cells, a 6-way head (empty or one of the 5 shapes),
a 6-way colour head and a 2-way size head (both trained on occupied cells only), plus a 3-way
background head.  Pure PyTorch (no torchvision), ~270k parameters (~1.1 MB); weights ship as
safetensors in ``senseflow/assets/toy/evaluator`` with a JSON describing how they were trained and
measured.

Metric definitions (all computed by :meth:`ToyEvaluator.evaluate`):

* ``attr_acc``: mean over every attribute check of every prompt.  Per shape named in the prompt:
  ``position`` (its cell is predicted occupied), ``shape`` (the cell's 6-way prediction is that
  shape), ``color`` and ``size`` (cell occupied *and* the head agrees; an absent shape fails all
  four).  A shape whose prompt leaves the position open is judged in the best-matching occupied
  cell that no other named shape claims (``position`` then means "it is there at all").  Per
  prompt: ``background`` and ``count`` (exactly as many cells occupied as shapes named, so extra
  shapes are penalised).  ``exact`` is the fraction of images passing all their checks.
* ``fd_real``: Fréchet distance (torchmetrics ``FrechetInceptionDistance`` with this classifier's
  144-d penultimate features, 9 cells x 16, instead of Inception's) between the images and *real*
  procedural images of the same prompts (``parse_caption`` + ``render_batch`` with random placements from a
  fixed seed), so it measures distribution match at a fixed prompt mix.  Like FID it is biased
  at small n: compare values only at equal sample counts.
* ``fd_teacher``: the same against teacher samples, when given.
* ``diversity``: mean pairwise L2 distance of features among samples that share a prompt, averaged
  over prompts with >= 2 samples (NaN if none); 0 means every prompt collapsed to one image.
  ``diversity_all`` is the same over all pairs of samples, and ``pixel_diversity`` the within-prompt
  mean pairwise RMS pixel distance (placement and shade variation of real data shows up here).
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .world import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, Scene, parse_caption, render_batch

N_CELLS = len(POSITIONS)
N_SHAPE_CLASSES = len(SHAPES) + 1  # class 0 = empty cell
IGNORE = -100
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy" / "evaluator"
WEIGHTS_NAME = "evaluator.safetensors"
INFO_NAME = "evaluator.json"
DEFAULT_CHANNELS = (32, 48, 64, 96)
CELL_DIM = 16


# ------------------------------------------------------------------------------------------------
# Labels
# ------------------------------------------------------------------------------------------------
def scene_labels(scenes: Sequence[Scene]) -> dict[str, Tensor]:
    """Per-cell targets: ``shape`` [B,9] (0 empty, 1+SHAPES index), ``color``/``size`` [B,9]
    (IGNORE on empty cells) and ``background`` [B]."""
    n = len(scenes)
    shape = torch.zeros(n, N_CELLS, dtype=torch.long)
    color = torch.full((n, N_CELLS), IGNORE, dtype=torch.long)
    size = torch.full((n, N_CELLS), IGNORE, dtype=torch.long)
    colors, backgrounds = list(COLORS), list(BACKGROUNDS)
    for i, scene in enumerate(scenes):
        for s in scene.shapes:
            shape[i, s.cell] = 1 + SHAPES.index(s.shape)
            color[i, s.cell] = colors.index(s.color)
            size[i, s.cell] = SIZES.index(s.size)
    background = torch.tensor([backgrounds.index(s.background) for s in scenes], dtype=torch.long)
    return {"shape": shape, "color": color, "size": size, "background": background}


# ------------------------------------------------------------------------------------------------
# Network
# ------------------------------------------------------------------------------------------------
def _conv(cin: int, cout: int, stride: int = 1, padding: int = 1) -> nn.Sequential:
    # GroupNorm (not BatchNorm): predictions must not depend on what else is in the batch.
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=padding),
                         nn.GroupNorm(8, cout), nn.SiLU())


class AttributeNet(nn.Module):
    """CNN: 32 px (replicate-padded to 36) -> 9x9 map -> 3x3-stride-3 conv: one vector per grid
    cell -> shared per-cell MLP -> ``cell_dim`` features per cell -> per-cell shape/colour/size
    logits (1x1 convs, shared by all cells); background logits from the globally pooled map.

    Padding 32 to 36 makes the 9x9 map split into 3x3 blocks that line up with the 3x3 prompt grid,
    and sharing the cell head across cells gives every cell nine times the training signal.
    ``features`` (the penultimate layer) is the 9 cells' features flattened: ``9 * cell_dim`` dims.
    Images are expected in [-1, 1] (clamped: a generator may overshoot).
    """

    def __init__(self, channels: Sequence[int] = DEFAULT_CHANNELS, cell_dim: int = CELL_DIM) -> None:
        super().__init__()
        c1, c2, c3, c4 = channels
        self.trunk = nn.Sequential(_conv(3, c1), _conv(c1, c2, 2), _conv(c2, c3), _conv(c3, c4, 2),
                                   _conv(c4, c4))
        self.cells = nn.Sequential(_conv(c4, c4, stride=3, padding=0), nn.Conv2d(c4, cell_dim, 1), nn.SiLU())
        self.cell_head = nn.Conv2d(cell_dim, N_SHAPE_CLASSES + len(COLORS) + len(SIZES), 1)
        self.background_head = nn.Linear(c4, len(BACKGROUNDS))
        self.cell_dim = cell_dim
        self.num_features = cell_dim * N_CELLS

    def _prepare(self, images: Tensor) -> Tensor:
        x = images.float().clamp(-1.0, 1.0)
        if x.shape[-2:] != (32, 32):
            x = F.interpolate(x, size=(32, 32), mode="area")
        return F.pad(x, (2, 2, 2, 2), mode="replicate")

    def features(self, images: Tensor) -> Tensor:
        """Penultimate features ``[B, 9 * cell_dim]`` (cell-major)."""
        return self.cells(self.trunk(self._prepare(images))).flatten(2).transpose(1, 2).flatten(1)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        h = self.trunk(self._prepare(images))
        cell = self.cell_head(self.cells(h)).flatten(2).transpose(1, 2)  # [B, 9, 14]
        n_s, n_c = N_SHAPE_CLASSES, len(COLORS)
        return {
            "shape": cell[..., :n_s],
            "color": cell[..., n_s:n_s + n_c],
            "size": cell[..., n_s + n_c:],
            "background": self.background_head(h.mean(dim=(2, 3))),
        }


def classifier_loss(logits: dict[str, Tensor], labels: dict[str, Tensor]) -> Tensor:
    """Sum of the four cross-entropies (colour/size only on occupied cells)."""
    loss = F.cross_entropy(logits["shape"].flatten(0, 1), labels["shape"].flatten())
    loss = loss + F.cross_entropy(logits["color"].flatten(0, 1), labels["color"].flatten(), ignore_index=IGNORE)
    loss = loss + F.cross_entropy(logits["size"].flatten(0, 1), labels["size"].flatten(), ignore_index=IGNORE)
    return loss + F.cross_entropy(logits["background"], labels["background"])


def classifier_accuracy(logits: dict[str, Tensor], labels: dict[str, Tensor]) -> dict[str, float]:
    """Raw per-head accuracies against ground-truth labels (the numbers the shipped JSON reports).

    ``occupancy``: empty-vs-occupied over all cells; ``shape``/``color``/``size``: over occupied
    cells; ``background``: per image; ``image``: all 9 cells' heads and the background right.
    """
    occ_true = labels["shape"] > 0
    shape_pred = logits["shape"].argmax(-1)
    color_pred = logits["color"].argmax(-1)
    size_pred = logits["size"].argmax(-1)
    bg_ok = logits["background"].argmax(-1) == labels["background"]
    cell_ok = (shape_pred == labels["shape"]) & (~occ_true | ((color_pred == labels["color"])
                                                             & (size_pred == labels["size"])))
    return {
        "occupancy": ((shape_pred > 0) == occ_true).float().mean().item(),
        "shape": (shape_pred == labels["shape"])[occ_true].float().mean().item(),
        "color": (color_pred == labels["color"])[occ_true].float().mean().item(),
        "size": (size_pred == labels["size"])[occ_true].float().mean().item(),
        "background": bg_ok.float().mean().item(),
        "image": (cell_ok.all(-1) & bg_ok).float().mean().item(),
    }


def paired_gain(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor], prompts: Sequence[str],
                num_resamples: int = 2000, seed: int = 0) -> dict[str, float | list[float] | int]:
    """``attr_acc`` of model a minus model b, judged on the same images' prompts and noise, with a 95%
    bootstrap interval that resamples *prompts* (all samples of a prompt together).

    ``a`` and ``b`` are :meth:`ToyEvaluator.checks_per_image` results for the same ``prompts``.  Why
    paired and by prompt: some prompts are hard for every model, so per-sample noise is correlated;
    resampling prompts keeps that correlation and answers "would the gain hold on other prompts?".
    """
    (pa, ma), (pb, mb) = a, b
    if not (len(prompts) == pa.numel() == pb.numel() and torch.equal(ma, mb)):
        raise ValueError("paired_gain needs both models judged on the same prompts (same checks per image)")
    index = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
    group = torch.tensor([index[p] for p in prompts])
    sums = [torch.zeros(len(index), dtype=torch.float64).index_add_(0, group, x.double()) for x in (pa, pb, ma)]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(index), (num_resamples, len(index)), generator=g)
    sa, sb, sm = (x[idx].sum(1) for x in sums)
    gains = (sa - sb) / sm
    lo, hi = torch.quantile(gains, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    gain = float((pa.sum() - pb.sum()) / ma.sum())
    return {"gain": round(gain, 5), "ci95": [round(lo, 5), round(hi, 5)], "num_prompts": len(index)}


class _FeatureModule(nn.Module):
    """Adapter for torchmetrics' FID: takes [0, 1] floats (``normalize=True``) and returns features."""

    def __init__(self, net: AttributeNet) -> None:
        super().__init__()
        self.net = net
        self.num_features = net.num_features

    @torch.no_grad()
    def forward(self, images01: Tensor) -> Tensor:
        return self.net.features(images01 * 2.0 - 1.0)


# ------------------------------------------------------------------------------------------------
# The evaluator
# ------------------------------------------------------------------------------------------------
CHECKS = ("position", "shape", "color", "size", "background", "count")


def _parse_all(prompts: Sequence[str | Scene]) -> list[Scene]:
    return [p if isinstance(p, Scene) else parse_caption(p) for p in prompts]


class ToyEvaluator:
    """Scores toy-world images against their prompts. Images: ``[B,3,H,W]`` in [-1, 1]."""

    def __init__(self, net: AttributeNet, batch_size: int = 512, reference_seed: int = 0) -> None:
        self.net = net.eval().requires_grad_(False)
        self.batch_size = batch_size
        self.reference_seed = reference_seed

    @classmethod
    def load(cls, path: str | Path | None = None, **kwargs) -> "ToyEvaluator":
        """Load the shipped weights (or a folder written by ``train_evaluator``) via safetensors."""
        from safetensors.torch import load_file

        folder = Path(path) if path is not None else ASSET_DIR
        weights, info_path = folder / WEIGHTS_NAME, folder / INFO_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder}; run python -m senseflow.toy.train_evaluator")
        arch = json.loads(info_path.read_text())["architecture"] if info_path.is_file() else {}
        net = AttributeNet(channels=tuple(arch.get("channels", DEFAULT_CHANNELS)),
                           cell_dim=int(arch.get("cell_dim", CELL_DIM)))
        net.load_state_dict(load_file(str(weights)), strict=True)
        return cls(net, **kwargs)

    # -- raw network access ------------------------------------------------------------------
    @torch.no_grad()
    def _chunks(self, images: Tensor, fn) -> Tensor | dict[str, Tensor]:
        outs = [fn(images[i:i + self.batch_size].cpu()) for i in range(0, images.shape[0], self.batch_size)]
        if isinstance(outs[0], dict):
            return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
        return torch.cat(outs)

    def predict(self, images: Tensor) -> dict[str, Tensor]:
        """Logits per head (``shape`` [B,9,6], ``color`` [B,9,6], ``size`` [B,9,2], ``background`` [B,3])."""
        return self._chunks(images, self.net)  # type: ignore[return-value]

    def features(self, images: Tensor) -> Tensor:
        """Penultimate features ``[B, 144]`` (used for Fréchet distances and diversity)."""
        return self._chunks(images, self.net.features)  # type: ignore[return-value]

    # -- prompt following --------------------------------------------------------------------
    def attribute_checks(self, images: Tensor, prompts: Sequence[str | Scene]) -> dict[str, list[bool]]:
        """Every individual check (see module docstring), as lists of booleans keyed by check name."""
        return self._checks(images, prompts)[0]

    def checks_per_image(self, images: Tensor, prompts: Sequence[str | Scene]) -> tuple[Tensor, Tensor]:
        """``(passed, made)`` per image: the checks behind ``attr_acc``, kept apart per image so that
        two models judged on the same prompts and noise can be compared pairwise (``paired_gain``)."""
        _, passed, made = self._checks(images, prompts)
        return torch.tensor(passed, dtype=torch.float64), torch.tensor(made, dtype=torch.float64)

    def _checks(self, images: Tensor, prompts: Sequence[str | Scene]) -> tuple[dict[str, list[bool]], list[int], list[int]]:
        scenes = _parse_all(prompts)
        if len(scenes) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(scenes)} prompts")
        logits = self.predict(images)
        shape_pred = logits["shape"].argmax(-1).tolist()
        color_pred = logits["color"].argmax(-1).tolist()
        size_pred = logits["size"].argmax(-1).tolist()
        bg_pred = logits["background"].argmax(-1).tolist()
        colors, backgrounds = list(COLORS), list(BACKGROUNDS)
        checks: dict[str, list[bool]] = {k: [] for k in CHECKS}
        checks["exact"] = []
        passed, made = [], []
        for i, scene in enumerate(scenes):
            ok_all = True
            image_checks = []
            cells = self._assign_cells(scene, shape_pred[i], color_pred[i], size_pred[i])
            for s, c in zip(scene.shapes, cells):
                present = c is not None and shape_pred[i][c] > 0
                results = {
                    "position": present,
                    "shape": present and shape_pred[i][c] == 1 + SHAPES.index(s.shape),
                    "color": present and color_pred[i][c] == colors.index(s.color),
                    "size": present and size_pred[i][c] == SIZES.index(s.size),
                }
                for k, v in results.items():
                    checks[k].append(bool(v))
                    image_checks.append(bool(v))
                    ok_all &= bool(v)
            bg_ok = bg_pred[i] == backgrounds.index(scene.background)
            count_ok = sum(p > 0 for p in shape_pred[i]) == len(scene.shapes)
            checks["background"].append(bg_ok)
            checks["count"].append(count_ok)
            checks["exact"].append(ok_all and bg_ok and count_ok)
            image_checks += [bg_ok, count_ok]
            passed.append(sum(image_checks))
            made.append(len(image_checks))
        return checks, passed, made

    @staticmethod
    def _assign_cells(scene: Scene, shape_pred: list[int], color_pred: list[int],
                      size_pred: list[int]) -> list[int | None]:
        """The cell each named shape is judged in.

        A positioned shape: its own cell.  A shape whose prompt left the position open: the occupied
        cell, not claimed by a positioned or an earlier open shape, that agrees with it on the most
        of shape / colour / size (first in reading order on ties); None when no occupied cell is
        left -- then all four of its checks fail, as for a missing positioned shape.
        """
        claimed = {s.cell for s in scene.shapes if s.position is not None}
        free = [c for c in range(N_CELLS) if shape_pred[c] > 0 and c not in claimed]
        colors = list(COLORS)
        cells: list[int | None] = []
        for s in scene.shapes:
            if s.position is not None:
                cells.append(s.cell)
                continue
            if not free:
                cells.append(None)
                continue
            best = max(free, key=lambda c: (shape_pred[c] == 1 + SHAPES.index(s.shape))
                       + (color_pred[c] == colors.index(s.color)) + (size_pred[c] == SIZES.index(s.size)))
            free.remove(best)
            cells.append(best)
        return cells

    def attribute_accuracy(self, images: Tensor, prompts: Sequence[str | Scene]) -> dict[str, float]:
        """Per-check accuracies (position, shape, color, size, background, count), ``attr_acc``
        (mean over all checks of all prompts) and ``exact`` (fraction of images with all right)."""
        checks = self.attribute_checks(images, prompts)
        out = {k: sum(v) / len(v) for k, v in checks.items()}
        every = [b for k in CHECKS for b in checks[k]]
        out["attr_acc"] = sum(every) / len(every)
        return out

    # -- distribution metrics ----------------------------------------------------------------
    def frechet_distance(self, images_a: Tensor, images_b: Tensor) -> float:
        """Fréchet distance between two image sets in this classifier's feature space.

        Uses torchmetrics' ``FrechetInceptionDistance`` with a custom feature module (which torchmetrics
        feeds the images unchanged; with ``normalize=True`` the convention is floats in [0, 1], so the
        images are mapped from [-1, 1] to [0, 1] here and back inside the module).
        """
        from torchmetrics.image.fid import FrechetInceptionDistance

        if images_a.shape[0] < 2 or images_b.shape[0] < 2:
            raise ValueError("Fréchet distance needs at least 2 images per set")
        metric = FrechetInceptionDistance(feature=_FeatureModule(self.net), normalize=True)
        for i in range(0, images_a.shape[0], self.batch_size):
            metric.update(((images_a[i:i + self.batch_size].cpu().float() + 1) / 2), real=True)
        for i in range(0, images_b.shape[0], self.batch_size):
            metric.update(((images_b[i:i + self.batch_size].cpu().float() + 1) / 2), real=False)
        return max(float(metric.compute()), 0.0)

    @staticmethod
    def _mean_pairwise(x: Tensor) -> float:
        n = x.shape[0]
        d = torch.cdist(x.double(), x.double())
        return float(d.sum() / (n * (n - 1)))

    def _diversity_of(self, x: Tensor, scenes: Sequence[Scene] | None) -> float:
        """Diversity of precomputed per-sample vectors ``x`` [B, D] (see :meth:`diversity`)."""
        if scenes is None:
            return self._mean_pairwise(x) if x.shape[0] >= 2 else float("nan")
        groups: dict[Scene, list[int]] = defaultdict(list)
        for i, scene in enumerate(scenes):
            groups[scene].append(i)
        values = [self._mean_pairwise(x[idx]) for idx in groups.values() if len(idx) >= 2]
        return sum(values) / len(values) if values else float("nan")

    @staticmethod
    def _pixels(images: Tensor) -> Tensor:
        """Flattened images scaled so that the L2 distance is the RMS pixel distance."""
        return images.detach().cpu().double().flatten(1) / math.sqrt(images[0].numel())

    def diversity(self, images: Tensor, prompts: Sequence[str | Scene] | None = None,
                  space: str = "features") -> float:
        """Mean pairwise distance among samples sharing a prompt, averaged over prompts with >= 2
        samples (NaN if there are none); with ``prompts=None``, over all pairs.

        ``space="features"``: L2 in the 144-d feature space; ``space="pixels"``: RMS pixel distance.
        """
        if space == "features":
            x = self.features(images).double()
        elif space == "pixels":
            x = self._pixels(images)
        else:
            raise ValueError(f"space must be 'features' or 'pixels', got {space!r}")
        return self._diversity_of(x, None if prompts is None else _parse_all(prompts))

    def reference_images(self, prompts: Sequence[str | Scene], resolution: int = 32) -> Tensor:
        """Real procedural images of ``prompts`` (random placements from ``reference_seed``)."""
        return render_batch(_parse_all(prompts), generator=random.Random(self.reference_seed),
                            resolution=resolution)

    def evaluate(self, images: Tensor, prompts: Sequence[str | Scene], reference_real: Tensor | None = None,
                 reference_teacher: Tensor | None = None) -> dict[str, float]:
        """All metrics (see the module docstring): attribute accuracies, ``fd_real``, ``fd_teacher``
        (only with ``reference_teacher``), ``diversity``, ``diversity_all`` and ``pixel_diversity``."""
        scenes = _parse_all(prompts)
        out = self.attribute_accuracy(images, scenes)
        real = reference_real if reference_real is not None else self.reference_images(scenes)
        out["fd_real"] = self.frechet_distance(real, images)
        if reference_teacher is not None:
            out["fd_teacher"] = self.frechet_distance(reference_teacher, images)
        feats = self.features(images).double()
        out["diversity"] = self._diversity_of(feats, scenes)
        out["diversity_all"] = self._diversity_of(feats, None)
        out["pixel_diversity"] = self._diversity_of(self._pixels(images), scenes)
        return out
