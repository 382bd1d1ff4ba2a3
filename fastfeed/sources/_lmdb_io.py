"""Low-level helpers of :class:`~fastfeed.sources.lmdb.LMDBSource`'s cold-read path.

* :func:`address_of`, :func:`map_base`: where a value lives. LMDB hands out values as
  memoryviews into its read-only map of ``data.mdb``; a value's file offset is its address
  minus the map's base address, found once in ``/proc/self/maps`` and verified with one
  ``pread``.
* :func:`resident`: ``mincore`` of a range of the map (page cache residency).
* :func:`pread_exact` and :class:`RecordIndex` (the values' file offsets, read from
  LMDB's B-tree pages) live in :mod:`fastfeed.sources._lmdb_btree` and are re-exported
  here.
* :class:`MapGuard`: a readers-writer lock with timeouts. Adopting a map grown by another
  process (``set_mapsize(0)``) unmaps the old map, so no transaction of this process may
  be open meanwhile.

Linux only where noted; elsewhere the helpers report "unavailable" and the source keeps
its plain page-fault path.
"""

from __future__ import annotations

import ctypes
import mmap
import os  # noqa: F401 - tests patch os.pread through this module (lmdb_io.os)
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from fastfeed.sources._lmdb_btree import RecordIndex, pread_exact

__all__ = [
    "PAGE_BYTES",
    "MapGuard",
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
    return bool((np.frombuffer(memoryview(vec), dtype=np.uint8, count=pages) & 1).all())


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
