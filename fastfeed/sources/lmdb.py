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

A database written by fastfeed carries its labels, class names and original paths (see
:mod:`fastfeed.packing` for the format). Any other LMDB is readable too: its keys are listed at
open in LMDB order, index ``i`` is the ``i``-th key, and there are no labels.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import lmdb
import numpy as np

from fastfeed.errors import CorruptSourceError, RecordReadError, SourceNotFoundError
from fastfeed.sources.base import Record, Source

__all__ = [
    "FORMAT_VERSION",
    "LABELS_KEY",
    "META_KEY",
    "PATHS_KEY",
    "LMDBSource",
    "record_key",
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


_tuple_new = tuple.__new__


def record_key(index: int) -> bytes:
    """The key of record ``index`` in a fastfeed LMDB: ten zero-padded ASCII digits."""
    return b"%010d" % index


def _default_max_readers() -> int:
    return max(126, 2 * (os.cpu_count() or 1) + 64)


def _libc_function(name: str, argtypes: list[Any]) -> Any:
    """``name`` from the C library with its argument types (Linux only), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


_madvise = _libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])
# mincore only serves the madvise hint: without madvise there is nothing to skip.
_mincore = (
    _libc_function("mincore", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p])
    if _madvise is not None
    else None
)


class _EnvEntry:
    """One open environment shared by every LMDBSource of a file in this process.

    Attributes:
        env: The environment.
        refs: Sources using it.
        fd: The data file, open read-only, for the cheap size check before each read
            (``fstat`` of the file that is mapped, even if the path is later replaced).
        need_bytes: The bytes the map needs, ``(last_pgno + 1) * psize``, at open.
    """

    __slots__ = ("env", "fd", "need_bytes", "refs")

    def __init__(self, env: lmdb.Environment, fd: int, need_bytes: int) -> None:
        self.env = env
        self.fd = fd
        self.need_bytes = need_bytes
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
        readahead: Let the kernel read around each page fault of the memory map. Keep
            ``True`` (the default, chosen by ``benchmarks/sources.py``): with ``False``
            (``MADV_RANDOM``) a cold record of ~100 KB is faulted in 4 KiB at a time, which
            measured about 2x slower here. ``False`` helps only when records are much
            smaller than a page and RAM is short.

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
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_readers: int | None = None,
        readahead: bool = True,
    ) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.max_readers = int(max_readers) if max_readers else _default_max_readers()
        self.readahead = bool(readahead)
        self._subdir, self.data_path = self._locate(self.path)
        self._env: lmdb.Environment | None = None
        self._env_key: tuple[int, int] | None = None
        self._entry: _EnvEntry | None = None
        self.meta: dict[str, Any] = {}
        self.labels: list[int] | None = None
        self.origins: list[str] | None = None
        self._keys: list[bytes] | None = None  # only for foreign LMDBs
        self._count = 0
        self._ensure_open()
        self._load_index()
        # Mean bytes per record (file size / count): below _HINT_MIN_BYTES the kernel's
        # own read-ahead brings neighbours in with every page, and a per-record hint
        # costs more than the read (measured: warm 3 KB records 331k/s -> 68k/s).
        self._mean_record_bytes = os.path.getsize(self.data_path) / max(1, self._count)

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
        with _ENVS_LOCK:
            entry = _ENVS.get(key)
            if entry is None:
                entry = self._open_entry()
                _ENVS[key] = entry
            entry.refs += 1
        self._env_key = key
        self._entry = entry
        self._env = entry.env

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
            file_bytes = os.fstat(fd).st_size
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
        return _EnvEntry(env, fd, need)

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

    def _load_index(self) -> None:
        env = self._env
        assert env is not None
        with env.begin(buffers=False) as txn:
            raw_meta = txn.get(META_KEY)
            if raw_meta is None:
                # A foreign LMDB: every key is a record, in LMDB's (sorted) order.
                self._keys = list(txn.cursor().iternext(keys=True, values=False))
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
            raw_labels = txn.get(LABELS_KEY)
            if raw_labels is not None:
                arr = np.frombuffer(raw_labels, dtype="<i8")
                if arr.shape[0] != self._count:
                    raise CorruptSourceError(
                        f"LMDB {self.path}: {arr.shape[0]} labels for {self._count} records",
                        path=self.path,
                    )
                self.labels = [None if x < 0 else x for x in arr.tolist()]  # type: ignore[misc]
            raw_paths = txn.get(PATHS_KEY)
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

    def _read_one(self, index: int) -> Record:
        env = self._env
        assert env is not None
        self._check_size()
        try:
            with env.begin(buffers=False) as txn:
                data = txn.get(self.key(index))
        except lmdb.Error as exc:
            raise self._missing(index, f"failed: {exc}") from exc
        if data is None:
            raise self._missing(index, "is missing")
        if not data:
            raise self._missing(index, "is empty (0 bytes)")
        return Record(data, self._label(index))

    def _read_many(self, indices: Sequence[int]) -> list[Record]:
        env = self._env
        assert env is not None
        self._check_size()  # once per call, not per record
        keys = self._keys
        try:
            # One read transaction for the whole call; buffers=False copies every value
            # out of the map before the transaction ends. Comprehensions, not a loop of
            # method calls: for 3 KB records the per-record Python cost is most of a read.
            with env.begin(buffers=False) as txn:
                get = txn.get
                if keys is None:
                    datas = [get(b"%010d" % i) for i in indices]  # record_key(), inlined
                else:
                    datas = [get(keys[i]) for i in indices]
        except lmdb.Error as exc:
            raise RecordReadError(
                f"reading {len(indices)} records from {self.path} failed: {exc}", path=self.path
            ) from exc
        if not all(datas):
            i, data = next((i, d) for i, d in zip(indices, datas, strict=True) if not d)
            raise self._missing(i, "is missing" if data is None else "is empty")
        labels = self.labels
        labs = [labels[i] for i in indices] if labels is not None else [None] * len(datas)
        new = _tuple_new  # Record(*pair) without the Python-level __new__: 2x cheaper
        return [new(Record, pair) for pair in zip(datas, labs, strict=True)]

    def hint(self, indices: Iterable[int]) -> None:
        """``madvise(MADV_WILLNEED)`` the pages of the upcoming values (Linux; else no-op).

        A no-op for databases of small records (mean under 16 KiB), where the kernel's
        read-ahead already brings them in many to a page.

        Finding a value's address is a B-tree lookup that does not touch the value's own
        pages (large values live on overflow pages LMDB only points at), so the kernel
        starts reading exactly the upcoming records' bytes in the background.
        """
        if _madvise is None or self._mean_record_bytes < _HINT_MIN_BYTES:
            return
        self._ensure_open()
        env = self._env
        if env is None:
            return
        try:
            self._check_size()  # touching a truncated map's pages would fault here too
        except CorruptSourceError:
            return  # advisory: the read reports it
        n = self._count
        vec = ctypes.create_string_buffer(64)
        try:
            with env.begin(buffers=True) as txn:
                for i in indices:
                    if not 0 <= i < n:
                        continue
                    buf = txn.get(self.key(i))
                    if buf is None or len(buf) == 0:
                        continue
                    addr = np.frombuffer(buf, dtype=np.uint8).ctypes.data
                    start = addr - addr % _PAGE_BYTES
                    length = addr + len(buf) - start
                    pages = -(-length // _PAGE_BYTES)
                    if _mincore is not None:
                        # WILLNEED on pages already in memory costs as much as the
                        # read itself; mincore is cheap, so skip values fully resident.
                        if pages > len(vec):
                            vec = ctypes.create_string_buffer(pages)
                        if _mincore(start, length, vec) == 0 and all(
                            b & 1 for b in vec.raw[:pages]
                        ):
                            continue
                    _madvise(start, length, _MADV_WILLNEED)
        except lmdb.Error:
            pass  # advisory only: the read reports real errors

    def record_sizes(self) -> list[int]:
        """Size of every record's value in bytes, in index order (does not read the values)."""
        self._ensure_open()
        env = self._env
        assert env is not None
        self._check_size()
        with env.begin(buffers=True) as txn:
            get = txn.get
            return [len(get(self.key(i)) or b"") for i in range(self._count)]

    def _close(self) -> None:
        self._release_env()

    def _after_fork_in_child(self) -> None:
        # LMDB forbids using an environment across fork: drop the inherited one (the
        # registry forgets it too) and let the next read open a fresh one.
        self._env = None
        self._env_key = None
        self._entry = None

    def _unpicklable(self) -> tuple[str, ...]:
        return ("_env", "_env_key", "_entry")

    def __repr__(self) -> str:
        return f"LMDBSource({self.path!r}, records={len(self)})"
