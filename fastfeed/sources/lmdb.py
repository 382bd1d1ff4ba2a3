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
"""

from __future__ import annotations

import json
import mmap
import os
import threading
import weakref
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import lmdb
import numpy as np

from fastfeed.errors import (
    CorruptSourceError,
    RecordReadError,
    SourceChangedError,
    SourceNotFoundError,
)
from fastfeed.sources import _lmdb_io as io
from fastfeed.sources.base import Record, Source

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

#: Version of the on-disk layout written by :func:`fastfeed.pack`.
FORMAT_VERSION = 1
#: JSON metadata: ``{"format_version", "count", "classes", "has_labels", "has_paths", ...}``.
META_KEY = b"__fastfeed__"
#: ``count`` little-endian int64 labels (``-1`` = no label).
LABELS_KEY = b"__fastfeed__/labels"
#: UTF-8 JSON list of the records' original (relative) paths.
PATHS_KEY = b"__fastfeed__/paths"

_LMDB_MAGIC = 0xBEEFC0DE
_HINT_MIN_BYTES = 16 * 1024  # hint() only for records at least this large on average
_PAGE_HEADER_BYTES = 16  # MDB_page header before MDB_meta on 64-bit builds
_MADV_WILLNEED = getattr(mmap, "MADV_WILLNEED", 3)
_PAGE_BYTES = mmap.PAGESIZE
#: Default run size: records ``[b*R, (b+1)*R)`` with ``R * mean record size`` about this many
#: bytes are one run, read with one request when a call needs several of its records. At
#: 100 MB/s and 400 IO operations/s one operation costs the time of 250 KB, so a run is
#: bandwidth-bound from about 2.5 MB (10 operations' worth); ``benchmarks/slow_disk.py``.
RUN_BYTES = 4 << 20
#: Values up to this size live inside B-tree leaf pages, which the key lookup itself
#: brings in; larger ones are on overflow pages of their own, read with one ``pread``.
_INLINE_BYTES = 2048
#: Records probed with mincore per read_many call to tell a warm batch from a cold one.
_PROBES = 8
#: Warm calls that skip the probes (doubling from 1) while every probe finds its pages.
_MAX_PROBE_SKIP = 16
#: A call reads whole runs when it needs at least this many records per run it touches
#: (block and sequential orders: 8 or more; a full shuffle of many runs: about 1).
_RUN_DENSITY = 3
#: Threads of a source's cold-read pool: enough outstanding requests to fill a disk queue.
_READ_THREADS = 16
#: Runs are read in pieces of this size, all at once on the read pool.
_PIECE_BYTES = 1 << 20
#: Longest wait for a run another thread is reading, seconds.
_RUN_WAIT_S = 120.0

_T = TypeVar("_T")
_tuple_new = tuple.__new__


def record_key(index: int) -> bytes:
    """The key of record ``index`` in a fastfeed LMDB: ten zero-padded ASCII digits."""
    return b"%010d" % index


def values_in_key_order(path: str | os.PathLike[str]) -> bool:
    """Whether the record values on overflow pages of a fastfeed LMDB lie in key order.

    Reads the B-tree's pages (:class:`~fastfeed.sources._lmdb_io.RecordIndex`), not the
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
        ix = io.RecordIndex(fd, psize, count)
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


def _slice(chunks: dict[int, bytes], start: int, offset: int, size: int) -> bytes:
    """Bytes ``[offset, offset + size)`` of a run read in ``_PIECE_BYTES`` pieces from ``start``."""
    lo = start + (offset - start) // _PIECE_BYTES * _PIECE_BYTES
    piece = chunks[lo]
    a = offset - lo
    if a + size <= len(piece):
        return piece[a : a + size]
    parts = [piece[a:]]
    need = size - len(parts[0])
    while need > 0:
        lo += _PIECE_BYTES
        parts.append(chunks[lo][:need])
        need -= len(parts[-1])
    return b"".join(parts)


def _default_max_readers() -> int:
    return max(126, 2 * (os.cpu_count() or 1) + 64)


_madvise = io.madvise


