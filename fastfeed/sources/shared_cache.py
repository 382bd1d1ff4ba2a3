"""One RAM cache per machine: the shared store behind ``MemoryCache(..., shared=True)``.

Every process that opens the same source (same :func:`source_identity`) with the same
capacity finds one segment of shared memory and fills it once; worker processes and DDP
ranks on the node read each other's records.

Design, and why
---------------
**Backing: an anonymous ``memfd``, never a file in /dev/shm.** A memfd has no name, so
nothing can be left behind: the kernel frees it when the last process holding a
descriptor or a mapping exits, also after SIGKILL. Hits are read-only ``memoryview``
slices of the mapping (no copy): a record still referenced keeps the mapping, and the
descriptor Python's ``mmap`` duplicates, alive after :meth:`SharedStore.detach`.
A memfd is not limited by the size of /dev/shm (Docker's 64 MB default does not apply),
only by memory; pages are reserved with ``posix_fallocate`` as records are placed, so
running out of memory is an ``ENOMEM`` warned about with the size needed (the records
are then read through), never a SIGBUS.

**Finding it: abstract-namespace unix socket names as a directory.** Each attached process
binds ``\\0fastfeed-cache/<key>/<pid>/<fd>`` (an abstract name: no file, released by the
kernel when the process dies). A newcomer lists ``/proc/net/unix``, opens
``/proc/<pid>/fd/<fd>`` of any live holder (as the worker ring in
:mod:`fastfeed.workers.shm` does) and checks the segment's magic and key. Creation is
serialised by binding ``\\0fastfeed-cache/<key>/create`` (atomic, also released on death).
A rank that restarts finds the segment again as long as one process still holds it.

**Claims: POSIX record locks on the memfd, one byte per record.** The first epoch's fill
is split: a process that misses record ``i`` takes a non-blocking ``lockf`` on byte
``2**51 + i`` of the segment, reads the record from storage, copies it in and publishes
it; another process that misses ``i`` meanwhile waits for the publication instead of
reading storage. The kernel drops the locks of a process that dies, so a writer killed
mid-fill leaves its records unpublished and claimable: the waiter takes the claim over
(``reclaims``), no timeout needed. A claimant that hangs is waited for at most
``claim_timeout_s``; then the record is read through. Threads of one process (which
POSIX locks do not tell apart) coordinate through an in-process table. POSIX locks are
dropped when the process closes *any* descriptor of the file: so there is one attachment
per process and key (:func:`attach`), and candidate descriptors are only opened and
closed before this process holds locks on that segment. (One gap: records kept after
:meth:`SharedStore.detach` keep Python's duplicate descriptor; if the process re-attaches
to the same segment and later drops them, its locks go, and another process may adopt its
counter slot or fill a record it is filling, with identical bytes.)

**Publishing: a record is visible only once complete.** The filler copies the bytes,
writes offset, length and label, and only then sets the record's one-byte state to
READY. A reader checks that byte first. x86 keeps stores in order (and the reader's loads
in order); on weaker memory models the lock and GIL operations around both sides act as
barriers. A writer killed between placing and publishing wastes the bytes it had placed
(bounded by one ``read_many``); the record stays EMPTY.

**Policy: static fill-once.** Space is handed out by a bump allocator under a record lock
on the header; a record that does not fit in what is left is marked SKIP and is read
through from then on, by every process. So the hit rate is fixed at the cached fraction,
as with the in-process static cache; there is no eviction.

**Statistics.** Each process owns a slot of counters in the segment (claimed with a lock
held for its lifetime); machine-wide figures are the sum of the live slots plus the totals
that exited or killed processes left (folded in by whoever reuses their slot).

Segment layout (little endian): a 4 KiB header, ``MAX_PROCS`` counter slots, the record
table (state ``u8[n]``, offset ``u64[n]``, length ``u64[n]``, label ``i64[n]``), then the
data region of ``capacity`` bytes. The file is sparse: untouched pages cost nothing.

Where the code lives
--------------------
This module is the face: :func:`source_identity` and the names below, re-exported from
private modules, one concern each:

- :mod:`~fastfeed.sources._shared_layout`: the segment layout, header and record table;
  creating, recognising and mapping a segment; record states ``EMPTY``/``READY``/``SKIP``.
- :mod:`~fastfeed.sources._shared_discovery`: keys (:func:`segment_key`), abstract
  unix-socket names and ``/proc`` (:func:`list_segments`).
- :mod:`~fastfeed.sources._shared_locks`: the record locks and the header lock.
- :mod:`~fastfeed.sources._shared_attach`: one process's attachment (counter slot, holder
  name, forks, statistics, leaving).
- :mod:`~fastfeed.sources._shared_store`: :class:`SharedStore` (hits, claims, filling,
  waiting) and :func:`attach`.
"""

from __future__ import annotations

from typing import Any

from fastfeed.sources._shared_discovery import list_segments, segment_key
from fastfeed.sources._shared_layout import EMPTY, LAYOUT_VERSION, MAX_PROCS, READY, SKIP
from fastfeed.sources._shared_store import SharedStore, attach
from fastfeed.sources.base import Source

__all__ = [
    "EMPTY",
    "LAYOUT_VERSION",
    "MAX_PROCS",
    "READY",
    "SKIP",
    "SharedStore",
    "attach",
    "list_segments",
    "segment_key",
    "source_identity",
]


def source_identity(source: Source) -> tuple[Any, ...] | None:
    """What makes ``source`` the same data in another process, or ``None``.

    Calls ``source.identity()`` (:meth:`~fastfeed.sources.base.Source.identity`); sources
    that do not implement it are not shareable.
    """
    return source.identity()
