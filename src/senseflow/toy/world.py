"""A procedural text-to-image world: coloured shapes on a plain background, with exact captions.

Why it exists: real teachers (SD3.5, FLUX, SDXL, SANA) never reach the CPU machines this project is
developed and tested on, yet distillation has to be *measured*, not just run.  This world is small
enough that a ~1-2M-parameter DiT learns it on CPU in about an hour, and every image has a known
ground truth (what shape, colour and size is in which grid cell on which background), so a student's
prompt following can be scored exactly by :mod:`senseflow.toy.evaluator`.

Attribute space (see the module constants):

* 1 or 2 shapes per scene, each in its own cell of a 3x3 grid (so shapes never overlap);
* shape: circle, square, triangle, diamond, cross;
* colour: red, green, blue, yellow, purple, cyan;
* size: small, large;
* position: top left, top, top right, left, center, right, bottom left, bottom, bottom right;
* background: white, black, gray (disjoint from the shape colours, so a shape never vanishes).

Captions follow one deterministic grammar, e.g. ``"a small red circle in the top left on a white
background"`` or ``"a large blue square in the center and a small green triangle in the bottom
right on a black background"``; :func:`parse_caption` inverts it.

*Open* captions leave the positions out (``"a small red circle and a large blue square on a white
background"``): the shapes may then stand in any distinct cells, so one prompt has many layouts.
Fully specified prompts make each conditional distribution nearly unimodal, and then even a 4-step
Euler sampler is almost as good as 32 steps (docs/toy.md measures it); open prompts bring back the
multimodality that makes few-step sampling hard for real text-to-image teachers.  ``ToyWorld``
opens a fraction ``open_positions`` of its captions (default 0: the stream the shipped teacher was
trained on), and ``evaluation_prompts(..., open_positions=True)`` gives an open evaluation set.

A scene (the semantic attributes) does not fix the pixels: the training stream (:class:`ToyWorld`)
adds a small random *placement* per shape (offset inside its cell, size and colour shade), so each
prompt has a genuine distribution of images and a collapsed student shows up as lost diversity.
``render(scene)`` with no generator draws the canonical placement (centred, mid size, exact colour).

Images are drawn with hard masks at 4x the target resolution and area-averaged down (anti-aliasing),
fully vectorised in torch: 256 images at 32 px take a few tens of milliseconds.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..rng import derive_seed

Rng = Union[torch.Generator, random.Random]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.12, 0.66, 0.20),
    "blue": (0.12, 0.28, 0.86),
    "yellow": (0.95, 0.82, 0.10),
    "purple": (0.58, 0.20, 0.78),
    "cyan": (0.10, 0.80, 0.84),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
#: How each grid cell is said in a caption (the natural preposition differs per cell).
POSITION_PHRASES: dict[str, str] = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "gray": (0.45, 0.45, 0.45),
}
MAX_SHAPES = 2

_GRAMMAR_WORDS = ("a", "and", "on", "in", "at", "the", "background")
_POSITION_WORDS = ("top", "bottom", "left", "right", "center")
#: Every word any caption can contain, in a fixed order (the tokenizer's vocabulary is built from it).
VOCABULARY: list[str] = [
    *_GRAMMAR_WORDS, *SIZES, *COLORS, *SHAPES, *_POSITION_WORDS, *BACKGROUNDS,
]

# Geometry, in pixels of a 32-px image (everything scales with the resolution).  Small shapes are
# at least 3.2 px in half size: below ~3 px a small diamond and a small cross become hard to tell
# apart (the evaluator's worst confusion, 99.2% shape accuracy, at half size 2.8-3.4 px).
_CELL = 32.0 / 3.0
_HALF_CANONICAL = {"small": 3.45, "large": 4.9}
_HALF_RANGE = {"small": (3.2, 3.7), "large": (4.7, 5.1)}
# Largest centre offset per size: keeps every shape inside its cell (half-cell 5.33 px), so shapes
# in neighbouring cells never overlap.
_OFFSET = {"small": 1.5, "large": 0.2}
_COLOR_JITTER = 0.04
_SUPERSAMPLE = 4
# Every shape lies within 5.3 px of its cell centre; it is drawn in a window of +-6 px around it.
_WINDOW_HALF = 6.0


@dataclass(frozen=True)
class ShapeSpec:
    """One shape's semantic attributes (what a caption says about it).

    ``position=None`` is a shape whose caption leaves the position open (any free cell will do).
    """

    shape: str
    color: str
    size: str
    position: str | None

    def __post_init__(self) -> None:
        for value, allowed, name in ((self.shape, SHAPES, "shape"), (self.color, COLORS, "color"),
                                     (self.size, SIZES, "size")):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {list(allowed)}")
        if self.position is not None and self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}; expected one of {list(POSITIONS)} or None")

    @property
    def cell(self) -> int:
        """Grid cell index 0..8 in reading order (row-major, top left first)."""
        if self.position is None:
            raise ValueError(f"the {self.shape} has an open position (no cell)")
        return POSITIONS.index(self.position)

    def phrase(self) -> str:
        head = f"a {self.size} {self.color} {self.shape}"
        return head if self.position is None else f"{head} {POSITION_PHRASES[self.position]}"


@dataclass(frozen=True)
class Scene:
    """A full prompt's content: 1..MAX_SHAPES shapes in distinct cells and a background colour."""

    shapes: tuple[ShapeSpec, ...]
    background: str

    def __post_init__(self) -> None:
        if not 1 <= len(self.shapes) <= MAX_SHAPES:
            raise ValueError(f"a scene has 1..{MAX_SHAPES} shapes, got {len(self.shapes)}")
        cells = [s.cell for s in self.shapes if s.position is not None]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two shapes share the position {self.shapes[0].position!r}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; expected one of {list(BACKGROUNDS)}")

    def caption(self) -> str:
        """The one caption the grammar assigns to this scene (inverse of :func:`parse_caption`)."""
        return " and ".join(s.phrase() for s in self.shapes) + f" on a {self.background} background"

    def without_positions(self) -> "Scene":
        """The same scene as an open prompt: every position left to the sampler (shape order kept)."""
        return Scene(shapes=tuple(replace(s, position=None) for s in self.shapes), background=self.background)


