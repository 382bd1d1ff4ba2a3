"""Reading and filling a shared cache segment: hits, per-record claims, publication.

:class:`SharedStore` adds to this process's attachment
(:class:`~fastfeed.sources._shared_attach.SegmentAttachment`) the claim protocol: a process
that misses record ``i`` claims it (a non-blocking record lock on byte
``RECORD_LOCK + i``), reads it from storage, places it with the bump allocator and
publishes it (state READY last); a process that misses a record someone else has claimed
waits for the publication, and takes the claim over once the claimant's lock is gone.
:func:`attach` gives each process one store per key. The design is described in
:mod:`fastfeed.sources.shared_cache`.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

from fastfeed._size import format_size
from fastfeed.sources._shared_attach import SegmentAttachment
from fastfeed.sources._shared_layout import (
    EMPTY,
    H_ENOMEM,
    H_FILLED,
    H_FILLED_BYTES,
    H_SKIPPED,
    H_USED,
    NO_LABEL,
    READY,
    SKIP,
)
from fastfeed.sources._shared_locks import RECORD_LOCK, lock, unlock
from fastfeed.sources.base import Record, Source

__all__ = ["SharedStore", "attach"]


class SharedStore(SegmentAttachment):
    """This process's attachment to one machine-wide cache segment (thread-safe).

    Args:
        key: Segment key (:func:`~fastfeed.sources.shared_cache.segment_key`).
        n: Records of the source.
        capacity: Bytes of record data the segment holds.
        claim_timeout_s: Longest wait for a record another live process is filling
            before reading it through, seconds.
        attach_timeout_s: Longest wait to find or create the segment, seconds.

    Attributes:
        key: The segment's key.
        created: Whether this process created the segment (False: it attached).
        total_bytes: Size of the segment (header, counters, record table, data), bytes.

    Raises:
        ConfigError: Not Linux (no memfd), or ``capacity`` larger than the machine's memory.
    """

    # -- reading ---------------------------------------------------------------------------

    def state(self, index: int) -> int:
        """EMPTY (0), READY (1) or SKIP (2)."""
        return self._states[index]

    def read_many(self, indices: Sequence[int], source: Source) -> list[Record]:
        """Records ``indices``: hits from the segment, misses filled (once per machine)."""
        states, offs, lens, labels, mm = (
            self._states,
            self._offs,
            self._lens,
            self._labels,
            self._ro,
        )
        recs: list[Any] = [None] * len(indices)
        missing: list[int] = []
        hit_bytes = 0
        for k, i in enumerate(indices):
            if states[i] == READY:
                off = offs[i]
                ln = lens[i]
                lab = labels[i]
                # A read-only view: Record.data is any bytes-like object the caller may keep.
                recs[k] = Record(mm[off : off + ln], None if lab == NO_LABEL else lab)  # type: ignore[arg-type]
                hit_bytes += ln
            else:
                missing.append(k)
        with self._tlock:
            self._count("hits", len(indices) - len(missing))
            self._count("hit_bytes", hit_bytes)
            self._count("misses", len(missing))
        if missing:
            self._fill(indices, missing, recs, source, wait=True)
        return recs

    def _get(self, i: int) -> Record:
        off = self._offs[i]
        lab = self._labels[i]
        data = self._ro[off : off + self._lens[i]]
        return Record(data, None if lab == NO_LABEL else lab)  # type: ignore[arg-type]

    def _fill(
        self,
        indices: Sequence[int],
        missing: list[int],
        recs: list[Any],
        source: Source,
        *,
        wait: bool,
    ) -> int:
        """Fill ``recs[k]`` for ``k`` in ``missing``; returns records this process placed."""
        fd = self._fd
        mine: list[int] = []  # positions whose record this process claimed
        through: list[int] = []  # positions read from storage without caching
        others: list[int] = []  # positions another thread or process is filling
        with self._tlock:
            for k in missing:
                i = indices[k]
                st = self._states[i]
                if st == READY:
                    recs[k] = self._get(i)
                elif st == SKIP:
                    through.append(k)
                elif i in self._inflight:
                    others.append(k)
                elif lock(fd, RECORD_LOCK + i):
                    st = self._states[i]  # again: it may have changed before the claim
                    if st != EMPTY:
                        unlock(fd, RECORD_LOCK + i)
                        if st == READY:
                            recs[k] = self._get(i)
                        else:
                            through.append(k)
                    else:
                        self._inflight[i] = threading.Event()
                        mine.append(k)
                else:
                    others.append(k)
        placed = 0
        claimed = [indices[k] for k in mine]
        try:
            todo = mine + through if wait else mine
            if todo:
                fetched = source.read_many([indices[k] for k in todo])
                nbytes = 0
                for k, rec in zip(todo, fetched, strict=True):
                    recs[k] = rec
                    nbytes += len(rec.data)
                with self._tlock:
                    self._count("storage_reads", len(todo))
                    self._count("storage_bytes", nbytes)
                    self._count("read_through", len(through) if wait else 0)
                placed = self._place([(indices[k], recs[k]) for k in mine])
        finally:
            with self._tlock:
                for i in claimed:
                    unlock(fd, RECORD_LOCK + i)
                    ev = self._inflight.pop(i, None)
                    if ev is not None:
                        ev.set()
        if others and wait:
            self._wait_for(indices, others, recs, source)
        return placed

    def _place(self, items: list[tuple[int, Record]]) -> int:
        """Copy claimed records into the segment and publish them; returns records placed."""
        if not items:
            return 0
        header = self._header
        spots: list[tuple[int, int, Record]] = []
        skipped: list[int] = []

        def allocate() -> None:
            used = header[H_USED]
            for i, rec in items:
                size = len(rec.data)
                if used + size <= self.capacity:
                    spots.append((i, self._layout.data_off + used, rec))
                    used += size  # packed: the budget counts record bytes, as in-process
                else:
                    skipped.append(i)
            header[H_USED] = used

        self._with_alloc_lock(allocate)
        if spots:
            lo = spots[0][1]
            hi = spots[-1][1] + len(spots[-1][2].data)
            try:
                if hi > lo:
                    os.posix_fallocate(self._fd, lo, hi - lo)
            except OSError as exc:
                self._note_no_memory(hi - lo, exc)
                skipped.extend(i for i, _, _ in spots)
                spots = []
        mm, offs, lens, labels, states = (
            self._mm,
            self._offs,
            self._lens,
            self._labels,
            self._states,
        )
        nbytes = 0
        for i, off, rec in spots:
            data = rec.data
            ln = len(data)
            mm[off : off + ln] = data
            offs[i] = off
            lens[i] = ln
            labels[i] = NO_LABEL if rec.label is None else int(rec.label)
            states[i] = READY  # publish: only now can anyone read it
            nbytes += ln
        for i in skipped:
            states[i] = SKIP

        def account() -> None:
            header[H_FILLED] += len(spots)
            header[H_FILLED_BYTES] += nbytes
            header[H_SKIPPED] += len(skipped)

        self._with_alloc_lock(account)
        with self._tlock:
            self._count("fills", len(spots))
            self._count("fill_bytes", nbytes)
        return len(spots)

    def _note_no_memory(self, need: int, exc: OSError) -> None:
        self._with_alloc_lock(lambda: _header_add(self._header, H_ENOMEM, need))
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"shared cache {self.key}: could not reserve {format_size(need)} of shared "
                f"memory ({exc.strerror}); the segment needs up to "
                f"{format_size(self.total_bytes)} in all. Records that do not fit are read "
                "from storage; lower the capacity or free memory",
                UserWarning,  # ResourceWarning is hidden by default: this must be seen
                stacklevel=4,
            )

    def _wait_for(
        self, indices: Sequence[int], others: list[int], recs: list[Any], source: Source
    ) -> None:
        """Wait for records other threads or processes are filling; take over dead claims."""
        deadline = time.monotonic() + self.claim_timeout_s
        pending = list(others)
        with self._tlock:
            self._count("waits", len(pending))
        pause = 0.0005
        while pending:
            retry: list[int] = []
            for k in pending:
                i = indices[k]
                st = self._states[i]
                if st == READY:
                    recs[k] = self._get(i)
                elif st == SKIP:
                    retry.append(k)  # read through below
                else:
                    with self._tlock:
                        ev = self._inflight.get(i)
                    if ev is None and lock(self._fd, RECORD_LOCK + i):
                        # The claimant released without publishing: it died or gave up.
                        unlock(self._fd, RECORD_LOCK + i)
                        retry.append(k)
                    else:
                        continue
            if retry:
                with self._tlock:
                    self._count(
                        "reclaims", sum(1 for k in retry if self._states[indices[k]] == EMPTY)
                    )
                self._fill(indices, retry, recs, source, wait=True)
            pending = [k for k in pending if recs[k] is None]
            if not pending:
                return
            if time.monotonic() > deadline:
                fetched = source.read_many([indices[k] for k in pending])
                for k, rec in zip(pending, fetched, strict=True):
                    recs[k] = rec
                with self._tlock:
                    self._count("read_through", len(pending))
                    self._count("storage_reads", len(pending))
                    self._count("storage_bytes", sum(len(r.data) for r in fetched))
                return
            time.sleep(pause)
            pause = min(pause * 2, 0.01)

    def preload(self, indices: Sequence[int], source: Source) -> int:
        """Claim and fill what no one else is filling; never waits. Returns records placed."""
        todo = [k for k, i in enumerate(indices) if self._states[i] == EMPTY]
        recs: list[Any] = [None] * len(indices)
        return self._fill(indices, todo, recs, source, wait=False)

    def full(self) -> bool:
        """No record placed from now on would fit (less than 1 byte left)."""
        return self._header[H_USED] >= self.capacity


_STORES: weakref.WeakValueDictionary[str, SharedStore] = weakref.WeakValueDictionary()
_STORES_LOCK = threading.Lock()


def _new_stores_lock() -> None:
    global _STORES_LOCK
    _STORES_LOCK = threading.Lock()  # a thread of the parent may have held it at fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_stores_lock)


def attach(key: str, n: int, capacity: int, **kw: Any) -> SharedStore:
    """This process's :class:`SharedStore` for ``key`` (one per process and key).

    One per process, because POSIX record locks belong to a process: two attachments of
    one process would share claims and counter slots.
    """
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is None or not store._resources:
            store = SharedStore(key, n, capacity, **kw)
            _STORES[key] = store
        return store


def _header_add(header: memoryview, word: int, amount: int) -> None:
    header[word] += amount
