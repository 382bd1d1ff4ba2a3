"""The consumer tap: the one place that times the training loop's wait and step.

Every batch reaches the training loop through a :class:`Tap`, whatever sits upstream (the
prefetcher, the device stager, a worker-process pool, torch's own iterator, or any
iterable given to :func:`fastfeed.watch`). For each hand-over it reports to the recorder:

- ``wait``: how long the loop was blocked inside ``next()`` for this batch;
- ``step``: the time since the previous hand-over (one training step), None for the first.

When no device stager sits between the workers and the loop, the tap is also who gives a
batch's ring slots back: when the loop comes back for the next batch it has moved past
the previous one (a batch it still holds is never rewritten: see
:mod:`fastfeed.pipeline.buffers`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from fastfeed.profiling import Recorder
from fastfeed.profiling.books import STEP_ROW

__all__ = ["Tap"]

_T = TypeVar("_T")


class Tap(Generic[_T]):
    """Yields what ``batches`` yields, timing each hand-over; releases the previous batch.

    Args:
        batches: The iterator that feeds the training loop.
        recorder: Receives one ``consumer_step(wait_s, step_s)`` per batch.
        release: Called with the previous batch when the loop asks for the next one (and
            on :meth:`close`); None when something upstream releases batches itself.
        on_close: Called once by :meth:`close` after the held batch is released (stops
            the stages upstream).
        started_s: ``time.perf_counter()`` when the loop started asking (e.g. before
            ``iter(loader)`` started worker processes): the first wait counts from then.
    """

    def __init__(
        self,
        batches: Iterator[_T],
        recorder: Recorder,
        *,
        release: Callable[[Any], None] | None = None,
        on_close: Callable[[], None] | None = None,
        started_s: float | None = None,
    ) -> None:
        self._batches = batches
        self._recorder = recorder
        self._release = release
        self._on_close = on_close
        self._held: Any = None
        self._last_handoff: float | None = None
        self._closed = False
        self._started_s = started_s
        # Where the recorder lets the next hand-overs be reported directly, and how many.
        self._sink: Callable[[bytes], object] | None = None
        self._direct = 0

    def __iter__(self) -> Tap[_T]:
        return self

    def __next__(self) -> _T:
        if self._held is not None:
            held, self._held = self._held, None
            self._release(held)  # type: ignore[misc]
        if self._closed:
            raise StopIteration
        rec = self._recorder
        if rec.measuring_step:  # one step in many: the loop's own clocks, before the wait
            rec.consumer_enter()
        t_enter = time.perf_counter()
        if self._started_s is not None:
            t_enter, self._started_s = self._started_s, None
        batch = next(self._batches)
        now = time.perf_counter()
        step = None if self._last_handoff is None else now - self._last_handoff
        self._last_handoff = now
        if self._direct > 0 and rec.enabled:
            # Most hand-overs: one list append, no call into the recorder (on tiny
            # records a call per batch cost ~1% of the loop).
            self._direct -= 1
            self._sink(STEP_ROW.pack(now, now - t_enter, -1.0 if step is None else step))  # type: ignore[misc]
        else:
            self._sink, self._direct = rec.consumer_report(now - t_enter, step, now)
        if self._release is not None:
            self._held = batch
        return batch

    def __len__(self) -> int:
        """``len()`` of the upstream iterator (torch's iterators have one)."""
        return len(self._batches)  # type: ignore[arg-type]

    def close(self) -> None:
        """Release the held batch and stop upstream. Idempotent."""
        if self._held is not None:
            held, self._held = self._held, None
            self._release(held)  # type: ignore[misc]
        if self._closed:
            return
        self._closed = True
        if self._on_close is not None:
            self._on_close()
