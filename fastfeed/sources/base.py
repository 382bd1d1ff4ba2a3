"""The Source contract: random access to raw records by index.

A source maps an index ``0..len-1`` to a :class:`Record` (raw bytes plus an optional
integer label). Sources are picklable and fork/spawn safe: heavy handles (LMDB
environments, file descriptors) are opened lazily by :meth:`Source._open` in the
process that reads, and re-opened after a PID change. Every source counts its reads,
bytes and time so the profiler can read them.
"""

from __future__ import annotations

import operator
import os
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from fastfeed.errors import SourceIndexError

__all__ = ["Record", "Source", "SourceCounters", "source_chain"]

_data_of = operator.itemgetter(0)  # Record -> data, without a Python-level loop

# Every live source and counter set, so a forked child can replace locks that another
# thread of the parent may have held at fork time (a held lock would deadlock the child).
_LIVE_SOURCES: weakref.WeakSet[Source] = weakref.WeakSet()
_LIVE_COUNTERS: weakref.WeakSet[SourceCounters] = weakref.WeakSet()


def _reinit_locks_after_fork() -> None:
    # Runs in the child, which has a single thread at this point: no lock is contended.
    for counters in list(_LIVE_COUNTERS):
        counters._lock = threading.Lock()
    for source in list(_LIVE_SOURCES):
        source._open_lock = threading.Lock()
        source._after_fork_in_child()
        source._pid = None  # the next read re-opens handles in this process


if hasattr(os, "register_at_fork"):  # POSIX only
    os.register_at_fork(after_in_child=_reinit_locks_after_fork)


class Record(NamedTuple):
    """One raw sample.

    Attributes:
        data: The record's bytes (``bytes`` or a read-only bytes-like object the
            caller may keep).
        label: Integer label, or ``None`` where the dataset has none.
    """

    data: bytes
    label: int | None


@dataclass
class SourceCounters:
    """Cumulative read counters of one source (thread safe through :meth:`add`).

    Attributes:
        reads: Records returned.
        bytes: Bytes returned.
        time_s: Wall time spent inside reads, seconds (summed over threads).
        calls: ``read``/``read_many`` calls.
    """

    reads: int = 0
    bytes: int = 0
    time_s: float = 0.0
    calls: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        _LIVE_COUNTERS.add(self)

    def add(self, reads: int, nbytes: int, seconds: float) -> None:
        """Add one call's worth of reads, bytes and seconds."""
        with self._lock:
            self.reads += reads
            self.bytes += nbytes
            self.time_s += seconds
            self.calls += 1

    def snapshot(self) -> dict[str, float]:
        """Return a consistent copy as a plain dict."""
        with self._lock:
            return {
                "reads": self.reads,
                "bytes": self.bytes,
                "time_s": self.time_s,
                "calls": self.calls,
            }

    def reset(self) -> None:
        """Zero every counter."""
        with self._lock:
            self.reads = self.bytes = self.calls = 0
            self.time_s = 0.0

    def __getstate__(self) -> dict[str, Any]:
        return self.snapshot()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        _LIVE_COUNTERS.add(self)

    def __hash__(self) -> int:  # identity hash, so instances can live in a WeakSet
        return id(self)


