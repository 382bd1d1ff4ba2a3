"""Opening an LMDB for :class:`~fastfeed.sources.lmdb.LMDBSource`, and keeping it valid.

* :class:`_EnvEntry` and the process-wide registry: one read-only environment (and one
  ``O_RDONLY`` descriptor of ``data.mdb``) per data file, shared by every source of that
  file in the process, reference counted, forgotten in a forked child.
* :class:`_LMDBEnv`: the source's layer that opens the file (rejecting a missing, empty,
  foreign or truncated one, and one replaced or rewritten since the first open), checks
  its size before every read call, runs transactions under the map guard and adopts a
  map grown by a writer (``MDB_MAP_RESIZED``), plus the index contract (``len``, keys,
  ``describe``).
"""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Callable
from typing import Any, TypeVar

import lmdb

from fastfeed.errors import (
    CorruptSourceError,
    RecordReadError,
    SourceChangedError,
    SourceNotFoundError,
)
from fastfeed.sources import _lmdb_io as io
from fastfeed.sources._lmdb_format import LABELS_KEY, META_KEY, record_key
from fastfeed.sources.base import Source

_LMDB_MAGIC = 0xBEEFC0DE
_PAGE_HEADER_BYTES = 16  # MDB_page header before MDB_meta on 64-bit builds
# A writer may grow the map again between this reader adopting the new size and its next
# transaction (a writer committing in a loop did, in CI, with 2 attempts): adopt again, up
# to this many times in a row, before calling it a source that keeps changing.
_ADOPT_ATTEMPTS = 8

_T = TypeVar("_T")


def _default_max_readers() -> int:
    return max(126, 2 * (os.cpu_count() or 1) + 64)


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
        setup: Held while ``base`` or ``index`` is being worked out, so a concurrent
            reader waits for the answer instead of taking "not known yet" for "warm".
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
        "setup",
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
        self.setup = threading.Lock()
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


class _LMDBEnv(Source):
    """The environment layer of :class:`~fastfeed.sources.lmdb.LMDBSource` (see there).

    Holds no state of its own: the attributes below are set by ``LMDBSource.__init__``
    and its index loading.
    """

    path: str
    data_path: str
    max_readers: int
    readahead: bool
    meta: dict[str, Any]
    labels: list[int] | None
    classes: list[str] | None
    origins: list[str] | None
    _subdir: bool
    _env: lmdb.Environment | None
    _env_key: tuple[int, int] | None
    _entry: _EnvEntry | None
    _identity: tuple[int, int] | None
    _index_crc: int | None
    _keys: list[bytes] | None
    _count: int

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
                current = txn.get(key)
                if current is not None and value[:64] == bytes(current[:64]):  # one page
                    return value
        buf = txn.get(key)
        return None if buf is None else bytes(buf)

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
        for attempt in range(_ADOPT_ATTEMPTS):
            entry = self._entry
            assert entry is not None
            try:
                seen = entry.guard.acquire_read()
            except TimeoutError as exc:
                raise CorruptSourceError(f"{what} LMDB {self.path}: {exc}", path=self.path) from exc
            try:
                return fn(entry)
            except lmdb.MapResizedError as exc:
                if attempt == _ADOPT_ATTEMPTS - 1:
                    raise SourceChangedError(
                        f"{what} LMDB {self.path}: the map kept growing while this reader "
                        f"adopted it ({_ADOPT_ATTEMPTS} times in a row: {exc})",
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
            # The truncation check's floor: what the file holds now, up to LMDB's
            # allocation mark. A live writer's last allocated pages need not be written
            # yet (and none of them is referenced), so the mark alone read as "data.mdb
            # shrank" while the file only grew (CorruptSourceError under a loaded run).
            if entry.fd >= 0:  # else no size check runs at all
                allocated = (info["last_pgno"] + 1) * entry.psize
                held = os.fstat(entry.fd).st_size
                entry.need_bytes = max(entry.need_bytes, min(allocated, held))

        try:
            entry.guard.remap(seen, remap)
        except (lmdb.Error, OSError, TimeoutError) as exc:
            raise SourceChangedError(
                f"LMDB {self.path} grew (another process writes to it) and its new size "
                f"could not be adopted: {exc}",
                path=self.path,
            ) from exc

    def _pread(self, entry: _EnvEntry, size: int, offset: int) -> bytes:
        try:
            return io.pread_exact(entry.fd, size, offset)
        except (OSError, EOFError) as exc:
            raise CorruptSourceError(
                f"reading {size} bytes at offset {offset} of LMDB {self.data_path} failed: {exc}",
                path=self.path,
            ) from exc
