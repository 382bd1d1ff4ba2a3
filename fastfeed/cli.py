"""The ``fastfeed`` command line: a thin layer over the library.

Each subcommand lives in ``fastfeed/commands/<name>.py`` and provides ``HELP: str`` (the
one place its help text lives), ``add_arguments(parser)`` and ``run(args) -> int`` (the
exit code). Command modules import only the standard library at import time, so
``fastfeed --help`` does not import torch.

Every failure is one line on stderr, ``fastfeed <command>: error: <what>``, and a non-zero
exit: 2 for a bad command line, 1 for any other error, 130 for Ctrl-C. No traceback is
printed unless ``FASTFEED_TRACEBACK=1`` is set (for bug reports).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import NoReturn

from fastfeed.commands import NAMES
from fastfeed.errors import FastFeedError

__all__ = ["main"]

_DESCRIPTION = "fastfeed: keep GPUs fed during PyTorch training."


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) that point at ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _command(name: str) -> ModuleType:
    return importlib.import_module(f"fastfeed.commands.{name}")


def _version() -> str:
    from fastfeed import __version__

    return __version__


def _build_parser(only: str | None) -> argparse.ArgumentParser:
    parser = _Parser(prog="fastfeed", description=_DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"fastfeed {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in NAMES:
        module = _command(name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        if name == only:
            module.add_arguments(p)
    return parser


def _one_line(exc: BaseException) -> str:
    # Undecodable file-name bytes travel as surrogates: show them as \xNN.
    raw = " ".join(str(exc).split()).encode("utf-8", "surrogateescape")
    text = raw.decode("utf-8", "backslashreplace")
    if isinstance(exc, FastFeedError):
        return text or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # File names are bytes on POSIX; print undecodable ones escaped, never crash on them.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    only = next((a for a in argv if not a.startswith("-")), None)
    parser = _build_parser(only if only in NAMES else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    prefix = f"fastfeed {args.command}"
    try:
        return int(_command(args.command).run(args) or 0)
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except BrokenPipeError:  # `fastfeed inspect x | head`
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - closed at exit
        except OSError:
            pass
        return 1
    except Exception as exc:
        if os.environ.get("FASTFEED_TRACEBACK") == "1":
            raise
        print(f"{prefix}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
