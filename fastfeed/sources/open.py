"""``open_source(path)``: the one place that turns a path into a :class:`Source`.

Used by :func:`fastfeed.pack`, every CLI command and the examples, so ``fastfeed pack``,
``inspect``, ``profile`` and ``bench`` accept exactly the same inputs:

- an LMDB directory (holding ``data.mdb``) → :class:`LMDBSource`;
- a single-file LMDB (written with ``subdir=False``, any name): recognised by LMDB's magic
  number in its first page, not by its extension → :class:`LMDBSource`;
- any other directory → :class:`FileSource` over it as an ImageFolder root;
- any other file → :class:`FileSource` over it as a file list (``path[<TAB>label]`` lines);
- a glob pattern (``*``, ``?``, ``[``) that is not an existing path → :class:`FileSource`.
"""

from __future__ import annotations

import os

from fastfeed.errors import SourceNotFoundError
from fastfeed.sources.base import Source

__all__ = ["is_lmdb", "is_lmdb_file", "open_source"]

_LMDB_MAGIC = 0xBEEFC0DE
_MAGIC_OFFSET = 16  # the MDB_page header precedes MDB_meta on 64-bit builds
_GLOB_CHARS = frozenset("*?[")


def is_lmdb_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a regular file that starts like an LMDB data file (magic number).

    Reads 20 bytes; any ``OSError`` (missing, unreadable) counts as "no".
    """
    try:
        with open(path, "rb") as f:
            head = f.read(_MAGIC_OFFSET + 4)
    except OSError:
        return False
    if len(head) < _MAGIC_OFFSET + 4:
        return False
    return int.from_bytes(head[_MAGIC_OFFSET:], "little") == _LMDB_MAGIC


def is_lmdb(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an LMDB: a directory holding ``data.mdb``, or an LMDB data file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "data.mdb"))
    return os.path.isfile(path) and is_lmdb_file(path)


def open_source(src: str | os.PathLike[str] | Source) -> Source:
    """Open what ``src`` is: an LMDB, an ImageFolder root, a file list or a glob.

    A :class:`Source` is returned unchanged (the caller keeps owning it).

    Args:
        src: A path (see the module docstring for what each kind becomes) or a source.

    Returns:
        A new, open source; close it (or use ``with``) when done.

    Raises:
        SourceNotFoundError: ``src`` does not exist and is not a glob pattern.
        EmptySourceError: A folder, list or glob with no record.
        CorruptSourceError: A ``data.mdb`` or ``*.lmdb`` file that is not an LMDB; a
            binary file that is not an LMDB either (an image is not a file list).
    """
    from fastfeed.sources.files import FileSource
    from fastfeed.sources.lmdb import LMDBSource

    if isinstance(src, Source):
        return src
    path = os.fsdecode(src)
    if not os.path.exists(path):
        if _GLOB_CHARS & set(path):
            return FileSource.from_glob(path)
        raise SourceNotFoundError(f"input not found: {path}", path=path)
    if is_lmdb(path) or (os.path.isfile(path) and path.endswith((".lmdb", ".mdb"))):
        return LMDBSource(path)  # a broken *.lmdb file: LMDBSource says what is wrong
    if os.path.isdir(path):
        return FileSource.from_folder(path)
    return FileSource.from_list(path)