# ------------------------------------------------------------------------------------------------
# Randomness helpers: both torch.Generator and random.Random are accepted everywhere.
# ------------------------------------------------------------------------------------------------
def _randbelow(rng: Rng, n: int) -> int:
    if isinstance(rng, random.Random):
        return rng.randrange(n)
    return int(torch.randint(n, (1,), generator=rng).item())


def _uniform(rng: Rng, low: float, high: float) -> float:
    if isinstance(rng, random.Random):
        return rng.uniform(low, high)
    return low + (high - low) * float(torch.rand(1, generator=rng, dtype=torch.float64).item())


def _choice(rng: Rng, options: Sequence[str]) -> str:
    return options[_randbelow(rng, len(options))]


def sample_scene(generator: Rng) -> Scene:
    """A uniformly random scene: 1 or 2 shapes (equally likely) in distinct cells, sorted by cell.

    Sorting by cell makes the caption of a given picture unique (the left-to-right, top-to-bottom
    reading order), so captions and scenes are in one-to-one correspondence.
    """
    n_shapes = 1 + _randbelow(generator, MAX_SHAPES)
    cells: list[int] = []
    while len(cells) < n_shapes:
        cell = _randbelow(generator, len(POSITIONS))
        if cell not in cells:
            cells.append(cell)
    shapes = []
    for cell in sorted(cells):
        shapes.append(ShapeSpec(shape=_choice(generator, SHAPES), color=_choice(generator, list(COLORS)),
                                size=_choice(generator, SIZES), position=POSITIONS[cell]))
    return Scene(shapes=tuple(shapes), background=_choice(generator, list(BACKGROUNDS)))


# ------------------------------------------------------------------------------------------------
# Placement: where exactly (and in which shade) a shape is drawn.
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Placement:
    cell: int  # grid cell 0..8 (decides which window the shape is drawn in)
    shape: int  # index into SHAPES
    cx: float  # centre, in 32-px pixel units
    cy: float
    half: float  # half extent, 32-px pixel units
    rgb: tuple[float, float, float]  # in [0, 1]


def _cell_centre(cell: int) -> tuple[float, float]:
    row, col = divmod(cell, 3)
    return (col + 0.5) * _CELL, (row + 0.5) * _CELL


