"""``senseflow evaluate``: students, teachers and stock pipelines on fixed (prompt, seed) pairs, one table.

Modes: an evaluation (default), ``--teacher-curve`` (SenseFlow Fig. 4's xi(t)), ``--compare`` (several
``results.json`` into one table) and ``--list-presets``.  This module only turns arguments into an
:class:`~senseflow.evaluation.runner.EvalPlan`; every check happens before anything is written.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from ..teachers.base import SenseflowError
from ..teachers import registry

DEFAULT_CACHE = Path(os.environ.get("SENSEFLOW_CACHE", Path.home() / ".cache" / "senseflow")) / "teacher_refs"


def _key_values(items: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise SenseflowError(f"{what} {item!r}: expected NAME=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


def _metric_options(items: list[str] | None) -> dict[str, dict[str, Any]]:
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for key, value in _key_values(items, "--metric-option").items():
        if "." not in key:
            raise SenseflowError(f"--metric-option {key!r}: expected METRIC.KEY=VALUE, e.g. clip_score.prefix='A photo'")
        metric, opt = key.split(".", 1)
        out.setdefault(metric, {})[opt] = yaml.safe_load(value) if value else value
    return out


def _teacher_for(args, students, preset) -> Any:
    from .presets import PAPER_TEACHERS
    from .sources import TeacherSource

    path = args.teacher
    family = args.teacher_family
    resolution = args.teacher_resolution
    if path is None:
        if args.no_teacher or not students:
            return None
        path, family = students[0].teacher_path, students[0].family
        resolution = resolution or students[0].resolution
    elif students and family is None and path in (students[0].teacher_path,):
        family = students[0].family
    if path is None:
        return None
    if family is None:
        from .sources import teacher_family
        family = teacher_family(path)
    table = preset.teacher if preset is not None and preset.teacher else PAPER_TEACHERS
    steps, cfg = table.get(family, (32, 1.0))
    steps = args.teacher_steps if args.teacher_steps is not None else steps
    cfg = args.teacher_cfg if args.teacher_cfg is not None else cfg
    return TeacherSource(path, family=family, steps=steps, cfg=cfg, sampler=args.teacher_sampler,
                         resolution=resolution, dtype=args.dtype or "float32")


def _prompt_set(args, preset, weights: dict[str, str], device):
    from . import coco
    from .promptset import expand, file_sha256, from_source

    if preset is None or args.prompts is not None:
        if args.coco_annotations is not None and args.prompts is None:
            images = coco.load_coco(args.coco_annotations, args.coco_images or "")
            images = coco.select_images(images, args.num_prompts, 0)
            return expand(coco.first_captions(images), args.seed if args.seed is not None else 0, args.per_prompt,
                          f"coco:{args.coco_annotations}", file_sha256(args.coco_annotations),
                          [im.path for im in images])
        if args.prompts is None:
            raise SenseflowError("no prompts: pass --prompts FILE (or builtin:toy-world), or --preset with "
                                 "--coco-annotations and --coco-images")
        ps = from_source(args.prompts, args.num_prompts, args.seed if args.seed is not None else 0, args.per_prompt)
        if args.real_images:
            ps.real_images = _image_files(args.real_images)
        return ps
    if args.coco_annotations is None or args.coco_images is None:
        raise SenseflowError(f"--preset {preset.name} needs the COCO {preset.coco_split} captions and images: "
                             f"--coco-annotations annotations/captions_{preset.coco_split}.json --coco-images "
                             f"{preset.coco_split}/; {coco.COCO_HINT}")
    images = coco.load_coco(args.coco_annotations, args.coco_images)
    num = args.num_prompts or preset.num_images
    images = coco.select_images(images, num, preset.selection_seed)
    if preset.caption == "best-clip":
        clip = weights.get("clip_score")
        if clip is None:
            raise SenseflowError(f"--preset {preset.name} pairs each image with its best CLIP ViT-B/32 caption: pass "
                                 f"--weights clip_score=DIR (a transformers CLIPModel folder, e.g. "
                                 f"openai/clip-vit-base-patch32)")
        captions = _cached_best_captions(images, clip, args, device)
    else:
        captions = coco.first_captions(images)
    seed = args.seed if args.seed is not None else preset.seed
    return expand(captions, seed, args.per_prompt, f"coco:{args.coco_annotations}",
                  file_sha256(args.coco_annotations), [im.path for im in images] if preset.real_size else [])


def _cached_best_captions(images, clip: str, args, device) -> list[str]:
    """The best-caption selection is costly (5K images through CLIP): cache it beside the teacher images."""
    from . import coco
    from .sources import fingerprint
    from .store import cache_key, write_json_atomic

    key = cache_key({"annotations": coco.__name__, "ids": [im.image_id for im in images],
                     "captions": [list(im.captions) for im in images], "clip": fingerprint(clip)})
    path = Path(args.cache_dir or DEFAULT_CACHE) / "captions" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    chosen = coco.best_clip_captions(images, clip, device, progress=not args.no_progress)
    write_json_atomic(path, chosen)
    return chosen


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _image_files(folder: str) -> list[Path]:
    p = Path(folder)
    if not p.is_dir():
        raise SenseflowError(f"--real-images {folder!r} is not a folder of images (.png/.jpg)")
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SenseflowError(f"--real-images {folder!r} holds no .png/.jpg images")
    return files


def _student_teacher(spec: str, teacher: str | None) -> str | None:
    """--teacher also loads a student whose recorded teacher folder is not on this machine."""
    if teacher is None:
        return None
    from ..student import read_student
    from .sources import parse_spec
    recorded = read_student(parse_spec(spec)[1]).teacher
    if recorded.startswith("builtin:") or Path(os.path.expanduser(recorded)).is_dir():
        return None
    return teacher


def build_plan(args: argparse.Namespace):
    """Arguments -> a validated :class:`EvalPlan` (one-line errors; nothing written)."""
    from .backends import MetricSpec
    from .presets import get_preset
    from .runner import EvalPlan, resolve_device, validate_plan
    from .sources import pipeline_from_spec, student_from_spec

    if args.out is None:
        raise SenseflowError("--out DIR is required")
    preset = get_preset(args.preset) if args.preset else None
    weights = _key_values(args.weights, "--weights")
    for name, path in weights.items():
        if not Path(path).exists():
            raise SenseflowError(f"--weights {name}={path}: {path!r} does not exist")
    options = _metric_options(args.metric_option)
    students = [student_from_spec(s, teacher=_student_teacher(s, args.teacher), dtype=args.dtype)
                for s in args.student or []]
    pipelines = [pipeline_from_spec(s, dtype=args.dtype or "float32") for s in args.pipeline or []]
    teacher = _teacher_for(args, students, preset)
    device = resolve_device(args.device)
    prompts = _prompt_set(args, preset, weights, device)
    if args.metrics is not None:
        names = [m.strip() for m in args.metrics.split(",") if m.strip()]
    elif preset is not None:
        names = [m.name for m in preset.metrics]
    elif prompts.source.startswith("builtin:toy"):
        names = ["toy"]
    else:
        names = []
    preset_options = {m.name: m.options for m in preset.metrics} if preset is not None else {}
    metrics = [MetricSpec(n, weights.get(n), {**preset_options.get(n, {}), **options.get(n, {})}) for n in names]
    protocol: dict[str, Any] = preset.as_json() if preset is not None else {"name": "custom"}
    if preset is not None:
        protocol["comparable"] = len(prompts) // prompts.per_prompt >= preset.num_images \
            and args.seed in (None, preset.seed)
    plan = EvalPlan(out=Path(args.out), prompts=prompts, sources=[*students, *pipelines], teacher=teacher,
                    metrics=metrics, cache_dir=Path(args.cache_dir) if args.cache_dir else DEFAULT_CACHE,
                    batch_size=args.batch_size, metric_batch_size=args.metric_batch_size, device=args.device,
                    real_size=(args.real_size if args.real_size is not None else
                               (preset.real_size if preset is not None else None)),
                    protocol=protocol, html_rows=args.html_rows, progress=not args.no_progress)
    validate_plan(plan)
    return plan


# -------------------------------------------------------------------------------------------------
def _run(args: argparse.Namespace) -> int:
    if args.list_presets:
        from .presets import PRESETS
        for p in PRESETS.values():
            print(f"{p.name:18s} {p.description}")
        return 0
    if args.compare:
        from .compare import compare
        path = compare(args.compare, args.out)
        print(f"wrote {path}")
        return 0
    if args.teacher_curve:
        from .curve import curve_from_args
        return curve_from_args(args)
    from .runner import evaluate

    plan = build_plan(args)
    results = evaluate(plan)
    if results is not None:
        from .report import markdown_table
        print(markdown_table(results))
        print(f"\nwrote {plan.out / 'results.json'}, results.md, index.html, manifest.json")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", help="output folder: images/, results.json, results.md, index.html, "
                                                "manifest.json (re-running the same command resumes)")
    p.add_argument("--preset", metavar="NAME", help="a named protocol (senseflow-coco5k, dmd2-coco10k, sid-coco10k; "
                                                    "--list-presets)")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    src = p.add_argument_group("sources")
    src.add_argument("--student", action="append", metavar="[LABEL=]PATH[,steps=K][,sampler=S]",
                     help="a run dir, its student/ folder or student.safetensors (repeatable: one row each)")
    src.add_argument("--pipeline", action="append", metavar="[LABEL=]FOLDER[,steps=K][,cfg=W][,resolution=R]",
                     help="any diffusers pipeline folder (senseflow export, SD3.5-Turbo, SDXL-Lightning, ...)")
    src.add_argument("--teacher", metavar="FOLDER|builtin:toy",
                     help="the reference teacher (default: the first student's, from student.json)")
    src.add_argument("--no-teacher", action="store_true", help="do not sample the teacher")
    src.add_argument("--teacher-family", choices=[n for n in registry.names() if n != "custom"], default=None,
                     help="default: from model_index.json")
    src.add_argument("--teacher-steps", type=int, default=None, help="Euler steps (default: the preset's / paper's)")
    src.add_argument("--teacher-cfg", type=float, default=None,
                     help="CFG scale (embedded guidance for FLUX); default: the preset's")
    src.add_argument("--teacher-sampler", default="euler", choices=("euler", "pipeline"),
                     help="euler: senseflow's Euler sampler through the adapter (default); pipeline: the teacher "
                          "folder's own stock diffusers pipeline and scheduler")
    src.add_argument("--teacher-resolution", type=int, default=None, help="default: the student's / family's")
    pr = p.add_argument_group("prompts")
    pr.add_argument("--prompts", metavar="FILE|builtin:toy-world", help="prompt file (.txt/.json/.csv) or a toy world")
    pr.add_argument("--num-prompts", type=int, default=None, help="first N prompts (a preset's full size by default)")
    pr.add_argument("--per-prompt", type=int, default=1, help="images (seeds) per prompt (default 1)")
    pr.add_argument("--seed", type=int, default=None, help="base seed (default: the preset's, else 0)")
    pr.add_argument("--coco-annotations", metavar="JSON", help="COCO captions file, e.g. captions_val2017.json")
    pr.add_argument("--coco-images", metavar="DIR", help="the matching COCO image folder, e.g. val2017/")
    pr.add_argument("--real-images", metavar="DIR", help="real images for FID without a COCO preset")
    pr.add_argument("--real-size", type=int, default=None, help="centre-crop + resize real images to this size")
    me = p.add_argument_group("metrics")
    me.add_argument("--metrics", metavar="A,B", help="comma-separated metric names (default: the preset's; toy "
                                                    "prompts: toy)")
    me.add_argument("--weights", action="append", metavar="METRIC=PATH", help="local weights of a metric (repeatable)")
    me.add_argument("--metric-option", action="append", metavar="METRIC.KEY=VALUE",
                    help="a metric option, e.g. clip_score.prefix='A photo depicts '")
    ru = p.add_argument_group("running")
    ru.add_argument("--cache-dir", metavar="DIR", help=f"teacher reference cache (default {DEFAULT_CACHE}; "
                                                       f"$SENSEFLOW_CACHE moves it)")
    ru.add_argument("--batch-size", type=int, default=4, help="images per sampling batch (default 4)")
    ru.add_argument("--metric-batch-size", type=int, default=32, help="images per metric batch (default 32)")
    ru.add_argument("--device", default="auto", help="auto (default), cpu, cuda (under torchrun: each rank's GPU)")
    ru.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="model dtype")
    ru.add_argument("--html-rows", type=int, default=16, help="prompts shown side by side in index.html")
    ru.add_argument("--no-progress", action="store_true", help="no progress bar")
    cu = p.add_argument_group("teacher error curve (SenseFlow Fig. 4)")
    cu.add_argument("--teacher-curve", action="store_true",
                    help="xi(t) = ||x0 - x0_hat(x_t, t)||^2 / ||x0||^2 of --teacher on its own samples: curve.png + "
                         "curve.json")
    cu.add_argument("--curve-points", type=int, default=20, help="number of t values (default 20)")
    co = p.add_argument_group("comparison")
    co.add_argument("--compare", nargs="+", metavar="RESULTS", help="results.json files (or their folders) to put "
                                                                   "in one table in --out")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="score students, teachers and stock pipelines on a fixed protocol (FID-T, CLIP, ...)",
        description="Sample every source on fixed (prompt, seed) pairs (resumable; sharded under torchrun; teacher "
                    "references cached), score them in index order and write results.json, results.md, index.html "
                    "and manifest.json. docs/evaluation.md describes sources, presets and metrics.")
    add_arguments(p)
    p.set_defaults(func=_run)