class _EnvEntry:
    """One open environment shared by every LMDBSource of a file in this process.

    Attributes:
        env: The environment.
        refs: Sources using it.
        fd: The data file, open read-only (``POSIX_FADV_RANDOM``: no read-ahead beyond
            what a ``pread`` asks for), for the cheap size check before each read and for
            the cold-read ``pread`` calls (the file that is mapped, even if the path is
            later replaced).
        need_bytes: The bytes the map needs, ``(last_pgno + 1) * psize``.
        psize: LMDB's page size in bytes.
        inode: The data file's inode (finds the map in ``/proc/self/maps``).
        base: Address of file offset 0 in the map; -1 not looked up yet, None unknown
            (the cold-read path is then off).
        guard: Transactions vs. adopting a grown map.
        index: The values' file offsets (:class:`~fastfeed.sources._lmdb_io.RecordIndex`),
            None until built, False where it cannot be (a foreign LMDB, another format).
    """

    __slots__ = (
        "base",
        "env",
        "fd",
        "guard",
        "index",
        "inode",
        "need_bytes",
        "psize",
        "refs",
    )

    def __init__(
        self, env: lmdb.Environment, fd: int, need_bytes: int, psize: int, inode: int
    ) -> None:
        self.env = env
        self.fd = fd
        self.need_bytes = need_bytes
        self.psize = psize
        self.inode = inode
        self.base: int | None = -1
        #: Where the record values are (RecordIndex), False where it cannot be used.
        self.index: io.RecordIndex | bool | None = None
        self.guard = io.MapGuard()
        self.refs = 0

    def close(self) -> None:
        self.env.close()
        self.close_fd()

    def close_fd(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


# py-lmdb refuses to open one file twice in a process, so sources of the same file (a
# clone from pickling, a cache's inner source and a raw one) share an environment,
# keyed by the data file's (st_dev, st_ino) and reference counted. The first opener's
# readahead / max_readers settings apply to all of them.
_ENVS: dict[tuple[int, int], _EnvEntry] = {}
_ENVS_LOCK = threading.Lock()


def _forget_envs_after_fork() -> None:
    # The child must not use the parent's environments; dropping the references lets
    # them be torn down here (readonly, lock=False: this only unmaps the child's copy).
    global _ENVS_LOCK
    _ENVS_LOCK = threading.Lock()
    for entry in _ENVS.values():
        entry.close_fd()  # the child's copy of the descriptor; the parent's stays open
    _ENVS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_envs_after_fork)


