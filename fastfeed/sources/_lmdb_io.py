"""Low-level helpers of :class:`~fastfeed.sources.lmdb.LMDBSource`'s cold-read path.

* :func:`address_of`, :func:`map_base`: where a value lives. LMDB hands out values as
  memoryviews into its read-only map of ``data.mdb``; a value's file offset is its address
  minus the map's base address, found once in ``/proc/self/maps`` and verified with one
  ``pread``.
* :func:`resident`: ``mincore`` of a range of the map (page cache residency).
* :func:`pread_exact`: ``os.pread`` until every byte of a range is read.
* :class:`ReadPool`: named daemon threads that run a caller's ``map`` with it, or jobs in
  the background; idle threads end after ``idle_s``.
* :class:`MapGuard`: a readers-writer lock with timeouts. Adopting a map grown by another
  process (``set_mapsize(0)``) unmaps the old map, so no transaction of this process may
  be open meanwhile.

Linux only where noted; elsewhere the helpers report "unavailable" and the source keeps
its plain page-fault path.
"""

from __future__ import annotations

import bisect
import ctypes
import itertools
import mmap
import os
import queue
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "PAGE_BYTES",
    "MapGuard",
    "ReadPool",
    "RecordIndex",
    "address_of",
    "madvise",
    "map_base",
    "pread_exact",
    "resident",
]

_T = TypeVar("_T")
PAGE_BYTES = mmap.PAGESIZE


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


#: ``madvise(addr, length, advice)`` or None.
madvise = _libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])
_mincore = _libc_function("mincore", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p])
_VEC = threading.local()


def address_of(buf: Any) -> int:
    """The address of the first byte of a (read-only) buffer, e.g. an LMDB value."""
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


def resident(addr: int, length: int) -> bool | None:
    """Whether every page of ``[addr, addr + length)`` is in memory; None if unknown.

    One ``mincore`` call (about 1 us). Unknown where ``mincore`` is unavailable or fails.
    """
    if _mincore is None or length <= 0:
        return None
    start = addr - addr % PAGE_BYTES
    span = addr + length - start
    pages = -(-span // PAGE_BYTES)
    vec = getattr(_VEC, "buf", None)
    if vec is None or len(vec) < pages:
        vec = ctypes.create_string_buffer(max(pages, 1024))
        _VEC.buf = vec
    if _mincore(start, span, vec) != 0:
        return None
    if pages <= 64:
        return all(b & 1 for b in vec.raw[:pages])
    # Bit 0 of each byte is residency: one vectorised test instead of a Python loop.
    return bool((np.frombuffer(vec, dtype=np.uint8, count=pages) & 1).all())


def map_base(addr: int, inode: int) -> int | None:
    """Address of file offset 0 of the mapping of inode ``inode`` that holds ``addr``.

    Reads ``/proc/self/maps`` (Linux); None where it is unavailable or no mapping of that
    file holds ``addr``.
    """
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) < 5:
                    continue
                lo, _, hi = parts[0].partition("-")
                try:
                    start, end = int(lo, 16), int(hi, 16)
                    if not start <= addr < end or int(parts[4]) != inode:
                        continue
                    return start - int(parts[2], 16)
                except ValueError:
                    continue
    except OSError:
        return None
    return None


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset``; one ``pread`` unless the kernel returns fewer.

    Raises:
        EOFError: The file ends before ``offset + length``.
    """
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            raise EOFError(f"file ends at {offset + got} bytes, {length - got} bytes short")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class ReadPool:
    """Named daemon threads for concurrent reads: ``map`` with the caller, or ``submit``.

    Threads start on demand (``fastfeed-<role>-<n>``) and end after ``idle_s`` seconds
    without work, so an idle source holds no threads; :meth:`close` ends them at once.

    Args:
        size: Most threads.
        role: Thread name part.
        idle_s: Seconds an idle thread waits for work before it ends.
    """

    _POLL_S = 0.5
    _numbers = itertools.count()

    def __init__(self, size: int, role: str, idle_s: float = 30.0) -> None:
        self.size = max(0, int(size))
        self.role = role
        self.idle_s = float(idle_s)
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._closed = False

    def _grow(self, want: int) -> None:
        with self._lock:
            if self._closed:
                return
            self._threads = {t for t in self._threads if t.is_alive()}
            while len(self._threads) < min(self.size, want):
                t = threading.Thread(
                    target=self._work,
                    name=f"fastfeed-{self.role}-{next(self._numbers)}",
                    daemon=True,
                )
                self._threads.add(t)
                t.start()

    def _work(self) -> None:
        me = threading.current_thread()
        while True:
            try:
                job = self._jobs.get(timeout=self.idle_s)
            except queue.Empty:
                with self._lock:
                    # A job put after the timeout fired is seen here; _grow (which runs
                    # after every put, under this lock) replaces a thread that left.
                    if self._jobs.empty() or self._closed:
                        self._threads.discard(me)
                        return
                continue
            if job is None:
                with self._lock:
                    self._threads.discard(me)
                return
            try:
                job()
            except BaseException:
                pass

    @property
    def threads(self) -> int:
        """Live threads now."""
        with self._lock:
            return sum(t.is_alive() for t in self._threads)

    def submit(self, job: Callable[[], None]) -> bool:
        """Run ``job()`` in the background; False when the pool is closed or has no threads."""
        if self._closed or self.size == 0:
            return False
        self._jobs.put(job)
        self._grow(self._jobs.qsize())
        return True

    def map(self, fn: Callable[[int], _T], n: int, timeout_s: float = 300.0) -> list[_T]:
        """``[fn(0), ..., fn(n-1)]``, computed by the caller and up to ``n - 1`` threads.

        The first exception stops the others and is re-raised here.

        Raises:
            TimeoutError: The helpers did not finish within ``timeout_s`` seconds.
        """
        helpers = min(self.size, n - 1)
        if helpers <= 0 or self._closed:
            return [fn(k) for k in range(n)]
        results: list[Any] = [None] * n
        counter = itertools.count()
        errors: list[BaseException] = []
        done = threading.Semaphore(0)

        def participate() -> None:
            try:
                while not errors:
                    k = next(counter)  # atomic under the GIL
                    if k >= n:
                        return
                    results[k] = fn(k)
            except BaseException as exc:
                errors.append(exc)

        def helper() -> None:
            try:
                participate()
            finally:
                done.release()

        for _ in range(helpers):
            self._jobs.put(helper)
        self._grow(helpers)
        participate()
        deadline = time.monotonic() + timeout_s
        for _ in range(helpers):
            while not done.acquire(timeout=self._POLL_S):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.role} threads did not finish in {timeout_s} s")
                if self._closed and not self.threads:
                    # Closed under our feet: run what is left here.
                    participate()
                    break
        if errors:
            raise errors[0]
        return results

    def close(self, timeout_s: float = 5.0) -> None:
        """End every thread (idempotent); later ``map`` calls run in the caller."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout_s
        for t in threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))