def _cells(scene: Scene, rng: Rng | None) -> list[int]:
    """A cell per shape: its own, or for an open position a free cell (random, or the first free
    one in reading order when ``rng`` is None).  Scenes with every position given draw nothing
    from ``rng``, so the streams of fully specified scenes are unchanged by open-prompt support."""
    taken = {s.cell for s in scene.shapes if s.position is not None}
    cells = []
    for s in scene.shapes:
        if s.position is None:
            free = [c for c in range(len(POSITIONS)) if c not in taken]
            cell = free[0] if rng is None else free[_randbelow(rng, len(free))]
            taken.add(cell)
        else:
            cell = s.cell
        cells.append(cell)
    return cells


def _canonical_placements(scene: Scene) -> list[_Placement]:
    out = []
    for s, cell in zip(scene.shapes, _cells(scene, None)):
        cx, cy = _cell_centre(cell)
        out.append(_Placement(cell, SHAPES.index(s.shape), cx, cy, _HALF_CANONICAL[s.size], COLORS[s.color]))
    return out


def _sample_placements(scene: Scene, rng: Rng) -> list[_Placement]:
    """Random offset (inside the cell), size and colour shade per shape; the semantics stay fixed."""
    out = []
    for s, cell in zip(scene.shapes, _cells(scene, rng)):
        cx, cy = _cell_centre(cell)
        off = _OFFSET[s.size]
        dx, dy = _uniform(rng, -off, off), _uniform(rng, -off, off)
        half = _uniform(rng, *_HALF_RANGE[s.size])
        rgb = tuple(min(1.0, max(0.0, c + _uniform(rng, -_COLOR_JITTER, _COLOR_JITTER)))
                    for c in COLORS[s.color])
        out.append(_Placement(cell, SHAPES.index(s.shape), cx + dx, cy + dy, half, rgb))  # type: ignore[arg-type]
    return out


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------
def _shape_mask(shape: int, u: Tensor, v: Tensor) -> Tensor:
    """Inside-test in shape-normalised coordinates (u, v) = (x - cx, y - cy) / half; y points down."""
    au, av = u.abs(), v.abs()
    name = SHAPES[shape]
    if name == "circle":
        return u * u + v * v <= 1.0
    if name == "square":
        return torch.maximum(au, av) <= 0.85
    if name == "triangle":  # apex up, base at the bottom
        return (v >= -1.0) & (v <= 0.8) & (au <= (v + 1.0) * 0.555)
    if name == "diamond":
        return au + av <= 1.0
    if name == "cross":  # a plus sign
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    raise AssertionError(name)


def _window(cell_centre: float, resolution: int) -> tuple[int, int]:
    """Start and size (low-res pixels) of the square window that holds any shape of a cell."""
    scale = resolution / 32.0
    size = math.ceil(2 * _WINDOW_HALF * scale)
    start = math.floor((cell_centre - _WINDOW_HALF) * scale)
    return min(max(start, 0), resolution - size), size