class LMDBSource(Source):
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
        # Mean bytes per record (file size / count): below _HINT_MIN_BYTES the kernel's
        # own read-ahead brings neighbours in with every page, and a per-record hint
        # costs more than the read (measured: warm 3 KB records 331k/s -> 68k/s).
        self._mean_record_bytes = os.path.getsize(self.data_path) / max(1, self._count)

    def _init_runtime(self) -> None:
        """Per-process state: the read pool (lazy), runs being read, probe back-off."""
        self._pool: io.ReadPool | None = None
        self._pool_lock = threading.Lock()
        self._runs_lock = threading.Lock()
        self._runs_reading: dict[int, threading.Event] = {}
        self._probe_skip = 0  # warm calls left that skip the mincore probes
        self._probe_backoff = 1
        #: Runs read whole / read record by record because their values were out of order.
        self.run_reads = 0
        self.unordered_runs = 0

    @property
    def mean_record_bytes(self) -> float:
        """Mean bytes per record (data file size / records)."""
        return self._mean_record_bytes

    @property
    def run_records(self) -> int:
        """Records per run: ``run_bytes`` of records of the mean size (at least 1)."""
        return max(1, round(self.run_bytes / max(1.0, self._mean_record_bytes)))

    # -- opening --------------------------------------------------------------------

    @staticmethod
    def _locate(path: str) -> tuple[bool, str]:
        if not os.path.exists(path):
            raise SourceNotFoundError(f"LMDB not found: {path}", path=path)
        if os.path.isdir(path):
            data = os.path.join(path, "data.mdb")
            if not os.path.isfile(data):
                raise CorruptSourceError(
                    f"{path} is not an LMDB: the directory has no data.mdb (for a folder of "
                    "images or class folders use FileSource, or fastfeed.open_source)",
                    path=path,
                )
            return True, data
        return False, path

    def _check_file(self) -> None:
        """Reject empty / non-LMDB files before LMDB maps them."""
        data = self.data_path
        try:
            fd = os.open(data, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                if hasattr(os, "posix_fadvise"):
                    # A plain read would pull in the file's first ~128 KiB by readahead.
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                head = os.pread(fd, _PAGE_HEADER_BYTES + 8, 0)
            finally:
                os.close(fd)
        except OSError as exc:
            raise CorruptSourceError(
                f"cannot read LMDB data file {data}: {exc.strerror or exc}", path=self.path
            ) from exc
        if len(head) < _PAGE_HEADER_BYTES + 8:
            raise CorruptSourceError(
                f"{data} is not an LMDB: the file is {len(head)} bytes long", path=self.path
            )
        magic = int.from_bytes(head[_PAGE_HEADER_BYTES : _PAGE_HEADER_BYTES + 4], "little")
        if magic != _LMDB_MAGIC:
            raise CorruptSourceError(
                f"{data} is not an LMDB (no LMDB magic number in the first page)",
                path=self.path,
            )

    def _open(self) -> None:
        self._check_file()
        self._release_env()
        try:
            st = os.stat(self.data_path)
        except OSError as exc:
            msg = f"cannot open LMDB {self.path}: {exc.strerror or exc}"
            raise CorruptSourceError(msg, path=self.path) from exc
        key = (st.st_dev, st.st_ino)
        if self._identity is not None and key != self._identity:
            raise SourceChangedError(
                f"LMDB {self.data_path} was replaced since this source opened it (inode "
                f"{self._identity[1]} -> {st.st_ino}, now {st.st_size} bytes): its records "
                "would not match the labels and count read then. Create a new LMDBSource.",
                path=self.path,
            )
        with _ENVS_LOCK:
            entry = _ENVS.get(key)
            if entry is None:
                entry = self._open_entry()
                _ENVS[key] = entry
            entry.refs += 1
        self._env_key = key
        self._entry = entry
        self._env = entry.env
        if self._identity is None:
            self._identity = key
        elif self._index_crc is not None:
            self._check_index_unchanged()

    def _index_checksum(self, txn: lmdb.Transaction) -> int | None:
        raw_meta = self._value(txn, META_KEY)
        if raw_meta is None:
            return None
        return zlib.crc32(self._value(txn, LABELS_KEY) or b"", zlib.crc32(raw_meta))

    def _check_index_unchanged(self) -> None:
        """Same inode, re-opened: the fastfeed metadata and labels must be those read at open."""

        def go(entry: _EnvEntry) -> int | None:
            with entry.env.begin(buffers=True) as txn:
                return self._index_checksum(txn)

        if self._guarded(go, "checking") != self._index_crc:
            self._release_env()
            raise SourceChangedError(
                f"LMDB {self.data_path} was rewritten in place since this source opened it "
                "(its fastfeed metadata or labels differ): its records would not match the "
                "labels read then. Create a new LMDBSource.",
                path=self.path,
            )

    def _open_entry(self) -> _EnvEntry:
        try:
            env = lmdb.open(
                self.path,
                subdir=self._subdir,
                readonly=True,
                lock=False,
                create=False,
                readahead=self.readahead,
                max_readers=self.max_readers,
                max_dbs=0,
                map_size=1 << 20,  # LMDB takes the larger size recorded in the file
            )
        except lmdb.Error as exc:
            msg = f"cannot open LMDB {self.path}: {exc}"
            raise CorruptSourceError(msg, path=self.path) from exc
        fd = -1
        try:
            psize = env.stat()["psize"]
            last_pgno = env.info()["last_pgno"]
            fd = os.open(self.data_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            st = os.fstat(fd)
            file_bytes = st.st_size
            if hasattr(os, "posix_fadvise"):
                # Cold reads pread exactly the bytes they need (a record or a run); the
                # kernel's read-ahead around them would only spend the disk's bandwidth.
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        except (lmdb.Error, OSError) as exc:
            env.close()
            if fd >= 0:
                os.close(fd)
            msg = f"cannot read LMDB {self.path}: {exc}"
            raise CorruptSourceError(msg, path=self.path) from exc
        need = (last_pgno + 1) * psize
        if file_bytes < need:
            env.close()
            os.close(fd)
            raise CorruptSourceError(
                f"LMDB {self.data_path} is truncated: {file_bytes} bytes on disk but its "
                f"pages need {need} bytes (last page {last_pgno} x {psize} B)",
                path=self.path,
            )
        return _EnvEntry(env, fd, need, psize, st.st_ino)

    def _check_size(self) -> None:
        """Raise if the data file shrank below what the map needs since it was opened.

        Best effort: one ``fstat`` (~1 us) per read call, so a file truncated while the
        source is open gives an error instead of a SIGBUS on the first missing page. A
        truncation between this check and the read can still fault.
        """
        entry = self._entry
        if entry is None or entry.fd < 0:
            return
        try:
            size = os.fstat(entry.fd).st_size
        except OSError as exc:
            raise CorruptSourceError(
                f"cannot check LMDB data file {self.data_path}: {exc.strerror or exc}",
                path=self.path,
            ) from exc
        if size < entry.need_bytes:
            raise CorruptSourceError(
                f"LMDB {self.data_path} is truncated: data.mdb shrank from "
                f"{entry.need_bytes} to {size} bytes since it was opened; reading it "
                "would crash the process (SIGBUS). Re-create or restore the database.",
                path=self.path,
            )

    def _release_env(self) -> None:
        key, self._env_key = self._env_key, None
        self._env = None
        self._entry = None
        if key is None:
            return
        with _ENVS_LOCK:
            entry = _ENVS.get(key)
            if entry is None:
                return
            entry.refs -= 1
            if entry.refs > 0:
                return
            del _ENVS[key]
        entry.close()

    def _value(self, txn: lmdb.Transaction, key: bytes) -> bytes | None:
        """A metadata value as bytes: a large one with one ``pread``, not page by page."""
        entry = self._entry
        assert entry is not None
        if entry.fd >= 0:
            try:
                found = io.RecordIndex(entry.fd, entry.psize, 0).find(key)
            except (OSError, EOFError, ValueError):
                found = None
            if found is not None and found[1] > 64 * 1024:
                value = self._pread(entry, found[1], found[0])
                if value[:64] == bytes(txn.get(key)[:64]):  # touches one page only
                    return value
        buf = txn.get(key)
        return None if buf is None else bytes(buf)

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

    # -- contract -----------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    def key(self, index: int) -> bytes:
        """The LMDB key of record ``index``."""
        return self._keys[index] if self._keys is not None else record_key(index)

    def describe(self, index: int) -> str:
        """E.g. ``"train.lmdb key 0000000037 (from dog/img_0037.jpg)"``."""
        key = self.key(index)
        text = key.decode("utf-8", "backslashreplace")
        where = f"{self.path} key {text}"
        if self.origins is not None:
            where += f" (from {self.origins[index]})"
        return where

    def _label(self, index: int) -> int | None:
        return self.labels[index] if self.labels is not None else None

    def _missing(self, index: int, what: str) -> RecordReadError:
        return RecordReadError(
            f"cannot read record {index}: {self.describe(index)} {what}",
            path=self.path,
            index=index,
        )

    # -- transactions under the map guard -------------------------------------------

    def _guarded(self, fn: Callable[[_EnvEntry], _T], what: str = "reading") -> _T:
        """``fn(entry)`` inside the map guard; adopts a map grown by a writer and retries.

        Raises:
            SourceChangedError: The map grew and could not be adopted.
            CorruptSourceError: LMDB failed (a database-level error, never one record's).
        """
        for attempt in range(2):
            entry = self._entry
            assert entry is not None
            try:
                seen = entry.guard.acquire_read()
            except TimeoutError as exc:
                raise CorruptSourceError(f"{what} LMDB {self.path}: {exc}", path=self.path) from exc
            try:
                return fn(entry)
            except lmdb.MapResizedError as exc:
                if attempt:
                    raise SourceChangedError(
                        f"{what} LMDB {self.path}: the map grew again right after it was "
                        f"adopted ({exc})",
                        path=self.path,
                    ) from exc
            except lmdb.Error as exc:
                raise CorruptSourceError(
                    f"{what} LMDB {self.path} failed: {exc}", path=self.path
                ) from exc
            finally:
                entry.guard.release_read()
            self._adopt_grown_map(entry, seen)
        raise AssertionError("unreachable")

    def _adopt_grown_map(self, entry: _EnvEntry, seen: int) -> None:
        """Another process grew the database past this map: map the new size.

        ``set_mapsize(0)`` re-maps at the size the writer recorded; no transaction of
        this process may be open meanwhile (the guard waits for them).
        """

        def remap() -> None:
            entry.env.set_mapsize(0)
            entry.base = -1  # the map moved
            entry.index = None  # and the tree changed
            info = entry.env.info()
            entry.need_bytes = max(entry.need_bytes, (info["last_pgno"] + 1) * entry.psize)

        try:
            entry.guard.remap(seen, remap)
        except (lmdb.Error, TimeoutError) as exc:
            raise SourceChangedError(
                f"LMDB {self.path} grew (another process writes to it) and its new size "
                f"could not be adopted: {exc}",
                path=self.path,
            ) from exc

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

    # -- cold reads -------------------------------------------------------------------

    def _find_base(self, entry: _EnvEntry, txn: lmdb.Transaction) -> None:
        """Look up (once per map) where file offset 0 is mapped; None when unknown."""
        entry.base = None
        if entry.fd < 0:
            return
        buf = txn.get(META_KEY) if self._keys is None else txn.get(self._keys[0])
        if not buf:
            return
        addr = io.address_of(buf)
        base = io.map_base(addr, entry.inode)
        if base is None:
            return
        probe = min(len(buf), 256)
        try:
            same = os.pread(entry.fd, probe, addr - base) == bytes(buf[:probe])
        except OSError:
            same = False
        if same:
            entry.base = base

    def _record_index(self, entry: _EnvEntry, txn: lmdb.Transaction) -> io.RecordIndex | None:
        """The values' file offsets, built on first use and again when the tree changed.

        Verified once against py-lmdb (one record read both ways); None for a foreign
        LMDB or where the pages are not in the format it reads.
        """
        ix = entry.index
        if ix is False or self._keys is not None or entry.fd < 0:
            return None
        txnid = entry.env.info()["last_txnid"]
        if isinstance(ix, io.RecordIndex) and ix.txnid == txnid:
            return ix
        entry.index = False
        try:
            ix = io.RecordIndex(entry.fd, entry.psize, self._count)
            if ix.txnid != txnid:
                return None  # a writer committed meanwhile: try again next call
            probe = self._count - 1
            where = ix.locate(probe) if probe >= 0 else None
            value = txn.get(self.key(probe)) if probe >= 0 else None
            if (where is None) != (value is None):
                return None
            if where is not None and value is not None:
                size = min(where[1], 256)
                if where[1] != len(value) or (
                    io.pread_exact(entry.fd, size, where[0]) != bytes(value[:size])
                ):
                    return None
        except (OSError, EOFError, ValueError):
            return None
        entry.index = ix
        return ix

    def _cold(self, entry: _EnvEntry, indices: Sequence[int]) -> bool:
        """Whether some probed record of the call is not in the page cache.

        Probes up to 8 records (mincore at the value's place in the map, ~2 us each).
        After a warm verdict the next calls skip probing, 1, 2, 4 ... up to 16 of them;
        any cold verdict probes every call again.
        """
        n = len(indices)
        if n == 0 or entry.base is None:
            return False
        if self._probe_skip > 0:
            self._probe_skip -= 1
            return False
        step = max(1, n // _PROBES)
        with entry.env.begin(buffers=True) as txn:
            if entry.base == -1:
                self._find_base(entry, txn)
            base = entry.base
            ix = self._record_index(entry, txn) if base is not None else None
        if ix is None or base is None:
            return False
        for i in indices[::step][:_PROBES]:
            # A leaf not read yet is itself a read: probe its page before reading it.
            leaf = ix.leaf_page(int(i))
            if leaf is not None and io.resident(base + leaf, entry.psize) is False:
                self._probe_backoff = 1
                return True
            where = ix.locate(int(i))
            if where is not None and io.resident(base + where[0], where[1]) is False:
                self._probe_backoff = 1
                return True
        self._probe_skip = self._probe_backoff
        self._probe_backoff = min(_MAX_PROBE_SKIP, 2 * self._probe_backoff)
        return False

    def _read_pool(self) -> io.ReadPool:
        pool = self._pool
        if pool is None:
            with self._pool_lock:
                pool = self._pool
                if pool is None:
                    pool = io.ReadPool(_READ_THREADS, "lmdb-read")
                    weakref.finalize(self, pool.close, 0.0)
                    self._pool = pool
        return pool

    def _group_runs(self, indices: Sequence[int]) -> dict[int, list[int]] | None:
        """Positions of the call by run, when the call needs enough records per run."""
        r = self.run_records
        if not self.read_runs or r <= 1 or len(indices) < _RUN_DENSITY:
            return None
        runs: dict[int, list[int]] = {}
        for pos, i in enumerate(indices):
            runs.setdefault(int(i) // r, []).append(pos)
        return runs if len(indices) >= _RUN_DENSITY * len(runs) else None

    def _read_cold(self, entry: _EnvEntry, indices: Sequence[int]) -> list[Any]:
        """Read the call's values concurrently: whole runs, or one ``pread`` per record."""
        ix = entry.index
        assert isinstance(ix, io.RecordIndex)
        out: list[Any] = [None] * len(indices)
        pool = self._read_pool()
        runs = self._group_runs(indices)
        rest = (
            list(range(len(indices)))
            if runs is None
            else self._read_runs(entry, ix, runs, indices, out)
        )
        if rest:
            values = pool.map(lambda k: self._read_value(entry, ix, indices[rest[k]]), len(rest))
            for pos, value in zip(rest, values, strict=True):
                out[pos] = value
        return out

    def _read_runs(
        self,
        entry: _EnvEntry,
        ix: io.RecordIndex,
        runs: dict[int, list[int]],
        indices: Sequence[int],
        out: list[Any],
    ) -> list[int]:
        """Read the byte range of every run the call needs; return the positions left.

        Each run's range is read in pieces of :data:`_PIECE_BYTES` issued together on the
        read pool (measured here: 16 threads reading 4 MiB pieces with read-ahead off
        moved 514 MB/s, 1 MiB pieces 923 MB/s). A run another thread is reading is
        waited for, then its records are read from the page cache like the rest; so is a
        run already in the page cache, or one whose values are not in key order.
        """
        base = entry.base
        rest: list[int] = []
        waits: list[tuple[threading.Event, list[int]]] = []
        mine: list[tuple[int, threading.Event]] = []
        plans: list[tuple[int, int, list[int], list[tuple[int, int] | None]]] = []
        try:
            for run, positions in runs.items():
                ev, owner = self._claim_run(run)
                if not owner:
                    waits.append((ev, positions))
                    continue
                mine.append((run, ev))
                where = [ix.locate(int(indices[pos])) for pos in positions]
                span = self._run_range(ix, run, [w for w in where if w is not None])
                if span is None:
                    self.unordered_runs += 1
                    rest.extend(positions)
                    continue
                start, end = span
                if base is not None and base != -1 and io.resident(base + start, end - start):
                    rest.extend(positions)
                    continue
                plans.append((start, end, positions, where))
            pieces = [
                (k, lo, min(lo + _PIECE_BYTES, end))
                for k, (start, end, _, _) in enumerate(plans)
                for lo in range(start, end, _PIECE_BYTES)
            ]
            # os.pread, not readinto a bytearray: no zero-filling of the buffer first.
            got = self._read_pool().map(
                lambda j: self._pread(entry, pieces[j][2] - pieces[j][1], pieces[j][1]),
                len(pieces),
            )
            chunks: list[dict[int, bytes]] = [{} for _ in plans]
            for (k, lo, _), data in zip(pieces, got, strict=True):
                chunks[k][lo] = data
            for k, (start, _, positions, where) in enumerate(plans):
                self.run_reads += 1
                for pos, w in zip(positions, where, strict=True):
                    out[pos] = None if w is None else _slice(chunks[k], start, w[0], w[1])
        finally:
            for run, ev in mine:
                self._release_run(run, ev)
        for ev, positions in waits:
            ev.wait(_RUN_WAIT_S)
            rest.extend(positions)
        return rest

    def _preadinto(self, entry: _EnvEntry, view: memoryview, offset: int) -> None:
        got = 0
        try:
            while got < len(view):
                n = os.preadv(entry.fd, [view[got:]], offset + got)
                if n <= 0:
                    raise EOFError(f"file ends at {offset + got} bytes")
                got += n
        except (OSError, EOFError) as exc:
            raise CorruptSourceError(
                f"reading {len(view)} bytes at offset {offset} of LMDB {self.data_path} "
                f"failed: {exc}",
                path=self.path,
            ) from exc

    def _read_value(self, entry: _EnvEntry, ix: io.RecordIndex, index: int) -> bytes | None:
        """One value with one ``pread`` of its exact range (None: no such key)."""
        where = ix.locate(int(index))
        if where is None:
            return None
        return self._pread(entry, where[1], where[0]) if where[1] else b""

    def _pread(self, entry: _EnvEntry, size: int, offset: int) -> bytes:
        try:
            return io.pread_exact(entry.fd, size, offset)
        except (OSError, EOFError) as exc:
            raise CorruptSourceError(
                f"reading {size} bytes at offset {offset} of LMDB {self.data_path} failed: {exc}",
                path=self.path,
            ) from exc

    def _run_range(
        self, ix: io.RecordIndex, run: int, extra: Sequence[tuple[int, int]] = ()
    ) -> tuple[int, int] | None:
        """File range ``[start, end)`` holding run ``run``'s values, if they look contiguous.

        From the run's first value to the end of its last one, widened to cover
        ``extra`` ``(offset, size)`` pairs (the values a call needs: a value small enough
        to live in a B-tree leaf sits in the leaf page, after its neighbours' overflow
        pages). None when the span is far larger than a run: not in key order.
        """
        r = self.run_records
        first = ix.locate(run * r)
        last = ix.locate(min(self._count, (run + 1) * r) - 1)
        if first is None or last is None:
            return None
        start, end = first[0], last[0] + last[1]
        for off, size in extra:
            start = min(start, off)
            end = max(end, off + size)
        # Values in key order span about run_bytes (plus B-tree pages between them).
        if end <= start or end - start > 4 * max(self.run_bytes, r * self._mean_record_bytes):
            return None
        return start, end

    def _claim_run(self, run: int) -> tuple[threading.Event, bool]:
        with self._runs_lock:
            ev = self._runs_reading.get(run)
            if ev is not None:
                return ev, False
            ev = self._runs_reading[run] = threading.Event()
            return ev, True

    def _release_run(self, run: int, ev: threading.Event) -> None:
        with self._runs_lock:
            if self._runs_reading.get(run) is ev:
                del self._runs_reading[run]
        ev.set()

    def _page_in_run(self, run: int) -> None:
        """Background job of :meth:`hint`: read a run into the page cache."""
        entry = self._entry
        ix = entry.index if entry is not None else None
        if entry is None or not isinstance(ix, io.RecordIndex) or entry.base in (None, -1):
            return
        base = entry.base
        ev, mine = self._claim_run(run)
        if not mine:
            return
        try:
            span = self._run_range(ix, run)
            if span is None or io.resident(base + span[0], span[1] - span[0]):
                return
            scratch = memoryview(bytearray(min(_PIECE_BYTES, span[1] - span[0])))
            for lo in range(span[0], span[1], _PIECE_BYTES):
                self._preadinto(entry, scratch[: min(_PIECE_BYTES, span[1] - lo)], lo)
            self.run_reads += 1
        except (OSError, EOFError, ValueError, CorruptSourceError):
            pass  # advisory: the read reports real errors
        finally:
            self._release_run(run, ev)

    def hint(self, indices: Iterable[int]) -> None:
        """Start reading upcoming records (Linux; else a no-op).

        Indices that need several records of a run each (block and sequential orders)
        start background reads of those runs (one ``pread`` each, on the read pool).
        Otherwise, for databases of records of 16 KiB or more on average:
        ``madvise(MADV_WILLNEED)`` the pages of the values not yet in memory. A no-op for
        smaller records, where a per-record hint costs more than the read.
        """
        if _madvise is None:
            return
        self._ensure_open()
        entry = self._entry
        if entry is None:
            return
        try:
            self._check_size()  # touching a truncated map's pages would fault here too
        except CorruptSourceError:
            return  # advisory: the read reports it
        n = self._count
        wanted = [int(i) for i in indices if 0 <= i < n]
        runs = self._group_runs(wanted)
        if runs is None and self._mean_record_bytes < _HINT_MIN_BYTES:
            return
        try:
            self._guarded(lambda e: self._advise(e, wanted, runs), "hinting")
        except CorruptSourceError:
            pass  # advisory only: the read reports real errors

    def _advise(self, entry: _EnvEntry, indices: list[int], runs: dict | None) -> None:
        with entry.env.begin(buffers=True) as txn:
            if entry.base == -1:
                self._find_base(entry, txn)
            ix = self._record_index(entry, txn) if entry.base is not None else None
        base = entry.base
        if ix is None or base is None:
            return
        if runs is not None:
            pool = self._read_pool()
            for run in runs:
                pool.submit(lambda run=run: self._page_in_run(run))
            return
        for i in indices:
            where = ix.locate(i)
            if where is None or where[1] == 0:
                continue
            addr = base + where[0]
            # WILLNEED on pages already in memory costs as much as the read itself;
            # mincore is cheap, so skip values fully resident.
            if io.resident(addr, where[1]):
                continue
            start = addr - addr % _PAGE_BYTES
            _madvise(start, addr + where[1] - start, _MADV_WILLNEED)

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
