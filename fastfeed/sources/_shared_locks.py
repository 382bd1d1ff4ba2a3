"""The shared cache's locks: POSIX record locks on the segment's memfd, one byte each.

Record locks may lie beyond the end of the file, so they live at offsets no segment
reaches: the allocator/header lock at :data:`ALLOC_LOCK`, counter slot ``s``'s lock at
``SLOT_LOCK + s`` (held for the owner's lifetime), and record ``i``'s claim at
``RECORD_LOCK + i``. The kernel drops a process's locks when it dies, which is what lets a
waiter take over the claims of a killed filler. POSIX locks exclude other processes, not
other threads of this one: the header lock is taken under a process-wide thread lock too.
Also here: handing a counter slot to this process (:func:`adopt_slot`). The design is
described in :mod:`fastfeed.sources.shared_cache`.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no shared cache (MemoryCache(shared=True) says so)
    fcntl = None  # type: ignore[assignment]

from fastfeed.sources._shared_layout import COUNTERS, H_RETIRED, PID_WORD, SLOT_WORDS

__all__ = [
    "ALLOC_LOCK",
    "RECORD_LOCK",
    "SLOT_LOCK",
    "adopt_slot",
    "lock",
    "supported",
    "unlock",
    "with_alloc_lock",
]

ALLOC_LOCK = 1 << 50
SLOT_LOCK = (1 << 50) + 16
RECORD_LOCK = 1 << 51


def supported() -> bool:
    """Whether this platform has what a shared segment needs (memfd, POSIX record locks)."""
    return hasattr(os, "memfd_create") and fcntl is not None


def lock(fd: int, offset: int, *, wait: bool = False) -> bool:
    """Lock byte ``offset`` of ``fd``; returns ``False`` where another process holds it.

    With ``wait`` it blocks until the lock is free (only for the header lock, held for a
    few word updates).
    """
    flags = fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB
    try:
        fcntl.lockf(fd, flags, 1, offset, os.SEEK_SET)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def unlock(fd: int, offset: int) -> None:
    """Release this process's lock on byte ``offset`` of ``fd``."""
    fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset, os.SEEK_SET)


# Taken around the header's record lock, which does not exclude this process's threads.
_HEADER_TLOCK = threading.Lock()


def _new_header_tlock() -> None:
    global _HEADER_TLOCK
    _HEADER_TLOCK = threading.Lock()  # a thread of the parent may have held it at fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_header_tlock)


def with_alloc_lock(fd: int, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` holding the segment's header lock (against threads and processes)."""
    with _HEADER_TLOCK:
        lock(fd, ALLOC_LOCK, wait=True)
        try:
            return fn()
        finally:
            unlock(fd, ALLOC_LOCK)


def adopt_slot(header: memoryview, slots: memoryview, s: int) -> None:
    """Fold slot ``s``'s counters into the header's totals and give it to this process.

    Called under the header lock (:func:`with_alloc_lock`).
    """
    base = s * SLOT_WORDS
    if slots[base + PID_WORD]:
        # Left by a process that died (or exited without folding): keep its counts.
        for k in range(1, 1 + len(COUNTERS)):
            header[H_RETIRED + k - 1] += slots[base + k]
    for k in range(SLOT_WORDS):
        slots[base + k] = 0
    slots[base + PID_WORD] = os.getpid()
