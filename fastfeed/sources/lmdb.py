"""``LMDBSource``: records stored in one LMDB (as written by :func:`fastfeed.pack`).

The environment is opened read-only with ``lock=False`` (no lock file, no reader table:
nothing is written next to the data, so read-only media and many processes work) in the
process that reads, lazily, and again after a fork. It never creates a database: a missing
path is :class:`~fastfeed.errors.SourceNotFoundError`. At open it checks that the data file
holds every page LMDB's metadata says it uses; a truncated ``data.mdb`` would otherwise kill
the process with SIGBUS on the first read of a missing page. A file truncated *after* open
is caught by a best-effort check before every read call (one ``fstat`` of the open data
file, ~1 us per call, not per record): the call raises
:class:`~fastfeed.errors.CorruptSourceError` instead of faulting. A truncation that races
with a read already past the check can still fault; nothing short of a SIGBUS handler
(which Python cannot install safely) closes that window.

Reads: a batch whose pages are in the page cache is copied out of the memory map in one
transaction. A cold batch is read concurrently with ``pread`` at the values' file offsets
(found in LMDB's own B-tree pages, without touching the values), and runs of consecutive
records with one range each when the order asks for them (``shuffle="block"``); see
:class:`LMDBSource`. A map grown by a writer is adopted; a file replaced under the source
raises :class:`~fastfeed.errors.SourceChangedError`.

A database written by fastfeed carries its labels, class names and original paths (see
:mod:`fastfeed.packing` for the format). Any other LMDB is readable too: its keys are listed at
open in LMDB order, index ``i`` is the ``i``-th key, and there are no labels.

This module holds the public class (constructor, metadata loading, reads, hints,
pickling) and re-exports the format names. Its layers live in private modules:
:mod:`~fastfeed.sources._lmdb_format` (keys, format version, value order),
:mod:`~fastfeed.sources._lmdb_env` (opening, size checks, map guard, grown maps),
:mod:`~fastfeed.sources._lmdb_cold` (cold and run reads), with the low-level helpers in
:mod:`~fastfeed.sources._lmdb_io` and :mod:`~fastfeed.sources._lmdb_btree`.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import lmdb
import numpy as np

from fastfeed.errors import CorruptSourceError
from fastfeed.sources._lmdb_cold import _LMDBColdReads
from fastfeed.sources._lmdb_env import _default_max_readers, _EnvEntry
from fastfeed.sources._lmdb_format import (
    FORMAT_VERSION,
    LABELS_KEY,
    META_KEY,
    PATHS_KEY,
    ensure_key_order,
    record_key,
    values_in_key_order,
)
from fastfeed.sources.base import Record

__all__ = [
    "FORMAT_VERSION",
    "LABELS_KEY",
    "META_KEY",
    "PATHS_KEY",
    "RUN_BYTES",
    "LMDBSource",
    "ensure_key_order",
    "record_key",
    "values_in_key_order",
]

#: Default run size: records ``[b*R, (b+1)*R)`` with ``R * mean record size`` about this many
#: bytes are one run, read with one request when a call needs several of its records. At
#: 100 MB/s and 400 IO operations/s one operation costs the time of 250 KB, so a run is
#: bandwidth-bound from about 2.5 MB (10 operations' worth); ``benchmarks/slow_disk.py``.
RUN_BYTES = 4 << 20

_tuple_new = tuple.__new__


class LMDBSource(_LMDBColdReads):
    """Random access to the records of one LMDB.

    Args:
        path: The LMDB directory (holding ``data.mdb``, as ``pack`` writes it) or the
            data file itself.
        max_readers: LMDB's reader slot count; sized for many reader threads.
        readahead: Let the kernel read around each page fault of the memory map
            (``MADV_NORMAL``; the default ``False`` is ``MADV_RANDOM``). Cold batches do
            not fault values in (see "Cold reads"), so faults are B-tree pages and the
            rare value of a batch that looked warm; reading around them (8 MB on some
            disks) only spends bandwidth: ``benchmarks/sources.py``.
        run_bytes: Target size of a run, bytes: records ``[b*R, (b+1)*R)`` with ``R``
            records of about this many bytes together. A call that needs several records
            of a run reads the whole run with one request (``shuffle="block"`` and
            sequential orders). Default :data:`RUN_BYTES` (4 MiB).
        read_runs: Read a run whole (one range, in 1 MiB pieces read together) when a
            call needs 3 or more records per run it touches, on average. Off by default:
            in a full shuffle of a small dataset a batch can meet that bar by chance and
            whole runs cost more than the records alone. ``Loader(shuffle="block")``
            switches it on (:func:`fastfeed.pipeline.sampling.prepare_block_order`); turn it on
            for sequential reading too.

    Cold reads:
        ``read_many`` first probes a few of the call's records with ``mincore``. When all
        are in the page cache it copies every value out of the memory map in one
        transaction (no syscall per record). Otherwise it reads the call's records
        concurrently on a pool of up to 16 threads (``fastfeed-lmdb-read-<n>``): a value
        on overflow pages with one ``pread`` of its exact byte range (its file offset is
        its address minus the map's base), a small value by its key lookup, and a run
        that the call needs several records of with one ``pread`` of the run's byte
        range (``fastfeed pack`` writes values in key order, so a run's values are
        contiguous; a run found out of order is read record by record). Idle pool
        threads end after 30 s.

    Under a writer:
        Another process may write to the database (with ``lock=False`` LMDB has no
        reader table, so its writes must not free pages this source still reads). When
        the data grows past this process's map (``MDB_MAP_RESIZED``), the grown map is
        adopted (``set_mapsize(0)``) and reading goes on. A data file replaced under the
        source (another inode, e.g. ``fastfeed pack --overwrite``) or rewritten with other
        metadata is detected when the source (re)opens it, in a forked or spawned worker
        or after :meth:`close`: :class:`~fastfeed.errors.SourceChangedError`, never new
        records under the old labels. Both are source-level errors: never skipped.

    Attributes:
        path: The path as given.
        data_path: The data file (``.../data.mdb`` for a directory).
        labels: Labels, or ``None``.
        classes: Class names indexed by label, or ``None``.
        origins: Original (relative) path of each record as packed, or ``None``.
        meta: The fastfeed metadata dict, or ``{}`` for a foreign LMDB.

    Raises:
        SourceNotFoundError: ``path`` does not exist.
        CorruptSourceError: ``path`` is not an LMDB, is empty or truncated, or its
            fastfeed metadata is inconsistent.
        SourceChangedError: (on reads) the data file was replaced or rewritten since
            this source first opened it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_readers: int | None = None,
        readahead: bool = False,
        run_bytes: int = RUN_BYTES,
        read_runs: bool = False,
    ) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.max_readers = int(max_readers) if max_readers else _default_max_readers()
        self.readahead = bool(readahead)
        self.run_bytes = int(run_bytes)
        self.read_runs = bool(read_runs)
        self._subdir, self.data_path = self._locate(self.path)
        self._env: lmdb.Environment | None = None
        self._env_key: tuple[int, int] | None = None
        self._entry: _EnvEntry | None = None
        # (st_dev, st_ino) of the data file at the first open, and a checksum of the
        # fastfeed metadata + labels: a re-open (fork, spawn, close) must find the same.
        self._identity: tuple[int, int] | None = None
        self._index_crc: int | None = None
        self.meta: dict[str, Any] = {}
        self.labels: list[int] | None = None
        self.origins: list[str] | None = None
        self._keys: list[bytes] | None = None  # only for foreign LMDBs
        self._count = 0
        self._init_runtime()
        self._ensure_open()
        self._load_index()
        # Mean bytes per record (file size / count): sizes the runs.
        self._mean_record_bytes = os.path.getsize(self.data_path) / max(1, self._count)

    def _load_index(self) -> None:
        env = self._env
        assert env is not None
        with env.begin(buffers=True) as txn:
            raw_meta = self._value(txn, META_KEY)
            if raw_meta is None:
                # A foreign LMDB: every key is a record, in LMDB's (sorted) order.
                self._keys = [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]
                self._count = len(self._keys)
                return
            try:
                self.meta = json.loads(raw_meta)
                self._count = int(self.meta["count"])
            except (ValueError, KeyError, TypeError) as exc:
                raise CorruptSourceError(
                    f"LMDB {self.path} has unreadable fastfeed metadata: {exc}", path=self.path
                ) from exc
            version = self.meta.get("format_version")
            if version != FORMAT_VERSION:
                raise CorruptSourceError(
                    f"LMDB {self.path} has fastfeed format version {version!r}; "
                    f"this fastfeed reads version {FORMAT_VERSION}",
                    path=self.path,
                )
            classes = self.meta.get("classes")
            self.classes = list(classes) if classes is not None else None
            raw_labels = self._value(txn, LABELS_KEY)
            if raw_labels is not None:
                arr = np.frombuffer(raw_labels, dtype="<i8")
                if arr.shape[0] != self._count:
                    raise CorruptSourceError(
                        f"LMDB {self.path}: {arr.shape[0]} labels for {self._count} records",
                        path=self.path,
                    )
                self.labels = [None if x < 0 else x for x in arr.tolist()]  # type: ignore[misc]
            self._index_crc = self._index_checksum(txn)
            raw_paths = self._value(txn, PATHS_KEY)
            if raw_paths is not None:
                self.origins = json.loads(raw_paths.decode("utf-8"))
                if len(self.origins) != self._count:
                    raise CorruptSourceError(
                        f"LMDB {self.path}: {len(self.origins)} paths for {self._count} records",
                        path=self.path,
                    )

    @property
    def class_to_idx(self) -> dict[str, int] | None:
        """Class name to label, or ``None``."""
        return {c: i for i, c in enumerate(self.classes)} if self.classes is not None else None

    def identity(self) -> tuple[Any, ...]:
        """Path, data file size and modification time, format version, record count.

        What ``MemoryCache(shared=True)`` keys its machine-wide copy on: equal in every
        process that opens this LMDB, different once its data file is rewritten.
        """
        st = os.stat(self.data_path)
        return (
            "LMDBSource",
            os.path.realpath(self.path),
            st.st_size,
            st.st_mtime_ns,
            FORMAT_VERSION,
            len(self),
        )

    # -- reads ----------------------------------------------------------------------

    def _read_one(self, index: int) -> Record:
        self._check_size()
        key = self.key(index)

        def go(entry: _EnvEntry) -> bytes | None:
            with entry.env.begin(buffers=False) as txn:
                return txn.get(key)

        data = self._guarded(go)
        if data is None:
            raise self._missing(index, "is missing")
        if not data:
            raise self._missing(index, "is empty (0 bytes)")
        return Record(data, self._label(index))

    def _read_many(self, indices: Sequence[int]) -> list[Record]:
        self._check_size()  # once per call, not per record
        datas = self._guarded(lambda entry: self._read_values(entry, indices))
        if not all(datas):
            i, data = next((i, d) for i, d in zip(indices, datas, strict=True) if not d)
            raise self._missing(i, "is missing" if data is None else "is empty")
        labels = self.labels
        labs = [labels[i] for i in indices] if labels is not None else [None] * len(datas)
        new = _tuple_new  # Record(*pair) without the Python-level __new__: 2x cheaper
        return [new(Record, pair) for pair in zip(datas, labs, strict=True)]

    def _read_values(self, entry: _EnvEntry, indices: Sequence[int]) -> list[Any]:
        if self._cold(entry, indices):
            return self._read_cold(entry, indices)
        keys = self._keys
        # One read transaction for the whole call; buffers=False copies every value out
        # of the map before the transaction ends. Comprehensions, not a loop of method
        # calls: for 3 KB records the per-record Python cost is most of a read.
        with entry.env.begin(buffers=False) as txn:
            get = txn.get
            if keys is None:
                return [get(b"%010d" % i) for i in indices]  # record_key(), inlined
            return [get(keys[i]) for i in indices]

    def hint(self, indices: Iterable[int]) -> None:
        """Start reading upcoming records that need whole runs (else a no-op).

        Indices that need several records of a run each (block and sequential orders)
        start background reads of those runs (one request per 1 MiB piece, on the read
        pool). Scattered records (a full shuffle) are not hinted: their batch is read
        cold with concurrent exact ``pread``s anyway, and a per-record
        ``madvise(MADV_WILLNEED)`` made hinted batches look warm to ``read_many``'s
        probe, whose memory-map copy then faulted the rest in a page at a time (under
        a 400 IO/s quota: 81 records/s instead of 367, ``benchmarks/slow_disk.py``).
        """
        if not self.read_runs:
            return
        self._ensure_open()
        if self._entry is None:
            return
        try:
            self._check_size()  # touching a truncated map's pages would fault here too
        except CorruptSourceError:
            return  # advisory: the read reports it
        n = self._count
        runs = self._group_runs([int(i) for i in indices if 0 <= i < n])
        if runs is None:
            return
        try:
            self._guarded(lambda e: self._advise(e, runs), "hinting")
        except CorruptSourceError:
            pass  # advisory only: the read reports real errors

    def _advise(self, entry: _EnvEntry, runs: dict[int, list[int]]) -> None:
        with entry.env.begin(buffers=True) as txn:
            self._find_base(entry, txn)
            ix = self._record_index(entry, txn) if entry.base is not None else None
        if ix is None or entry.base is None:
            return
        pool = self._read_pool()
        for run in runs:
            pool.submit(functools.partial(self._page_in_run, run))

    def record_sizes(self) -> list[int]:
        """Size of every record's value in bytes, in index order (does not read the values)."""
        self._ensure_open()
        self._check_size()

        def go(entry: _EnvEntry) -> list[int]:
            with entry.env.begin(buffers=True) as txn:
                get = txn.get
                return [len(get(self.key(i)) or b"") for i in range(self._count)]

        return self._guarded(go)

    def _close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
        self._release_env()

    def _after_fork_in_child(self) -> None:
        # LMDB forbids using an environment across fork: drop the inherited one (the
        # registry forgets it too) and let the next read open a fresh one. The parent's
        # read-pool threads do not exist here.
        self._env = None
        self._env_key = None
        self._entry = None
        self._init_runtime()

    def _unpicklable(self) -> tuple[str, ...]:
        return (
            "_env",
            "_env_key",
            "_entry",
            "_pool",
            "_pool_lock",
            "_runs_lock",
            "_runs_reading",
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._init_runtime()

    def __repr__(self) -> str:
        return f"LMDBSource({self.path!r}, records={len(self)})"
