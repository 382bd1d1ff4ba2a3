"""The ``fastfeed`` command line: a thin layer over the library.

Each subcommand lives in ``fastfeed/commands/<name>.py`` and provides
``HELP: str``, ``add_arguments(parser)`` and ``run(args) -> int`` (the exit code).
Modules are imported only when their command runs, so ``fastfeed --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from fastfeed import __version__
from fastfeed.errors import FastFeedError

__all__ = ["main"]

# name -> one-line help; the order is the order shown in --help.
COMMANDS: dict[str, str] = {
    "demo": "run the whole pipeline on generated data and print what it did",
    "pack": "pack an image folder, file list or LMDB into one LMDB (a directory holding data.mdb)",
    "inspect": "print count, classes, sizes and sample keys of an LMDB or folder",
    "profile": "measure which stage (IO, CPU, copy, model) bounds a pipeline",
    "bench": "loader throughput on your data against torch's DataLoader",
}


def _build_parser(only: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastfeed", description="fastfeed: keep GPUs fed during PyTorch training."
    )
    parser.add_argument("--version", action="version", version=f"fastfeed {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:
            importlib.import_module(f"fastfeed.commands.{name}").add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    only = next((a for a in argv if not a.startswith("-")), None)
    parser = _build_parser(only if only in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(f"fastfeed.commands.{args.command}")
    try:
        return int(module.run(args) or 0)
    except FastFeedError as exc:
        print(f"fastfeed {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fastfeed {args.command}: interrupted", file=sys.stderr)
        return 130