def _render_placements(placements: Sequence[Sequence[_Placement]], backgrounds: Sequence[str],
                       resolution: int) -> Tensor:
    """Draw all scenes at once.

    Each shape's coverage (alpha) is computed with hard masks at 4x resolution inside its cell's
    window only, grouped by (cell, shape type), and area-averaged down.  Shapes never overlap, so
    the image is exactly ``background + sum_i alpha_i * (colour_i - background)``.
    """
    n = len(placements)
    ss = _SUPERSAMPLE
    scale = resolution / 32.0
    bg = torch.tensor([BACKGROUNDS[b] for b in backgrounds], dtype=torch.float32).view(n, 3)
    image = bg.view(n, 3, 1, 1).expand(n, 3, resolution, resolution).clone()
    flat = [(i, p) for i, ps in enumerate(placements) for p in ps]
    if not flat:
        return image * 2.0 - 1.0
    rows = torch.tensor([i for i, _ in flat])
    params = torch.tensor([[p.cx, p.cy, p.half] for _, p in flat], dtype=torch.float32)
    keys = torch.tensor([p.cell * len(SHAPES) + p.shape for _, p in flat])
    alpha = torch.zeros(len(flat), resolution, resolution)
    for key in keys.unique().tolist():
        cell, shape = divmod(key, len(SHAPES))
        sel = (keys == key).nonzero().squeeze(1)
        centre_x, centre_y = _cell_centre(cell)
        x0, w = _window(centre_x, resolution)
        y0, _ = _window(centre_y, resolution)
        local = (torch.arange(w * ss, dtype=torch.float32) + 0.5) / (ss * scale)  # 32-px units
        p = params[sel]
        u = (local.view(1, 1, -1) + x0 / scale - p[:, 0].view(-1, 1, 1)) / p[:, 2].view(-1, 1, 1)
        v = (local.view(1, -1, 1) + y0 / scale - p[:, 1].view(-1, 1, 1)) / p[:, 2].view(-1, 1, 1)
        u, v = torch.broadcast_tensors(u, v)
        mask = _shape_mask(shape, u, v).float().unsqueeze(1)
        alpha[sel, y0:y0 + w, x0:x0 + w] = F.avg_pool2d(mask, ss).squeeze(1)
    colours = torch.tensor([p.rgb for _, p in flat], dtype=torch.float32)
    contrib = alpha.unsqueeze(1) * (colours - bg[rows]).view(-1, 3, 1, 1)
    image.index_add_(0, rows, contrib)
    return image * 2.0 - 1.0


def render_batch(scenes: Sequence[Scene], generator: Rng | None = None, resolution: int = 32) -> Tensor:
    """Images ``[B, 3, resolution, resolution]`` in [-1, 1].

    With ``generator=None`` every shape gets its canonical placement (deterministic); otherwise a
    random placement per shape is drawn from ``generator``, scene after scene.
    """
    if generator is None:
        placements = [_canonical_placements(s) for s in scenes]
    else:
        placements = [_sample_placements(s, generator) for s in scenes]
    return _render_placements(placements, [s.background for s in scenes], resolution)


def render(scene: Scene, generator: Rng | None = None, resolution: int = 32) -> Tensor:
    """One image ``[3, resolution, resolution]`` in [-1, 1] (see :func:`render_batch`)."""
    return render_batch([scene], generator, resolution)[0]


# ------------------------------------------------------------------------------------------------
# The training stream
# ------------------------------------------------------------------------------------------------
class ToyWorld:
    """An unlimited stream of (image, caption, scene) triples addressed by batch index.

    ``batch(n, index)`` depends only on ``(seed, index, n)`` (and the first ``k`` items of a batch do
    not depend on ``n``), so a training run resumes at any step by asking for the same index, and
    different ranks can read disjoint indices.  No state is kept between calls.
    """

    def __init__(self, seed: int, resolution: int = 32, open_positions: float = 0.0) -> None:
        if not 0.0 <= open_positions <= 1.0:
            raise ValueError(f"open_positions is a probability, got {open_positions}")
        self.seed = int(seed)
        self.resolution = int(resolution)
        self.open_positions = float(open_positions)

    def _rng(self, index: int) -> random.Random:
        return random.Random(derive_seed("senseflow.toy.world", self.seed, int(index)))

    def _draw(self, n: int, index: int) -> tuple[list[Scene], list[list[_Placement]], list[str]]:
        rng = self._rng(index)
        scenes, placements, captions = [], [], []
        for _ in range(n):  # scene, placement, caption per item: item k does not depend on n
            scene = sample_scene(rng)
            scenes.append(scene)
            placements.append(_sample_placements(scene, rng))
            # no draw at all when nothing is opened: the default stream stays bit-identical
            opened = self.open_positions > 0 and rng.random() < self.open_positions
            captions.append((scene.without_positions() if opened else scene).caption())
        return scenes, placements, captions

    def batch(self, n: int, index: int) -> tuple[Tensor, list[str], list[Scene]]:
        """``(images [n,3,R,R] in [-1,1], captions, scenes)`` for batch ``index``; ``scenes`` are
        what was drawn (every position known) even where the caption leaves positions open."""
        scenes, placements, captions = self._draw(n, index)
        images = _render_placements(placements, [s.background for s in scenes], self.resolution)
        return images, captions, scenes

    def prompts(self, n: int, index: int) -> list[str]:
        """The captions of ``batch(n, index)`` without rendering (for data-free distillation)."""
        return self._draw(n, index)[2]


