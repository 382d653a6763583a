"""``senseflow convert-weights {hps,image-reward} SRC OUT``: official metric checkpoints -> transformers folders."""

from __future__ import annotations

import argparse


def _convert(args: argparse.Namespace) -> int:
    if args.kind == "hps":
        from .convert.hps import convert_hps

        out = convert_hps(args.src, args.out, tokenizer=args.tokenizer, overwrite=args.overwrite)
        metric = "hps"
    else:
        from .convert.image_reward import convert_image_reward

        out = convert_image_reward(args.src, args.out, tokenizer=args.tokenizer, overwrite=args.overwrite)
        metric = "image_reward"
    print(f"wrote {out}; use it as the {metric} metric's weights")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert-weights", help="convert official metric checkpoints (HPSv2, ImageReward) to transformers folders",
        description="Read an official metric checkpoint (a plain tensor state dict: nothing pickled is executed), "
                    "check that every weight maps, and write a transformers folder the metric loads offline. "
                    "hps: HPS_v2(.1)_compressed.pt (open_clip ViT-H-14) -> CLIPModel; image-reward: "
                    "ImageReward.pt (BLIP ViT-L + BERT + MLP) -> BlipForImageTextRetrieval + mlp.safetensors.")
    p.add_argument("kind", choices=("hps", "image-reward"))
    p.add_argument("src", metavar="SRC", help="the official checkpoint file")
    p.add_argument("out", metavar="OUT", help="output folder (written atomically)")
    p.add_argument("--tokenizer", required=True, metavar="DIR",
                   help="tokenizer folder to copy in: CLIP-H's for hps (laion/CLIP-ViT-H-14-laion2B-s32B-b79K), "
                        "bert-base-uncased's for image-reward")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_convert)