class MapGuard:
    """Readers-writer lock over one LMDB map: many transactions, or one remap.

    Writer-preferring: once a remap waits, new readers wait too, so it cannot starve.
    A thread must not take the read side twice (a waiting remap would deadlock it until
    the timeout).

    Args:
        timeout_s: Longest wait on either side, seconds.
    """

    def __init__(self, timeout_s: float = 60.0) -> None:
        self.timeout_s = timeout_s
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._remapping = False
        #: Incremented by every remap; readers compare it to skip a redundant one.
        self.generation = 0

    def acquire_read(self) -> int:
        """Enter a read section; returns the map generation seen.

        Raises:
            TimeoutError: A remap held the map for ``timeout_s``.
        """
        with self._cond:
            if self._remapping and not self._cond.wait_for(
                lambda: not self._remapping, self.timeout_s
            ):
                raise TimeoutError(f"the LMDB map was being remapped for {self.timeout_s} s")
            self._readers += 1
            return self.generation

    def release_read(self) -> None:
        """Leave a read section."""
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    def remap(self, seen_generation: int, fn: Callable[[], None]) -> None:
        """Run ``fn()`` with no reader inside, unless another remap ran since ``seen_generation``.

        Raises:
            TimeoutError: Readers did not leave within ``timeout_s``.
        """
        with self._cond:
            if self.generation != seen_generation:
                return  # another thread already adopted the new map
            if self._remapping and not self._cond.wait_for(
                lambda: not self._remapping, self.timeout_s
            ):
                raise TimeoutError(f"the LMDB map was being remapped for {self.timeout_s} s")
            if self.generation != seen_generation:
                return
            self._remapping = True
            try:
                if not self._cond.wait_for(lambda: self._readers == 0, self.timeout_s):
                    raise TimeoutError(
                        f"readers of the LMDB map did not finish within {self.timeout_s} s"
                    )
                fn()
                self.generation += 1
            finally:
                self._remapping = False
                self._cond.notify_all()


