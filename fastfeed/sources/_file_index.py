"""Indexing files for :class:`~fastfeed.sources.files.FileSource`: which files, which labels.

* :func:`index_folder`: an ImageFolder root, exactly like ``torchvision.datasets.ImageFolder``.
* :func:`glob_paths`: the regular files matching a glob pattern.
* :func:`read_file_list`: a text file of ``path`` or ``path<TAB>label`` lines.

The ``FileSource.from_*`` constructors document the rules and call these.
"""

from __future__ import annotations

import glob as _glob
import os
from collections.abc import Sequence

from fastfeed.errors import ConfigError, CorruptSourceError, EmptySourceError, SourceNotFoundError

__all__ = ["glob_paths", "index_folder", "read_file_list"]


def index_folder(
    root: str | os.PathLike[str], extensions: Sequence[str] | None, allow_empty: bool
) -> tuple[list[str], list[int], list[str], str]:
    """``(paths, labels, classes, root)`` of an ImageFolder root; see ``FileSource.from_folder``."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        if os.path.exists(root):
            raise SourceNotFoundError(f"ImageFolder root is not a directory: {root}", path=root)
        raise SourceNotFoundError(f"ImageFolder root does not exist: {root}", path=root)
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise EmptySourceError(f"no class folders found in {root}", path=root)
    exts = tuple(e.lower() for e in extensions) if extensions is not None else None
    paths: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        before = len(paths)
        for dirpath, _, fnames in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            for fname in sorted(fnames):
                if exts is None or fname.lower().endswith(exts):
                    paths.append(os.path.join(dirpath, fname))
                    labels.append(label)
        if len(paths) == before:
            empty.append(name)
    if empty and (not allow_empty or not paths):
        raise EmptySourceError(
            f"found no valid file for the classes {', '.join(empty)} in {root} "
            f"(extensions: {', '.join(exts) if exts else 'any'})",
            path=root,
        )
    return paths, labels, classes, root


def glob_paths(pattern: str) -> list[str]:
    """Every regular file matching ``pattern``, sorted; see ``FileSource.from_glob``."""
    paths = sorted(p for p in _glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise EmptySourceError(f"no files match {pattern}", path=pattern)
    return paths


def read_file_list(list_file: str | os.PathLike[str]) -> tuple[list[str], list[int] | None, str]:
    """``(paths, labels or None, base folder)`` of a file list; see ``FileSource.from_list``."""
    list_file = os.fspath(list_file)
    try:
        with open(list_file, "rb") as f:
            raw = f.read()
    except FileNotFoundError as exc:
        raise SourceNotFoundError(f"file list not found: {list_file}", path=list_file) from exc
    except OSError as exc:
        raise SourceNotFoundError(
            f"cannot read file list {list_file}: {exc}", path=list_file
        ) from exc
    if b"\0" in raw[:8192]:
        raise CorruptSourceError(
            f"{list_file} is a binary file, not a file list of path[<TAB>label] lines "
            "(for images, pass their folder or a glob pattern)",
            path=list_file,
        )
    # Names on POSIX are bytes: undecodable ones survive as surrogates (os.fsdecode).
    lines = raw.decode("utf-8", "surrogateescape").splitlines()
    base = os.path.dirname(os.path.abspath(list_file))
    paths: list[str] = []
    labels: list[int | None] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        path, sep, label = line.rpartition("\t") if "\t" in line else (line, "", "")
        path = path.strip() if sep else line.strip()
        if sep:
            try:
                labels.append(int(label.strip()))
            except ValueError as exc:
                raise ConfigError(
                    f"{list_file}:{lineno}: label {label.strip()!r} is not an integer"
                ) from exc
        else:
            labels.append(None)
        paths.append(path if os.path.isabs(path) else os.path.join(base, path))
    if not paths:
        raise EmptySourceError(f"file list {list_file} lists no files", path=list_file)
    has = [x is not None for x in labels]
    if any(has) and not all(has):
        raise ConfigError(f"{list_file}: some lines have a label and some do not")
    return paths, [int(x) for x in labels if x is not None] if all(has) else None, base
