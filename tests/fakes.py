"""Shared test fakes: small in-memory sources with controllable behaviour."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from fastfeed.errors import RecordReadError
from fastfeed.sources.base import Record, Source


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


def call_counter() -> tuple[Callable[[], int], Callable[[], None]]:
    """A thread-safe counter: returns (get, increment)."""
    lock = threading.Lock()
    box = [0]

    def inc() -> None:
        with lock:
            box[0] += 1

    return (lambda: box[0]), inc


def run_in_threads(fn: Callable[[int], None], n: int, timeout_s: float = 60.0) -> None:
    """Run ``fn(0) .. fn(n-1)`` on ``n`` named threads at once; join them all.

    Fails (AssertionError) when a thread is still running after ``timeout_s``, shared
    by all threads.
    """
    threads = [threading.Thread(target=fn, args=(k,), name=f"fastfeed-test-{k}") for k in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"threads still running after {timeout_s} s: {alive}"
