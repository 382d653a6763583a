"""The ``senseflow`` command.

Every user error (bad config, missing path, unreadable data) is reported as one line on stderr
with a non-zero exit status and nothing written; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

EXIT_USER_ERROR = 2


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import dump_config, load_config

    config = load_config(args.config, args.set or [])
    if args.dry_run:
        sys.stdout.write(dump_config(config))
        return 0
    from . import api

    trainer = api.train(config, resume=args.resume)
    print(f"done: {trainer.step} iterations; student in {trainer.run_dir / 'student'}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="distil a few-step student as described by a YAML config",
                       description="Train a few-step student (SenseFlow, DMD2 or SiD-DiT) from a YAML config. "
                                   "Re-running the same command continues from the latest checkpoint.")
    p.add_argument("config", help="YAML config (see configs/ and docs/config.md)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=100 --set method.ttur=10 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="validate, print the resolved config and exit")
    p.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                   help="auto: continue the run in paths.output if it has a checkpoint (default); "
                        "never: refuse to reuse a directory that holds a run; PATH: a checkpoint directory")
    p.set_defaults(func=_cmd_train)


# Subcommands contributed by other modules register here: name -> (adder)
EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def _load_extra_commands() -> None:
    import importlib

    for module in ("senseflow.toy.cli", "senseflow.cli_data", "senseflow.cli_tools", "senseflow.bench.cli",
                   "senseflow.evaluation.cli_convert", "senseflow.evaluation.cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module.startswith(exc.name):
                raise
            continue
        adder = getattr(mod, "add_commands", None)
        if adder is not None and adder not in EXTRA_COMMANDS:
            EXTRA_COMMANDS.append(adder)


def make_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="senseflow",
        description="Few-step distillation of text-to-image diffusion and flow models "
                    "(SenseFlow: DMD2 + IDA + ISG; SiD-DiT).")
    parser.add_argument("--version", action="version", version=f"senseflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    _load_extra_commands()
    for adder in EXTRA_COMMANDS:
        adder(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: weights are local folders
    parser = make_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    from .teachers.base import SenseflowError

    try:
        return int(args.func(args) or 0)
    except SenseflowError as exc:
        print(f"senseflow: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("senseflow: interrupted; the latest checkpoint is kept (re-run to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
