"""``senseflow cache``: encode a run's prompts (and images) once, so training runs without text encoders."""

from __future__ import annotations

import argparse


def _cmd_cache(args: argparse.Namespace) -> int:
    from .config import load_config
    from .data.cache import build_cache, encoding_config
    from .teachers.base import SenseflowError

    config = load_config(args.config, args.set or [], check_paths=False)
    encoding_config(config).check_paths()
    out = args.output or getattr(config.paths, "cache", None)
    if out is None:
        raise SenseflowError("where should the cache go? set paths.cache in the config or pass --output DIR")
    if args.device is not None:
        config = config.model_copy(update={"train": config.train.model_copy(update={"device": args.device})})
    path = build_cache(config, out, batch_size=args.batch_size, shard_size=args.shard_size, overwrite=args.overwrite,
                       dtype=args.dtype, latent_sample=args.latents == "sample", check_images=args.check_images,
                       progress=not args.no_progress)
    from .data.cache import open_cache

    cache = open_cache(path)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    extra = " + latents" if cache.has_latents else ""
    evals = cache.index.get("eval")
    grid = f", {evals['num_items']} sample-grid prompts" if evals else ""
    print(f"cached {len(cache)} items (conditioning{extra}, the unconditional embedding{grid}) in {path}: "
          f"{len(cache.shards)} shard(s), {size / 2**20:.1f} MiB")
    print(f"train from it with: --set paths.cache={path}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache", help="encode the training prompts (and images) once into a prompt/latent cache",
        description="Encode the run's data with the teacher's text encoders (and images with its VAE) into "
                    "safetensors shards + index.json.  Training with paths.cache then loads the teacher without "
                    "text encoders.  The build is atomic (a <DIR>.partial directory renamed when complete) and an "
                    "interrupted build resumes when the same command is run again.  See docs/data.md.")
    p.add_argument("config", help="the run's YAML config (paths.teacher + paths.prompts, paths.image_text or "
                                  "paths.lmdb)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--output", "-o", metavar="DIR", help="cache directory (default: paths.cache)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="prompts/images per encoder call (16)")
    p.add_argument("--shard-size", type=int, default=None, metavar="N",
                   help="items per shard file (default: about 512 MiB per shard, at most 4096 items)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="store tensors in this dtype (default: as the encoders return them, i.e. teacher.dtype)")
    p.add_argument("--latents", choices=["sample", "mode"], default="sample",
                   help="image data: cache a VAE posterior sample (seeded per item, default) or the posterior mode")
    p.add_argument("--check-images", choices=["none", "header", "full"], default="header",
                   help="before encoding, check every image: exists (none), PIL reads its header (header, default) "
                        "or decodes it (full)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="override train.device")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache (atomically, when complete)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_cache)
