"""Subcommands of the ``fastfeed`` CLI; see :mod:`fastfeed.cli` for the contract.

Each module imports only the standard library at import time (``fastfeed --help`` reads
every module's ``HELP`` and must not import torch); the library is imported inside the
functions that run the command.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fastfeed.errors import ConfigError

if TYPE_CHECKING:
    from fastfeed._procio import Residency

__all__ = [
    "NAMES",
    "check_input_file",
    "check_output_dir",
    "check_output_file",
    "drop_cached",
    "storage_files",
]

#: The commands in the order ``fastfeed --help`` lists them.
NAMES: tuple[str, ...] = ("demo", "pack", "inspect", "profile", "bench")


def check_output_file(path: str | None, option: str) -> None:
    """Fail now, before any work, if ``path`` cannot be written later.

    Args:
        path: The file an option will write (``None``: the option was not given).
        option: The option's name for the message (``"--json"``).

    Raises:
        ConfigError: The folder is missing, is not a folder or is not writable, or the
            path is an existing folder.
    """
    if path is None:
        return
    parent = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise ConfigError(f"{option} {path}: is a directory, expected a file name")
    if not os.path.exists(parent):
        raise ConfigError(f"{option} {path}: the folder {parent} does not exist")
    if not os.path.isdir(parent):
        raise ConfigError(f"{option} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: no permission to write in {parent}")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ConfigError(f"{option} {path}: the file exists and is not writable")


def check_output_dir(path: str | None, option: str) -> None:
    """Fail now if ``path`` exists and is not a folder (it will be created otherwise).

    Raises:
        ConfigError: ``path`` is an existing file, or a parent component is a file.
    """
    if path is None:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{option} {path}: exists and is not a folder")
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise ConfigError(f"{option} {path}: {parent} is a file, not a folder")


def check_input_file(path: str | None, option: str) -> None:
    """Fail now if ``path`` is not a readable file.

    Raises:
        ConfigError: Missing, a folder, or unreadable.
    """
    if path is None:
        return
    if not os.path.exists(path):
        raise ConfigError(f"{option} {path}: no such file")
    if not os.path.isfile(path):
        raise ConfigError(f"{option} {path}: not a file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{option} {path}: not readable")


def storage_files(source: Any, indices: Sequence[int] | None = None) -> list[str]:
    """The files holding ``source``'s records (``indices`` only, for a FileSource).

    A FileSource's record files, an LMDB's data file; empty when the records are not
    in files this process can name (a custom source, a dataset in RAM).
    """
    from fastfeed.sources.base import source_chain

    inner = source_chain(source)[-1]
    paths = getattr(inner, "paths", None)
    if paths is not None:
        return [paths[i] for i in (range(len(paths)) if indices is None else indices)]
    data = getattr(inner, "data_path", None)
    return [data] if data else []


def drop_cached(files: Sequence[str], source: Any = None) -> Residency:
    """Drop ``files`` from the page cache (``posix_fadvise(DONTNEED)``, no root needed).

    Args:
        files: The files (see :func:`storage_files`).
        source: The open source reading them: its memory map's pages are released
            first (a page this process maps is not dropped).

    Returns:
        What stayed in the page cache (``mincore``): dirty pages and pages other
        processes map can stay.
    """
    from fastfeed._procio import evict, residency
    from fastfeed.sources.base import source_chain

    if source is not None:
        release = getattr(source_chain(source)[-1], "release_mapped_pages", None)
        if callable(release):
            release()
    evict(files)
    return residency(files)
