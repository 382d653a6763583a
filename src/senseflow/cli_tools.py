"""``senseflow generate`` and ``senseflow export`` (trained students -> images / diffusers folders)."""

from __future__ import annotations

import argparse


def _generate(args: argparse.Namespace) -> int:
    from .generate import generate

    result = generate(args.student, args.prompts, args.out, teacher=args.teacher, start_idx=args.start_idx,
                      num_prompts=args.num_prompts, batch_size=args.batch_size, steps=args.steps,
                      sampler=args.sampler, seed=args.seed, device=args.device, dtype=args.dtype,
                      progress=not args.no_progress, format=args.format,
                      weights=args.weights)
    done = f" ({result.skipped} already there)" if result.skipped else ""
    what = "images" if result.format == "png" else f"latents ({result.format})"
    print(f"wrote {len(result.written)} {what} to {result.out}{done}")
    return 0


def _export(args: argparse.Namespace) -> int:
    import json

    from .export_diffusers import EXPORT_META, export_diffusers

    if args.format != "diffusers":
        from .export_original import export
        out = export(args.format, args.student, args.out, teacher=args.teacher, link=args.link,
                     max_shard_size=args.max_shard_size, dtype=args.dtype, merge_lora=args.merge_lora,
                     overwrite=args.overwrite, sampler=args.sampler, weights=args.weights)
        info = json.loads((out / EXPORT_META).read_text())
        print(f"exported a {info['steps']}-step {info['family']} student as {args.format} to {out / info['file']} "
              f"({info['where']}); diffusers reads it back with:\n")
        print(info["snippet"])
        return 0
    out = export_diffusers(args.student, args.out, teacher=args.teacher, link=args.link,
                           max_shard_size=args.max_shard_size, dtype=args.dtype, merge_lora=args.merge_lora,
                           overwrite=args.overwrite, sampler=args.sampler, weights=args.weights)
    info = json.loads((out / EXPORT_META).read_text())
    print(f"exported a {info['steps']}-step {info['sampler']} {info['pipeline']} to {out}; run it with:\n")
    print(info["snippet"])
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser(
        "generate", help="sample images from a trained student (PNG + JSON per prompt)",
        description="Sample images from a trained student: NNNNN.png and NNNNN.json (prompt, seed, steps, sampler, "
                    "anchors) per prompt. Per-image seeds come from (--seed, prompt index), so any subset of the "
                    "prompts reproduces the same images, and so does the folder written by `senseflow export` with "
                    "a stock diffusers pipeline. Images already written with the same settings are skipped.")
    g.add_argument("--student", required=True, metavar="DIR", help="a run's student/ folder, or the run directory")
    g.add_argument("--prompts", required=True, metavar="FILE", help="prompts: .txt (one per line), .json or .csv")
    g.add_argument("--out", required=True, metavar="DIR", help="output folder for the images")
    g.add_argument("--teacher", metavar="FOLDER", help="teacher folder (default: the one recorded in student.json)")
    g.add_argument("--start-idx", type=int, default=0, metavar="N", help="first prompt index (default 0)")
    g.add_argument("--num-prompts", type=int, default=None, metavar="N", help="number of prompts (default: all)")
    g.add_argument("--batch-size", type=int, default=4, metavar="N", help="images per forward (default 4)")
    g.add_argument("--steps", type=int, default=None, metavar="K",
                   help="sampling steps, at most the number of anchors (default: all anchors)")
    g.add_argument("--sampler", choices=("stochastic", "euler"), default=None,
                   help="default: the sampler the student was trained with (student.json)")
    g.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    g.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="model dtype (default: the run's teacher.dtype)")
    g.add_argument("--format", choices=("auto", "png", "safetensors", "npy"), default="auto",
                   help="png: decoded images; safetensors / npy: the raw latents x0 (before decode), float32, "
                        "one file per prompt; auto (default): png, or safetensors for a model whose outputs are "
                        "not images")
    g.add_argument("--weights", choices=("ema", "raw"), default=None,
                   help="weight set of a run that kept an EMA (generator.ema): ema or raw (default: the student's "
                        "student.safetensors, the EMA unless the run set generator.ema.weights: raw)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.set_defaults(func=_generate)

    e = sub.add_parser(
        "export", help="write a trained student as a diffusers pipeline folder",
        description="Write a diffusers folder that stock DiffusionPipeline.from_pretrained(FOLDER) runs: the "
                    "teacher's components (hard-linked), the student backbone, and a scheduler that takes exactly "
                    "the student's steps. senseflow_export.json and README.md hold the pipeline call that "
                    "reproduces `senseflow generate`. --format single-file / checkpoint / kohya-lora write the "
                    "original layouts ComfyUI / A1111 load instead (docs/families.md).")
    e.add_argument("--student", required=True, metavar="DIR", help="a run's student/ folder, or the run directory")
    e.add_argument("--out", required=True, metavar="FOLDER", help="the folder to write")
    e.add_argument("--format", choices=("diffusers", "single-file", "checkpoint", "kohya-lora"), default="diffusers",
                   help="diffusers (default): a stock-pipeline folder; single-file: FOLDER/FOLDER.safetensors, the "
                        "backbone in the model's original layout (ComfyUI Load Diffusion Model; LoRA merged); "
                        "checkpoint: the same plus the teacher's text encoders and VAE in one file (SDXL: A1111 / "
                        "Forge, ComfyUI Load Checkpoint); kohya-lora: a LoRA student's adapters in kohya-ss' layout "
                        "next to the diffusers-format LoRA")
    e.add_argument("--teacher", metavar="FOLDER", help="teacher folder (default: the one recorded in student.json)")
    e.add_argument("--sampler", choices=("stochastic", "euler"), default=None,
                   help="default: the sampler the student was trained with")
    e.add_argument("--link", choices=("hardlink", "copy", "symlink"), default="hardlink",
                   help="how the teacher's components get into the folder (default hardlink; copies across file "
                        "systems)")
    e.add_argument("--max-shard-size", default="5GB", help="shard size of the backbone's safetensors (default 5GB)")
    e.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="store the backbone in this dtype (default: as trained)")
    e.add_argument("--merge-lora", action="store_true",
                   help="LoRA students: merge the adapters into the backbone instead of writing "
                        "pytorch_lora_weights.safetensors")
    e.add_argument("--weights", choices=("ema", "raw"), default=None,
                   help="weight set of a run that kept an EMA (generator.ema): ema or raw (default: the student's "
                        "student.safetensors, the EMA unless the run set generator.ema.weights: raw)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    e.set_defaults(func=_export)
