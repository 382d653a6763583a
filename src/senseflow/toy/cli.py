"""``senseflow toy ...`` subcommands (the toy world's teacher and discriminator backbone)."""

from __future__ import annotations

import argparse


def _train_teacher(args: argparse.Namespace) -> int:
    from .teacher import run
    return run(args)


def _train_backbone(args: argparse.Namespace) -> int:
    from .backbone import run
    return run(args)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_from_args
    return run_from_args(args)


def _gmm(args: argparse.Namespace) -> int:
    from .gmm.bench import run
    return run(args)


def add_commands(sub: argparse._SubParsersAction) -> None:
    from .demo import add_arguments as demo_arguments
    demo = sub.add_parser("demo", help="distil the shipped toy teacher on CPU and report what the student gets right",
                          description="Distil the shipped toy teacher (a tiny SD3) with SenseFlow, DMD2 or SiD on "
                                      "CPU; writes metrics.json, grid.png and curves.png.")
    demo_arguments(demo)
    demo.set_defaults(func=_demo)

    toy = sub.add_parser("toy", help="the procedural toy world: train its teacher or its DINOv2",
                         description="Tools of the procedural toy world (the embedded default).")
    toy_sub = toy.add_subparsers(dest="toy_command", metavar="TOOL", required=True)
    from .teacher import add_arguments
    p = toy_sub.add_parser("train-teacher", help="train the toy SD3 teacher on procedural images (resumable)")
    add_arguments(p)
    p.set_defaults(func=_train_teacher)
    from .backbone import add_arguments as backbone_arguments
    p = toy_sub.add_parser("train-backbone", help="pretrain the toy DINOv2 of the VFM discriminator (masked image "
                                                  "modelling on procedural images, no labels)")
    backbone_arguments(p)
    p.set_defaults(func=_train_backbone)
    from .gmm.bench import add_arguments as gmm_arguments
    p = toy_sub.add_parser("gmm", help="ground-truth benchmark: distil a Gaussian-mixture teacher, score against the "
                                       "true mixture (docs/ground_truth.md)")
    gmm_arguments(p)
    p.set_defaults(func=_gmm)
