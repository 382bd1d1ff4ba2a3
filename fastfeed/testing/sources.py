"""Sources for tests: in-memory lists, blocking reads and fault injection.

:class:`ListSource` holds records in a list (optional delay and failures);
:class:`BlockingSource` blocks chosen reads until released. :class:`FaultySource` wraps
any source: raise at chosen indices, stall (for a fixed time, or until
:meth:`FaultySource.release`, bounded), corrupt the bytes, or run a callback before a read
(e.g. delete the file mid-epoch). :func:`chaos_plan` draws a reproducible random fault plan.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fastfeed.errors import RecordReadError
from fastfeed.sources.base import Record, Source
from fastfeed.testing.ledger import LEDGER_RECORD_BYTES

__all__ = [
    "BlockingSource",
    "FaultySource",
    "InjectedError",
    "ListSource",
    "chaos_plan",
    "corrupt_bytes",
    "ledger_source",
]


class ListSource(Source):
    """Records held in a Python list; optional per-read delay and failures.

    Args:
        payloads: Record bytes, one per index.
        labels: Optional labels, one per index.
        delay_s: Sleep this long per record read (simulates slow storage), seconds.
        fail_at: Indices whose read raises :class:`RecordReadError`.
    """

    def __init__(
        self,
        payloads: Sequence[bytes],
        labels: Sequence[int] | None = None,
        *,
        delay_s: float = 0.0,
        fail_at: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.payloads = list(payloads)
        self.labels = list(labels) if labels is not None else None
        self.delay_s = delay_s
        self.fail_at = set(fail_at)

    def __len__(self) -> int:
        return len(self.payloads)

    def describe(self, index: int) -> str:
        return f"list[{index}]"

    def _read_one(self, index: int) -> Record:
        if self.delay_s:
            time.sleep(self.delay_s)
        if index in self.fail_at:
            raise RecordReadError(f"injected failure reading {self.describe(index)}", index=index)
        label = self.labels[index] if self.labels is not None else None
        return Record(self.payloads[index], label)


def ledger_source(n: int, **kwargs) -> ListSource:
    """A source whose record ``i`` is ``i`` as 8 little-endian bytes, with label ``i % 10``."""
    payloads = [i.to_bytes(8, "little") for i in range(n)]
    return ListSource(payloads, [i % 10 for i in range(n)], **kwargs)


class BlockingSource(ListSource):
    """Blocks inside reads of ``block_at`` until :meth:`release` (or its stop timeout)."""

    def __init__(self, n: int, block_at: Sequence[int], max_block_s: float = 30.0) -> None:
        super().__init__([i.to_bytes(8, "little") for i in range(n)], [0] * n)
        self.block_at = set(block_at)
        self.max_block_s = max_block_s
        self._released = threading.Event()

    def release(self) -> None:
        self._released.set()

    def _read_one(self, index: int) -> Record:
        if index in self.block_at:
            self._released.wait(self.max_block_s)
        return super()._read_one(index)


class InjectedError(RuntimeError):
    """The exception :class:`FaultySource` raises at its ``raise_at`` indices."""


def corrupt_bytes(data: Any) -> bytes:
    """Flip every bit of the first 16 bytes: breaks ledger hashes and image headers alike."""
    raw = bytes(data)
    head = bytes(b ^ 0xFF for b in raw[:LEDGER_RECORD_BYTES])
    return head + raw[LEDGER_RECORD_BYTES:]


class FaultySource(Source):
    """Wraps a source and injects faults at chosen indices.

    Args:
        inner: The source to wrap (``describe``, ``len``, ``hint`` pass through).
        raise_at: Reads of these indices raise :class:`InjectedError` (every time).
        stall_at: Reads of these indices block: for ``stall_s`` seconds, or, when
            ``stall_s`` is None, until :meth:`release` (at most ``max_stall_s``).
        corrupt_at: These records come back passed through ``corruptor``.
        on_read: ``{index: callback}``; each callback runs once, before the first read of
            its index (e.g. delete another record's file).
        stall_s: Length of a stall, seconds; None stalls until released.
        max_stall_s: Upper bound of an unreleased stall, so no test hangs forever.
        corruptor: Turns record bytes into corrupt bytes (default :func:`corrupt_bytes`).

    Attributes:
        fired: ``{"raise" | "stall" | "corrupt": set of indices}`` that actually happened.
        stalled: Set once a read is blocked in a stall (tests wait on it).
    """

    def __init__(
        self,
        inner: Source,
        *,
        raise_at: Iterable[int] = (),
        stall_at: Iterable[int] = (),
        corrupt_at: Iterable[int] = (),
        on_read: Mapping[int, Callable[[], None]] | None = None,
        stall_s: float | None = None,
        max_stall_s: float = 30.0,
        corruptor: Callable[[Any], bytes] = corrupt_bytes,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.classes = inner.classes
        self.raise_at = frozenset(raise_at)
        self.stall_at = frozenset(stall_at)
        self.corrupt_at = frozenset(corrupt_at)
        self._on_read = dict(on_read or {})
        self.stall_s = stall_s
        self.max_stall_s = max_stall_s
        self.corruptor = corruptor
        self.fired: dict[str, set[int]] = {"raise": set(), "stall": set(), "corrupt": set()}
        self.stalled = threading.Event()
        self._released = threading.Event()
        self._lock = threading.Lock()

    def release(self) -> None:
        """End every current and future unbounded stall."""
        self._released.set()

    def __len__(self) -> int:
        return len(self.inner)

    def describe(self, index: int) -> str:
        return self.inner.describe(index)

    def hint(self, indices: Iterable[int]) -> None:
        self.inner.hint(indices)

    def _note(self, kind: str, index: int) -> None:
        with self._lock:
            self.fired[kind].add(index)

    def _before(self, index: int) -> None:
        callback = None
        if self._on_read:
            with self._lock:
                callback = self._on_read.pop(index, None)
        if callback is not None:
            callback()
        if index in self.stall_at:
            self._note("stall", index)
            self.stalled.set()
            if self.stall_s is None:
                self._released.wait(self.max_stall_s)
            else:
                time.sleep(self.stall_s)
        if index in self.raise_at:
            self._note("raise", index)
            raise InjectedError(f"injected fault reading {self.describe(index)}")

    def _after(self, index: int, rec: Record) -> Record:
        if index in self.corrupt_at:
            self._note("corrupt", index)
            return Record(self.corruptor(rec.data), rec.label)
        return rec

    def _read_one(self, index: int) -> Record:
        self._before(index)
        return self._after(index, self.inner.read(index))

    def _read_many(self, indices: Sequence[int]) -> list[Record]:
        for i in indices:
            self._before(i)
        recs = self.inner.read_many(indices)
        return [self._after(i, r) for i, r in zip(indices, recs, strict=True)]

    def close(self) -> None:
        """Release stalls and close the wrapped source too."""
        self.release()
        super().close()
        self.inner.close()


def chaos_plan(
    n: int, rate: float, seed: int = 0, kinds: Sequence[str] = ("raise", "stall", "corrupt")
) -> dict[str, set[int]]:
    """A reproducible random fault plan: about ``rate * n`` indices, split among ``kinds``.

    Returns:
        ``{kind: indices}``; an index gets at most one fault.
    """
    rng = np.random.default_rng(seed)
    hit = np.flatnonzero(rng.random(n) < rate)
    kind_of = rng.integers(0, len(kinds), size=hit.size)
    plan: dict[str, set[int]] = {k: set() for k in kinds}
    for i, k in zip(hit.tolist(), kind_of.tolist(), strict=True):
        plan[kinds[k]].add(i)
    return plan