# ------------------------------------------------------------------------------------------------
# Captions -> scenes
# ------------------------------------------------------------------------------------------------
_PHRASE_TO_POSITION = {tuple(v.split()): k for k, v in POSITION_PHRASES.items()}


def _expect(words: list[str], i: int, allowed: Sequence[str], what: str, caption: str) -> str:
    if i >= len(words):
        raise ValueError(f"caption ends early, expected {what}: {caption!r}")
    if words[i] not in allowed:
        raise ValueError(f"expected {what} ({'/'.join(allowed)}) at word {i + 1} "
                         f"but found {words[i]!r}: {caption!r}")
    return words[i]


def parse_caption(caption: str) -> Scene:
    """The scene a caption describes; ``parse_caption(scene.caption()) == scene``.

    Raises ``ValueError`` naming the first word outside :data:`VOCABULARY`, or the first place the
    caption leaves the grammar.  The evaluator uses it to know what a prompt asked for.
    """
    words = caption.lower().split()
    for w in words:
        if w not in VOCABULARY:
            raise ValueError(f"unknown word {w!r} in caption {caption!r} (not in the toy vocabulary)")
    shapes, i = [], 0
    while True:
        _expect(words, i, ("a",), "'a'", caption)
        size = _expect(words, i + 1, SIZES, "a size", caption)
        color = _expect(words, i + 2, list(COLORS), "a colour", caption)
        shape = _expect(words, i + 3, SHAPES, "a shape", caption)
        i += 4
        position = None  # an open caption names no position
        for phrase, where in sorted(_PHRASE_TO_POSITION.items(), key=lambda kv: -len(kv[0])):
            if tuple(words[i:i + len(phrase)]) == phrase:
                i += len(phrase)
                position = where
                break
        shapes.append(ShapeSpec(shape=shape, color=color, size=size, position=position))
        if i < len(words) and words[i] == "and":
            i += 1
            continue
        break
    _expect(words, i, ("on",), "'on'", caption)
    _expect(words, i + 1, ("a",), "'a'", caption)
    background = _expect(words, i + 2, list(BACKGROUNDS), "a background colour", caption)
    _expect(words, i + 3, ("background",), "'background'", caption)
    if len(words) != i + 4:
        raise ValueError(f"unexpected words after the background: {caption!r}")
    return Scene(shapes=tuple(shapes), background=background)


def _balanced(values: Sequence, n: int, rng: random.Random) -> list:
    """``n`` values that cycle through ``values`` (each appears floor or ceil of n/len times), shuffled."""
    out = [values[i % len(values)] for i in range(n)]
    rng.shuffle(out)
    return out


def evaluation_prompts(n: int = 64, seed: int = 1234, open_positions: bool = False) -> list[str]:
    """A fixed evaluation prompt set: deterministic in ``(n, seed)``.

    Every attribute is drawn from a balanced, shuffled list, so for ``n >= 9`` every shape, colour,
    size, position and background value appears (as the first shape's attribute), and half the
    prompts have a second shape.  Fixed sets make scores comparable across runs and methods.
    ``open_positions=True``: the same prompts with their positions left out.
    """
    if n < 1:
        raise ValueError("n must be positive")
    rng = random.Random(derive_seed("senseflow.toy.evaluation_prompts", seed))
    shapes = _balanced(SHAPES, n, rng)
    colors = _balanced(list(COLORS), n, rng)
    sizes = _balanced(SIZES, n, rng)
    cells = _balanced(range(len(POSITIONS)), n, rng)
    backgrounds = _balanced(list(BACKGROUNDS), n, rng)
    two = _balanced([False, True], n, rng)
    prompts = []
    for k in range(n):
        specs = [ShapeSpec(shapes[k], colors[k], sizes[k], POSITIONS[cells[k]])]
        if two[k]:
            other = rng.choice([c for c in range(len(POSITIONS)) if c != cells[k]])
            specs.append(ShapeSpec(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES),
                                   POSITIONS[other]))
        specs.sort(key=lambda s: s.cell)
        scene = Scene(shapes=tuple(specs), background=backgrounds[k])
        prompts.append((scene.without_positions() if open_positions else scene).caption())
    return prompts
