"""The evaluation runner: sample every source to disk (sharded, resumable, cached), then score in index order.

Two phases, on purpose:

1. **Sampling.** Every process (``torchrun`` rank) makes the indices ``i`` with
   ``i % world_size == rank`` for each source and writes them to ``<out>/images/<label>/``
   (:class:`~senseflow.evaluation.store.ImageStore`); indices already there with the same record are
   skipped, so a killed run resumes where it stopped.  Teacher images come from the content-addressed
   :class:`~senseflow.evaluation.store.TeacherCache` when they were made before by any evaluation.
2. **Scoring.** After a barrier, the main process alone reads the images back in index order and feeds
   them to the metrics.  The numbers therefore do not depend on how many processes sampled or how
   often the run was interrupted: a sharded or resumed run is identical to one uninterrupted process.

Everything that can be checked (paths, sources, metric names and weights) is checked before the
output folder is created.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..teachers.base import SenseflowError
from .backends import MetricSpec, build, check_metric_names
from .promptset import PromptSet
from .sources import ImageSource, TeacherSource
from .store import ImageStore, TeacherCache, link_or_copy, write_json_atomic

TIMING_PREFIX = ".timing-rank"


@dataclass
class EvalPlan:
    """Everything one evaluation needs, validated."""

    out: Path
    prompts: PromptSet
    sources: list[ImageSource]
    teacher: TeacherSource | None = None
    metrics: list[MetricSpec] = field(default_factory=list)
    cache_dir: Path | None = None
    batch_size: int = 4
    metric_batch_size: int = 32
    device: str = "auto"
    real_size: int | None = None      # real images: centre crop to a square, resize to this (PIL, see coco.py)
    protocol: dict[str, Any] = field(default_factory=dict)
    html_rows: int = 16
    progress: bool = True
    command: list[str] = field(default_factory=lambda: list(sys.argv))
    #: ready Metric objects by name (library use, tests); built from ``metrics`` otherwise
    prebuilt: dict[str, Any] = field(default_factory=dict)

    @property
    def all_sources(self) -> list[ImageSource]:
        return ([self.teacher] if self.teacher is not None else []) + list(self.sources)


def validate_plan(plan: EvalPlan) -> None:
    """One-line errors for anything wrong, before anything is written."""
    if not plan.all_sources:
        raise SenseflowError("nothing to evaluate: pass --student, --pipeline or --teacher")
    labels = [s.label for s in plan.all_sources]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise SenseflowError(f"two sources are labelled {dup[0]!r}: give each a label (--student LABEL=PATH)")
    for label in labels:
        if not label or "/" in label or label.startswith("."):
            raise SenseflowError(f"source label {label!r} must be a plain folder name")
    if plan.batch_size < 1 or plan.metric_batch_size < 1:
        raise SenseflowError("--batch-size must be >= 1")
    if len(plan.prompts) < 1:
        raise SenseflowError("no prompts to evaluate")
    out = Path(plan.out)
    if out.exists() and not out.is_dir():
        raise SenseflowError(f"--out {str(out)!r} exists and is not a directory")
    check_metric_names([m for m in plan.metrics if m.name not in plan.prebuilt])
    for p in plan.prompts.real_images:
        if not Path(p).is_file():
            raise SenseflowError(f"real image {str(p)!r} not found")


def metric_requires(metric) -> frozenset[str]:
    return frozenset(getattr(metric, "requires", frozenset()))


def check_requirements(plan: EvalPlan, metrics: dict[str, Any]) -> None:
    for name, m in metrics.items():
        req = metric_requires(m)
        if "reference" in req and plan.teacher is None:
            raise SenseflowError(f"metric {name!r} compares with the teacher's images for the same prompts and "
                                 f"seeds: pass --teacher (or a student whose student.json names its teacher)")
        if "real" in req and not plan.prompts.real_images:
            raise SenseflowError(f"metric {name!r} compares with real images: use a COCO preset (--coco-annotations "
                                 f"and --coco-images) or pass --real-images FOLDER")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SenseflowError("--device cuda but no CUDA device is available; use --device auto or cpu")
    return torch.device(name)


# -------------------------------------------------------------------------------------------------
# sampling
# -------------------------------------------------------------------------------------------------
def _record(source: ImageSource, index: int, prompt: str, seed: int) -> dict[str, Any]:
    return {"index": index, "prompt": prompt, "seed": int(seed), "source": source.settings()}


def _add_timing(store: ImageStore, rank: int, images: int, seconds: float) -> None:
    path = store.folder / f"{TIMING_PREFIX}{rank}.json"
    old = json.loads(path.read_text()) if path.is_file() else {"images": 0, "seconds": 0.0}
    write_json_atomic(path, {"images": old["images"] + images, "seconds": old["seconds"] + seconds})


def read_timing(store: ImageStore) -> float | None:
    """Mean seconds per image over every image made for this source (all ranks, all runs)."""
    n, s = 0, 0.0
    for p in store.folder.glob(f"{TIMING_PREFIX}*.json"):
        d = json.loads(p.read_text())
        n, s = n + int(d["images"]), s + float(d["seconds"])
    return s / n if n else None


def sample_source(source: ImageSource, store: ImageStore, prompts: PromptSet, indices: Sequence[int],
                  device: torch.device, batch_size: int, cache: TeacherCache | None, bar=None, rank: int = 0) -> int:
    """Make the missing images of ``indices``; returns how many were rendered (cache hits excluded)."""
    records = {i: _record(source, i, prompts.prompts[i], prompts.seeds[i]) for i in indices}
    todo = [i for i in indices if not store.done(i, records[i])]
    if bar is not None:
        bar.update(len(indices) - len(todo))
    fields = source.cache_fields() if cache is not None else None
    if fields is not None:
        misses = []
        for i in todo:
            hit = cache.get({**fields, "prompt": prompts.prompts[i], "seed": int(prompts.seeds[i])})
            if hit is None:
                misses.append(i)
                continue
            link_or_copy(hit, store.png(i))
            write_json_atomic(store.meta(i), records[i])
            if bar is not None:
                bar.update(1)
        todo = misses
    if not todo:
        return 0
    source.load(device)
    made = 0
    for b in range(0, len(todo), batch_size):
        chunk = todo[b:b + batch_size]
        t0 = time.perf_counter()
        arrays = source.render([prompts.prompts[i] for i in chunk], [prompts.seeds[i] for i in chunk])
        seconds = time.perf_counter() - t0
        for i, arr in zip(chunk, arrays):
            if fields is not None:
                path = cache.put({**fields, "prompt": prompts.prompts[i], "seed": int(prompts.seeds[i])}, arr)
                link_or_copy(path, store.png(i))
                write_json_atomic(store.meta(i), records[i])
            else:
                store.write(i, arr, records[i])
        made += len(chunk)
        _add_timing(store, rank, len(chunk), seconds)
        if bar is not None:
            bar.update(len(chunk))
    return made


# -------------------------------------------------------------------------------------------------
# scoring
# -------------------------------------------------------------------------------------------------
def stream_real(metric, paths: Sequence[Path], size: int | None, batch: int) -> None:
    from .coco import load_real_image
    if size is None:   # native size: one image per call (sizes differ)
        for p in paths:
            metric.update_real(load_real_image(p, None).unsqueeze(0))
        return
    for b in range(0, len(paths), batch):
        metric.update_real(torch.stack([load_real_image(p, size) for p in paths[b:b + batch]]))


def finite(values: dict[str, Any]) -> dict[str, float | None]:
    """Non-finite numbers are never saved: they become ``null``."""
    out: dict[str, float | None] = {}
    for k, v in values.items():
        v = float(v)
        out[k] = v if math.isfinite(v) else None
    return out


def score_source(source: ImageSource, store: ImageStore, teacher_store: ImageStore | None, prompts: PromptSet,
                 metrics: dict[str, Any], plan: EvalPlan) -> dict[str, float | None]:
    """All metric numbers for one source, reading its images in index order."""
    numbers: dict[str, float | None] = {}
    n = len(prompts)
    for name, metric in metrics.items():
        req = metric_requires(metric)
        is_teacher = plan.teacher is not None and source is plan.teacher
        if "reference" in req and is_teacher:
            continue     # the teacher against itself is 0 by construction
        metric.reset()
        if "real" in req:
            stream_real(metric, plan.prompts.real_images, plan.real_size, plan.metric_batch_size)
        pass_reference = teacher_store is not None and not is_teacher
        for b in range(0, n, plan.metric_batch_size):
            idx = list(range(b, min(n, b + plan.metric_batch_size)))
            images = store.read(idx)
            reference = teacher_store.read(idx) if pass_reference else None
            metric.update(images, [prompts.prompts[i] for i in idx], reference=reference)
        numbers.update(finite(metric.compute()))
    return numbers


# -------------------------------------------------------------------------------------------------
# the whole evaluation
# -------------------------------------------------------------------------------------------------
def _broadcast_error(ctx, message: str | None) -> None:
    """Main-process validation errors reach every rank (else the others wait at a barrier forever)."""
    if ctx.distributed:
        import torch.distributed as dist
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise SenseflowError(message)


def evaluate(plan: EvalPlan) -> dict[str, Any] | None:
    """Run the evaluation; returns the results on the main process (``None`` on the others)."""
    from ..train.distributed import init_distributed
    from tqdm.auto import tqdm

    validate_plan(plan)
    device = resolve_device(plan.device)
    ctx = init_distributed(device.type if plan.device != "auto" else "auto")
    device = ctx.device if ctx.distributed else device
    metrics: dict[str, Any] = {}
    error = None
    if ctx.is_main:
        try:
            for spec in plan.metrics:
                metrics[spec.name] = plan.prebuilt.get(spec.name) or build(spec, device=device,
                                                                           batch_size=plan.metric_batch_size)
            check_requirements(plan, metrics)
        except SenseflowError as exc:
            error = str(exc)
    _broadcast_error(ctx, error)

    out = Path(plan.out)
    cache = TeacherCache(plan.cache_dir or out / "teacher_cache")
    stores = {s.label: ImageStore(out / "images" / s.label) for s in plan.all_sources}
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "prompts.json", plan.prompts.as_json())
    ctx.barrier()
    mine = [i for i in range(len(plan.prompts)) if i % ctx.world_size == ctx.rank]
    bar = tqdm(total=len(mine) * len(plan.all_sources), desc="evaluate: sampling", unit="img",
               disable=not (plan.progress and ctx.is_main), dynamic_ncols=True)
    try:
        for source in plan.all_sources:
            bar.set_postfix_str(source.label, refresh=False)
            use_cache = cache if source is plan.teacher else None
            sample_source(source, stores[source.label], plan.prompts, mine, device, plan.batch_size, use_cache, bar,
                          ctx.rank)
            source.unload()
    finally:
        bar.close()
    ctx.barrier()
    if not ctx.is_main:
        return None      # no second barrier: scoring 10K images can outlast a collective's timeout
    results = score_all(plan, metrics, stores)
    write_outputs(plan, results, metrics, stores, ctx.world_size, device)
    return results


def score_all(plan: EvalPlan, metrics: dict[str, Any], stores: dict[str, ImageStore]) -> dict[str, Any]:
    from tqdm.auto import tqdm

    teacher_store = stores[plan.teacher.label] if plan.teacher is not None else None
    rows: dict[str, Any] = {}
    for source in tqdm(plan.all_sources, desc="evaluate: scoring", unit="source",
                       disable=not plan.progress or not metrics, dynamic_ncols=True):
        store = stores[source.label]
        numbers = score_source(source, store, teacher_store, plan.prompts, metrics, plan) if metrics else {}
        spi = read_timing(store)
        rows[source.label] = {"kind": source.kind, "settings": source.settings(), "metrics": numbers,
                              "num_images": len(plan.prompts),
                              "seconds_per_image": None if spi is None else round(spi, 6)}
    return {"protocol": plan.protocol, "num_images": len(plan.prompts), "prompts_sha256": plan.prompts.sha256,
            "reference": plan.teacher.label if plan.teacher is not None else None, "sources": rows}


def write_outputs(plan: EvalPlan, results: dict[str, Any], metrics: dict[str, Any], stores: dict[str, ImageStore],
                  world_size: int, device: torch.device) -> None:
    from .manifest import build_manifest
    from .report import write_html, write_markdown

    out = Path(plan.out)
    write_json_atomic(out / "results.json", results)
    write_markdown(out / "results.md", results)
    write_html(out / "index.html", results, plan.prompts, stores, out, plan.html_rows)
    write_json_atomic(out / "manifest.json", build_manifest(plan, metrics, world_size, device))