# -- value locations from LMDB's own pages --------------------------------------------
#
# py-lmdb touches every page of a value it returns ("preload", with the GIL released), so
# a lookup through it already reads the value. To know where values are without reading
# them, RecordIndex reads LMDB's meta, branch and leaf pages itself (LMDB 0.9 on-disk
# format, 64-bit builds: the format py-lmdb bundles) and verifies one value against
# py-lmdb before anything relies on it.

_MAGIC = 0xBEEFC0DE
_PAGE_HEADER = 16  # pgno u64, pad u16, flags u16, lower u16, upper u16
_P_BRANCH, _P_LEAF = 0x01, 0x02
_F_BIGDATA = 0x01
_NODE_HEADER = 8  # lo u16, hi u16, flags u16, ksize u16
_META_ROOT = _PAGE_HEADER + 112  # mm_dbs[MAIN_DBI].md_root
_META_TXNID = _PAGE_HEADER + 128
_META_DEPTH = _PAGE_HEADER + 78  # mm_dbs[MAIN_DBI].md_depth
_P_INVALID = 0xFFFFFFFFFFFFFFFF
_KEY_DIGITS = 10


class RecordIndex:
    """File offsets and sizes of the values of a fastfeed LMDB, read from its B-tree pages.

    Leaves are read (one ``pread`` of a page each) and parsed the first time one of their
    records is looked up; branch pages are kept. Records are keyed ``b"%010d" % index``.

    Args:
        fd: The data file, open for reading.
        psize: LMDB's page size, bytes.
        count: Records (indices ``0..count-1``).

    Attributes:
        txnid: The transaction the pages belong to (compare with ``env.info()``).

    Raises:
        ValueError: The meta pages are not LMDB 0.9 ones.
    """

    def __init__(self, fd: int, psize: int, count: int) -> None:
        self.fd = fd
        self.psize = psize
        self.count = count
        self.offsets = np.full(count, -1, dtype=np.int64)
        self.sizes = np.zeros(count, dtype=np.int64)
        self._branches: dict[int, tuple[list[bytes], list[int]]] = {}
        self._lock = threading.Lock()
        best = None
        for pgno in (0, 1):
            page = self._page(pgno)
            if int.from_bytes(page[_PAGE_HEADER : _PAGE_HEADER + 4], "little") != _MAGIC:
                continue
            txnid = int.from_bytes(page[_META_TXNID : _META_TXNID + 8], "little")
            root = int.from_bytes(page[_META_ROOT : _META_ROOT + 8], "little")
            depth = int.from_bytes(page[_META_DEPTH : _META_DEPTH + 2], "little")
            if best is None or txnid > best[0]:
                best = (txnid, root, depth)
        if best is None:
            raise ValueError("no LMDB meta page")
        self.txnid, self.root, self.depth = best

    def _page(self, pgno: int) -> bytes:
        return pread_exact(self.fd, self.psize, pgno * self.psize)

    def _branch(self, pgno: int, page: bytes) -> tuple[list[bytes], list[int]]:
        lower = int.from_bytes(page[12:14], "little")
        keys: list[bytes] = []
        children: list[int] = []
        for k in range((lower - _PAGE_HEADER) >> 1):
            ptr = int.from_bytes(page[_PAGE_HEADER + 2 * k : _PAGE_HEADER + 2 * k + 2], "little")
            lo, hi, flags, ksize = struct.unpack_from("<HHHH", page, ptr)
            keys.append(page[ptr + _NODE_HEADER : ptr + _NODE_HEADER + ksize])
            children.append(lo | hi << 16 | flags << 32)
        keys[0] = b""  # the leftmost child takes every key below the second one
        self._branches[pgno] = (keys, children)
        return keys, children

    def _leaf(self, pgno: int, page: bytes) -> None:
        """Record the offsets and sizes of every record key on leaf page ``pgno``.

        Vectorised (about 20 us a leaf instead of 0.4 ms in a Python loop): nodes are
        2-byte aligned, their headers are read as uint16, the 10-digit keys as a matrix.
        """
        lower = int.from_bytes(page[12:14], "little")
        nkeys = (lower - _PAGE_HEADER) >> 1
        if nkeys <= 0:
            return
        raw = np.frombuffer(page, dtype=np.uint8)
        ptrs = np.frombuffer(page, dtype="<u2", count=nkeys, offset=_PAGE_HEADER).astype(np.int64)
        words = np.frombuffer(page, dtype="<u2")
        head = words[(ptrs // 2)[:, None] + np.arange(4)].astype(np.int64)  # lo hi flags ksize
        lo, hi, flags, ksize = head[:, 0], head[:, 1], head[:, 2], head[:, 3]
        ok = (ksize == _KEY_DIGITS) & (ptrs + _NODE_HEADER + _KEY_DIGITS + 8 <= len(page))
        if not ok.any():
            return
        ptrs, lo, hi, flags = ptrs[ok], lo[ok], hi[ok], flags[ok]
        keys = raw[(ptrs + _NODE_HEADER)[:, None] + np.arange(_KEY_DIGITS)].astype(np.int64) - 48
        digits = ((keys >= 0) & (keys <= 9)).all(axis=1)  # fastfeed's metadata keys are not
        index = keys @ (10 ** np.arange(_KEY_DIGITS - 1, -1, -1, dtype=np.int64))
        good = digits & (index < self.count)
        if not good.any():
            return
        ptrs, lo, hi, flags, index = ptrs[good], lo[good], hi[good], flags[good], index[good]
        data = ptrs + _NODE_HEADER + _KEY_DIGITS
        big = (flags & _F_BIGDATA) != 0
        overflow = (
            (
                raw[data[:, None] + np.arange(8)].astype(np.uint64)
                << (np.arange(8, dtype=np.uint64) * np.uint64(8))
            )
            .sum(axis=1, dtype=np.uint64)
            .astype(np.int64)
        )
        self.offsets[index] = np.where(
            big, overflow * self.psize + _PAGE_HEADER, pgno * self.psize + data
        )
        self.sizes[index] = lo | hi << 16

    def _leaf_of(self, key: bytes) -> tuple[int, bytes] | None:
        """``(pgno, page)`` of the leaf where ``key`` belongs, or None for an empty tree."""
        pgno = self.root
        for _ in range(64):  # deeper than any LMDB
            if pgno == _P_INVALID:
                return None
            cached = self._branches.get(pgno)
            if cached is None:
                page = self._page(pgno)
                flags = int.from_bytes(page[10:12], "little")
                if flags & _P_LEAF:
                    return pgno, page
                if not flags & _P_BRANCH:
                    raise ValueError(f"LMDB page {pgno} is neither a branch nor a leaf")
                cached = self._branch(pgno, page)
            keys, children = cached
            pgno = children[max(0, bisect.bisect_right(keys, key) - 1)]
        raise ValueError("LMDB B-tree deeper than 64 levels")

    def leaf_page(self, index: int) -> int | None:
        """File offset of the leaf page holding record ``index``'s key, reading branches only.

        None once the leaf is parsed (use :meth:`locate`) or for an empty tree.
        """
        if int(self.offsets[index]) >= 0:
            return None
        key = b"%010d" % index
        pgno = self.root
        for level in range(64):
            if pgno == _P_INVALID or self.depth <= 1:
                return None
            cached = self._branches.get(pgno)
            if cached is None:
                page = self._page(pgno)
                if not int.from_bytes(page[10:12], "little") & _P_BRANCH:
                    raise ValueError(f"LMDB page {pgno} is not a branch page")
                cached = self._branch(pgno, page)
            keys, children = cached
            child = children[max(0, bisect.bisect_right(keys, key) - 1)]
            if level == self.depth - 2:  # the children of this branch are leaves
                return child * self.psize
            pgno = child
        return None

    def locate(self, index: int) -> tuple[int, int] | None:
        """``(file offset, size)`` of record ``index``'s value, or None if it has none."""
        off = int(self.offsets[index])
        if off < 0:
            leaf = self._leaf_of(b"%010d" % index)
            if leaf is None:
                return None
            self._leaf(*leaf)
            off = int(self.offsets[index])
            if off < 0:
                return None
        return off, int(self.sizes[index])

    def find(self, key: bytes) -> tuple[int, int] | None:
        """``(file offset, size)`` of any key's value (e.g. metadata), or None."""
        leaf = self._leaf_of(key)
        if leaf is None:
            return None
        pgno, page = leaf
        lower = int.from_bytes(page[12:14], "little")
        for k in range((lower - _PAGE_HEADER) >> 1):
            ptr = int.from_bytes(page[_PAGE_HEADER + 2 * k : _PAGE_HEADER + 2 * k + 2], "little")
            lo, hi, flags, ksize = struct.unpack_from("<HHHH", page, ptr)
            if page[ptr + _NODE_HEADER : ptr + _NODE_HEADER + ksize] != key:
                continue
            data = ptr + _NODE_HEADER + ksize
            if flags & _F_BIGDATA:
                overflow = int.from_bytes(page[data : data + 8], "little")
                return overflow * self.psize + _PAGE_HEADER, lo | hi << 16
            return pgno * self.psize + data, lo | hi << 16
        return None