class Source(ABC):
    """Random access to records by index.

    Subclasses implement :meth:`__len__`, :meth:`_read_one` and :meth:`describe`, and
    usually :meth:`_read_many` (the fast path), :meth:`_open`, :meth:`_close` and
    :meth:`hint`. Public :meth:`read` / :meth:`read_many` validate indices, open
    handles lazily (again after a fork), and update :attr:`counters`.

    Attributes:
        counters: Cumulative reads / bytes / seconds of this source.
        classes: Class names indexed by label, or ``None``.
    """

    classes: list[str] | None = None

    def __init__(self) -> None:
        self.counters = SourceCounters()
        self._pid: int | None = None
        self._open_lock = threading.Lock()
        _LIVE_SOURCES.add(self)

    # -- to implement -------------------------------------------------------------

    @abstractmethod
    def __len__(self) -> int:
        """Number of records."""

    @abstractmethod
    def _read_one(self, index: int) -> Record:
        """Read one record; ``index`` is already validated and handles are open."""

    def _read_many(self, indices: Sequence[int]) -> list[Record]:
        """Read several records; override with a batched fast path."""
        return [self._read_one(i) for i in indices]

    @abstractmethod
    def describe(self, index: int) -> str:
        """A human description of where ``index`` lives (path or key) for error messages."""

    def hint(self, indices: Iterable[int]) -> None:  # noqa: B027 - optional hook
        """Tell the source which indices will be read next (read-ahead). No-op by default."""

    def identity(self) -> tuple[Any, ...] | None:
        """What makes this source the same data in another process, or ``None``.

        A tuple of plain values (type name, paths, sizes, modification times, a format
        version) equal in every process that opens the same data and different once the
        data changes. ``MemoryCache(shared=True)`` keys its machine-wide copy on it; the
        default ``None`` means "not shareable".
        """
        return None

    def _open(self) -> None:  # noqa: B027 - optional hook
        """Open heavy handles in this process. Called lazily, once per PID."""

    def _close(self) -> None:  # noqa: B027 - optional hook
        """Release heavy handles."""

    def _after_fork_in_child(self) -> None:  # noqa: B027 - optional hook
        """Drop per-process state (thread pools, locks) inherited through ``fork``.

        Runs in the child right after ``fork``, while it has a single thread. Handles are
        re-opened lazily by :meth:`_open` on the next read (the PID changed).
        """

    # -- public API ---------------------------------------------------------------

    def read(self, index: int) -> Record:
        """Read the record at ``index``.

        Raises:
            SourceIndexError: ``index`` is outside ``0..len-1``.
            RecordReadError: The record exists in the index but cannot be read.
        """
        index = self._check_index(index)
        self._ensure_open()
        t0 = time.perf_counter()
        rec = self._read_one(index)
        self.counters.add(1, len(rec.data), time.perf_counter() - t0)
        return rec

    def read_many(self, indices: Sequence[int]) -> list[Record]:
        """Read several records in one call (one LMDB transaction, concurrent file reads)."""
        n = len(self)
        try:  # min/max run in C: the per-index Python loop only when something is off
            ok = len(indices) == 0 or (min(indices) >= 0 and max(indices) < n)
        except TypeError:
            ok = False
        if not ok:
            for i in indices:
                self._check_index(i)
        self._ensure_open()
        t0 = time.perf_counter()
        recs = self._read_many(indices)
        self.counters.add(len(recs), sum(map(len, map(_data_of, recs))), time.perf_counter() - t0)
        return recs

    def close(self) -> None:
        """Release handles; the source re-opens lazily if read again. Idempotent."""
        with self._open_lock:
            if self._pid is not None:
                self._close()
                self._pid = None

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers --------------------------------------------------------------------

    def _check_index(self, index: int) -> int:
        n = len(self)
        if isinstance(index, bool) or not isinstance(index, int):
            try:
                index = int(index)  # numpy / torch integers
            except (TypeError, ValueError):
                raise SourceIndexError(
                    f"index {index!r} is not an integer ({type(self).__name__} of {n} records)",
                    index=None,
                ) from None
        if not 0 <= index < n:
            raise SourceIndexError(
                f"index {index} out of range for {type(self).__name__} of {n} records",
                index=index,
            )
        return index

    def _ensure_open(self) -> None:
        pid = os.getpid()
        if self._pid == pid:
            return
        with self._open_lock:
            if self._pid != pid:
                # After a fork the parent's handles are unusable here: drop, then reopen.
                self._open()
                self._pid = pid

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pid"] = None
        del state["_open_lock"]
        for key in self._unpicklable():
            state[key] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open_lock = threading.Lock()
        _LIVE_SOURCES.add(self)

    def _unpicklable(self) -> tuple[str, ...]:
        """Attribute names holding handles that must not travel through pickle."""
        return ()


def source_chain(source: Any, limit: int = 8) -> list[Any]:
    """``source`` and the sources it wraps, outermost first.

    Wrappers (a :class:`~fastfeed.sources.MemoryCache`, a subset) keep the source they
    wrap in ``.source``; the walk stops there, or after ``limit`` levels (a cycle).
    """
    out: list[Any] = []
    node = source
    while node is not None and len(out) < limit:
        out.append(node)
        node = getattr(node, "source", None)
    return out
