"""The on-disk format of a fastfeed LMDB: its metadata keys, record keys and value order.

* :data:`FORMAT_VERSION`, :data:`META_KEY`, :data:`LABELS_KEY`, :data:`PATHS_KEY`: what
  :func:`fastfeed.pack` writes next to the records (see :mod:`fastfeed.packing`).
* :func:`record_key`: the key of record ``i``.
* :func:`values_in_key_order`, :func:`ensure_key_order`: check (from the B-tree pages) and
  restore (by a compacting copy) the key order of the values that run reads rely on.

Re-exported by :mod:`fastfeed.sources.lmdb`, the public import path.
"""

from __future__ import annotations

import json
import os

import lmdb

from fastfeed.sources._lmdb_btree import RecordIndex

__all__ = [
    "FORMAT_VERSION",
    "LABELS_KEY",
    "META_KEY",
    "PATHS_KEY",
    "ensure_key_order",
    "record_key",
    "values_in_key_order",
]

#: Version of the on-disk layout written by :func:`fastfeed.pack`.
FORMAT_VERSION = 1
#: JSON metadata: ``{"format_version", "count", "classes", "has_labels", "has_paths", ...}``.
META_KEY = b"__fastfeed__"
#: ``count`` little-endian int64 labels (``-1`` = no label).
LABELS_KEY = b"__fastfeed__/labels"
#: UTF-8 JSON list of the records' original (relative) paths.
PATHS_KEY = b"__fastfeed__/paths"
#: Values up to this size live inside B-tree leaf pages, which the key lookup itself
#: brings in; larger ones are on overflow pages of their own, read with one ``pread``.
_INLINE_BYTES = 2048


def record_key(index: int) -> bytes:
    """The key of record ``index`` in a fastfeed LMDB: ten zero-padded ASCII digits."""
    return b"%010d" % index


def values_in_key_order(path: str | os.PathLike[str]) -> bool:
    """Whether the record values on overflow pages of a fastfeed LMDB lie in key order.

    Reads the B-tree's pages (:class:`~fastfeed.sources._lmdb_btree.RecordIndex`), not the
    values, of a database directory no process writes to. Small values live inside leaf
    pages, in the order of the leaves; they are not compared. True for a database without
    fastfeed metadata (nothing to compare).
    """
    path = os.fspath(path)
    env = lmdb.open(path, readonly=True, lock=False, max_dbs=0)
    try:
        psize = env.stat()["psize"]
        with env.begin() as txn:
            raw_meta = txn.get(META_KEY)
    finally:
        env.close()
    if raw_meta is None:
        return True
    count = int(json.loads(raw_meta)["count"])
    fd = os.open(os.path.join(path, "data.mdb"), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        ix = RecordIndex(fd, psize, count)
        last = -1
        for i in range(count):
            where = ix.locate(i)
            if where is None or where[1] <= _INLINE_BYTES:
                continue
            if where[0] < last:
                return False
            last = where[0]
    finally:
        os.close(fd)
    return True


def ensure_key_order(path: str | os.PathLike[str]) -> bool:
    """Rewrite an LMDB directory's ``data.mdb`` so its values lie in key order.

    Writing one transaction per batch lets LMDB reuse pages freed by earlier batches for
    small overflow values (1-2 pages: records of 2-8 KB), out of key order. A compacting
    copy (``mdb_env_copy2(MDB_CP_COMPACT)``) writes the B-tree depth first: every value
    in key order, each leaf after its values. Only done when the walk finds values out of
    order (records of several pages were always in order in ``benchmarks/slow_disk.py``'s
    packs). For a directory no process has open.

    Returns:
        True if the file was rewritten.
    """
    path = os.fspath(path)
    if values_in_key_order(path):
        return False
    scratch = os.path.join(path, ".compact")
    os.mkdir(scratch)
    try:
        env = lmdb.open(path, readonly=True, lock=False, max_dbs=0)
        try:
            env.copy(scratch, compact=True)
        finally:
            env.close()
        os.replace(os.path.join(scratch, "data.mdb"), os.path.join(path, "data.mdb"))
    finally:
        for name in os.listdir(scratch):
            os.unlink(os.path.join(scratch, name))
        os.rmdir(scratch)
    return True
