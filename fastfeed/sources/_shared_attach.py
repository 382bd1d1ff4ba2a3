"""One process's attachment to a shared cache segment: finding or creating it, mapping it,
its counter slot and holder name, forks, statistics, and leaving.

:class:`SegmentAttachment` is the base of :class:`~fastfeed.sources._shared_store.SharedStore`,
which adds reading and filling records. The design is described in
:mod:`fastfeed.sources.shared_cache`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from fastfeed.errors import ConfigError
from fastfeed.sources._shared_discovery import (
    bind_abstract,
    creation_name,
    holder_name,
    open_existing,
)
from fastfeed.sources._shared_layout import (
    COUNTER_WORD,
    COUNTERS,
    H_ENOMEM,
    H_FILLED,
    H_FILLED_BYTES,
    H_RETIRED,
    H_SKIPPED,
    H_USED,
    MAX_PROCS,
    PID_WORD,
    SLOT_WORDS,
    SegmentLayout,
    check_memory,
    create_segment,
    map_segment,
)
from fastfeed.sources._shared_locks import (
    SLOT_LOCK,
    adopt_slot,
    lock,
    supported,
    with_alloc_lock,
)

__all__ = ["SegmentAttachment"]


class SegmentAttachment:
    """This process's attachment to one machine-wide cache segment, without the records.

    Args and attributes: see :class:`~fastfeed.sources._shared_store.SharedStore`.

    Raises:
        ConfigError: Not Linux (no memfd), or ``capacity`` larger than the machine's memory.
    """

    def __init__(
        self,
        key: str,
        n: int,
        capacity: int,
        *,
        claim_timeout_s: float = 60.0,
        attach_timeout_s: float = 30.0,
    ) -> None:
        if not supported():
            raise ConfigError("MemoryCache(shared=True) needs Linux (memfd_create)")
        self.key = key
        self.n = n
        self.capacity = capacity
        self.claim_timeout_s = claim_timeout_s
        self._layout = SegmentLayout.of(n, capacity)
        self.total_bytes = self._layout.total_bytes
        check_memory(self.total_bytes, capacity)
        self._tlock = threading.Lock()
        self._inflight: dict[int, threading.Event] = {}
        self._fd = -1
        self._warned = False
        self._attach(attach_timeout_s)
        self._finalizer = weakref.finalize(self, _release, self._resources)

    # -- attaching -------------------------------------------------------------------------

    def _attach(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            fd = open_existing(self.key, self.total_bytes)
            if fd is None:
                guard = bind_abstract(creation_name(self.key))
                if guard is not None:
                    try:
                        fd = open_existing(self.key, self.total_bytes)
                        created = fd is None
                        if fd is None:
                            fd = create_segment(self.key, self._layout)
                        self._map(fd)
                        self._register()
                    finally:
                        guard.close()
                    self.created = created
                    return
            else:
                self._map(fd)
                self._register()
                self.created = False
                return
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"shared cache {self.key}: could not find or create the segment in "
                    f"{timeout_s:.0f} s (another process holds the creation lock)"
                )
            time.sleep(0.005)

    def _map(self, fd: int) -> None:
        self._fd = fd
        v = map_segment(fd, self._layout)
        self._mm = v.mm
        self._header = v.header
        self._slots = v.slots
        self._states = v.states
        self._offs = v.offs
        self._lens = v.lens
        self._labels = v.labels
        self._ro = v.ro
        # What the finalizer releases; it must not refer to self (or it would keep it alive).
        self._resources: dict[str, Any] = {
            "fd": fd,
            "mm": v.mm,
            "header": v.header,
            "slots": v.slots,
            "views": [v.states, v.offs, v.lens, v.labels, v.ro, v.whole],
            "sock": None,
            "slot": None,
            "pid": None,
        }

    def _register(self) -> None:
        """Take a counter slot and advertise this process as a holder."""
        self._pid = os.getpid()
        self._slot: int | None = None
        self._local = [0] * (1 + len(COUNTERS))  # counters when no slot is free
        for s in range(MAX_PROCS):
            if lock(self._fd, SLOT_LOCK + s):
                adopt = functools.partial(adopt_slot, self._header, self._slots, s)
                with_alloc_lock(self._fd, adopt)
                self._slot = s
                break
        sock = bind_abstract(holder_name(self.key, self._pid, self._fd))
        self._resources.update(slot=self._slot, pid=self._pid, sock=sock)

    def after_fork(self) -> None:
        """In a forked child: new locks, a counter slot and a holder name of its own."""
        if self._pid == os.getpid() or not self._resources:
            return
        self._tlock = threading.Lock()
        self._inflight = {}
        sock = self._resources.get("sock")
        if sock is not None:
            sock.close()  # our copy only: the parent's stays bound while it lives
        self._register()

    def _with_alloc_lock(self, fn: Callable[[], Any]) -> Any:
        return with_alloc_lock(self._fd, fn)

    def _count(self, name: str, amount: int) -> None:
        # Called under self._tlock: this process is the only writer of its slot.
        if self._slot is None:
            self._local[COUNTER_WORD[name]] += amount
        else:
            self._slots[self._slot * SLOT_WORDS + COUNTER_WORD[name]] += amount

    # -- statistics -------------------------------------------------------------------------

    def process_counters(self) -> dict[str, int]:
        """This process's counters."""
        with self._tlock:
            if self._slot is None:
                vals = self._local
            else:
                base = self._slot * SLOT_WORDS
                vals = self._slots[base : base + SLOT_WORDS].tolist()
        return {name: int(vals[COUNTER_WORD[name]]) for name in COUNTERS}

    def machine_counters(self) -> dict[str, Any]:
        """Machine-wide counters: every process attached now plus those that left."""
        header, slots = self._header, self._slots
        totals: dict[str, Any] = {
            name: int(header[H_RETIRED + k]) for k, name in enumerate(COUNTERS)
        }
        attached = 0
        for s in range(MAX_PROCS):
            base = s * SLOT_WORDS
            pid = int(slots[base + PID_WORD])
            if pid:
                attached += os.path.exists(f"/proc/{pid}")  # a killed one's slot stays
                for name in COUNTERS:
                    totals[name] += int(slots[base + COUNTER_WORD[name]])
        filled = int(header[H_FILLED])
        totals.update(
            processes=attached,
            records=self.n,
            filled_records=filled,
            filled_bytes=int(header[H_FILLED_BYTES]),
            skipped_records=int(header[H_SKIPPED]),
            fill_fraction=filled / self.n if self.n else 0.0,
            used_bytes=int(header[H_USED]),
            capacity_bytes=self.capacity,
            segment_bytes=self.total_bytes,
            unreserved_bytes=int(header[H_ENOMEM]),
        )
        return totals

    def reset_counters(self) -> None:
        """Zero this process's counters (machine-wide totals keep what others counted)."""
        with self._tlock:
            if self._slot is None:
                self._local = [0] * len(self._local)
            else:
                base = self._slot * SLOT_WORDS
                for k in range(1, 1 + len(COUNTERS)):
                    self._slots[base + k] = 0

    def detach(self) -> None:
        """Leave the segment: fold this process's counters, drop the holder name and map."""
        with self._tlock:
            self._finalizer()


def _release(res: dict[str, Any]) -> None:
    """Fold the counters, unbind the holder name, unmap and close (the finalizer)."""
    if not res:
        return
    slot, fd = res.get("slot"), res.get("fd", -1)
    if slot is not None and res.get("pid") == os.getpid():
        header, slots = res["header"], res["slots"]
        with contextlib.suppress(OSError):
            with_alloc_lock(fd, lambda: adopt_slot(header, slots, slot))
            slots[slot * SLOT_WORDS + PID_WORD] = 0
    sock = res.get("sock")
    if sock is not None:
        sock.close()
    for view in [*res.get("views", []), res.get("header"), res.get("slots")]:
        if view is None:
            continue
        with contextlib.suppress(BufferError):
            view.release()
    mm = res.get("mm")
    if mm is not None:
        with contextlib.suppress(BufferError):
            mm.close()
    fd = res.get("fd", -1)
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)  # drops this process's record and slot locks too
    res.clear()
