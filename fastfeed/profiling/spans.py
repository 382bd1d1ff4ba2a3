"""The stage hooks of a :class:`~fastfeed.profiling.Recorder`: spans, mark chains, chains.

Three ways to time a stage, cheapest last (costs on a 2-core VM, warm caches; each call
into Python code costs about a microsecond more when the batch's own work has pushed the
hooks out of the CPU caches, as it does on every batch of tiny records):

- :meth:`StageHooks.span`: a ``with`` block (~1 us);
- :meth:`StageHooks.mark` / :meth:`StageHooks.add_since`: back-to-back stages, one call
  per boundary (~0.4 us a stage);
- :meth:`StageHooks.chain`: back-to-back stages with one call per batch and C functions
  at the boundaries (~0.6 us for read, transform and collate together).

Every span lands in the calling thread's book (:mod:`.books`) without a lock. One span
or chain in ``SCHED_SAMPLE_EVERY`` per thread, at most one every ``SCHED_SAMPLE_GAP_S``
(:mod:`.clocks`, read at each call), also reads the thread CPU time, run-queue wait and
context switches (~2 us a reading) and the figures are scaled to every span
(:class:`~fastfeed.profiling.StageStats`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any, TypeAlias

from fastfeed.profiling import clocks
from fastfeed.profiling.books import (
    _TOUCH_S,
    CHAINS_FULL,
    ROWS_FULL,
    SPAN_ROW,
    STAGE_CODE,
    Book,
    BookKeeper,
)
from fastfeed.profiling.clocks import (
    _NO_MARK,
    _NOT_SAMPLED,
    Mark,
    _mark,
    _torch_profiler_active,
    _torch_range,
)
from fastfeed.profiling.figures import StageStats

__all__ = ["STAGE_CODE", "ChainRecord", "ChainSpan", "ChainTime", "StageHooks", "chain_seconds"]

_new = object.__new__

#: What a :meth:`Recorder.chain` clock reads: ``perf_counter`` seconds, or a full mark.
ChainTime: TypeAlias = float | Mark
#: ``(stage_code, end, items, nbytes)``: one span of a chain (:meth:`Recorder.chain`);
#: the code is :data:`.STAGE_CODE`'s.
ChainSpan: TypeAlias = tuple[float, ChainTime, int, int]
#: ``(k, start, code, end, items, nbytes, ...)``: one chain of ``k`` spans, flat, each
#: starting where the previous one ended (numbers only: see :class:`.Book`).
ChainRecord: TypeAlias = list[Any]


class StageHooks(BookKeeper):
    """Span hooks over the per-thread books (the :class:`Recorder` is one).

    Attributes:
        enabled: When False every hook returns at once.
    """

    enabled: bool
    _direct: bool  # False: a subclass that keeps spans its own way (through add())

    def span(
        self, stage: str, items: int = 1, nbytes: int = 0
    ) -> contextlib.AbstractContextManager[None]:
        """Time the enclosed block as one span of ``stage`` (wall and thread CPU time).

        Like a :meth:`mark` chain, one span in :data:`.SCHED_SAMPLE_EVERY` per thread and
        stage (the first included) also reads the thread CPU time, run-queue wait and
        context switches (~7 us); the others read only the wall clock, and the figures
        are scaled to every span.

        Args:
            stage: A :class:`~fastfeed.profiling.stages.Stage` or any name.
            items: Samples in the span (spans are per batch, not per sample).
            nbytes: Bytes the span handled (for MB/s).
        """
        if not self.enabled:
            return _NULL_SPAN
        span = _new(_Span)  # no __init__ call: the fields are set here
        span._rec = self
        span._stage = stage
        span._items = items
        span._nbytes = nbytes
        span._range = None
        return span

    def add(
        self,
        stage: str,
        start_s: float,
        end_s: float,
        cpu_s: float | None,
        *,
        items: int = 1,
        nbytes: int = 0,
        failed: bool = False,
        runq_s: float | None = None,
        switches: int | None = None,
    ) -> None:
        """Record one span measured by the caller (``perf_counter`` times, seconds).

        Args:
            stage: Stage name.
            start_s: ``time.perf_counter()`` at the start, seconds.
            end_s: ``time.perf_counter()`` at the end, seconds.
            cpu_s: Thread CPU time spent, seconds; None when not measured.
            items: Samples in the span.
            nbytes: Bytes handled.
            failed: The span raised.
            runq_s: Run-queue wait during the span (see :class:`StageStats`), seconds;
                None when not measured.
            switches: Voluntary context switches during the span; None when not measured.
        """
        if not self.enabled:
            return
        if cpu_s is not None or runq_s is not None or switches is not None:
            wall = end_s - start_s
            with self._lock:  # measured spans are the sampled few: a lock is cheap there
                st = self._stages.get(stage)
                if st is None:
                    st = self._stages[stage] = StageStats()
                if cpu_s is not None:
                    st.cpu_s += cpu_s
                    st.cpu_busy_s += wall
                    st.cpu_spans += 1
                if runq_s is not None:
                    st.runq_s += runq_s
                    st.runq_busy_s += wall
                    st.runq_spans += 1
                if switches is not None:
                    st.switches += switches
                    st.switches_busy_s += wall
                    st.switches_spans += 1
        BookKeeper._put(self, stage, start_s, end_s, items, nbytes, failed)

    def mark(self) -> Mark:
        """This thread's clocks now, for :meth:`add_since` (free when disabled).

        Starts a chain of marks: one chain in :data:`.SCHED_SAMPLE_EVERY` per thread
        reads the thread CPU time, run-queue wait and context switches (~7 us on a
        busy VM), the others only the wall clock (~0.1 us); :meth:`add_since`
        continues in the same mode and the figures are scaled to every span.
        """
        if not self.enabled:
            return _NO_MARK
        book = self._book()
        now_s = time.perf_counter()
        n = book.chains + 1
        if n < clocks.SCHED_SAMPLE_EVERY or now_s - book.sampled_s < clocks.SCHED_SAMPLE_GAP_S:
            book.chains = n
            return (now_s, -1.0, _NOT_SAMPLED, _NOT_SAMPLED)
        book.chains = 0
        book.sampled_s = now_s
        return _mark()

    def add_since(
        self,
        stage: str,
        since: Mark,
        *,
        items: int = 1,
        nbytes: int = 0,
        failed: bool = False,
        now: Mark | None = None,
    ) -> Mark:
        """Record a span of ``stage`` from ``since`` to now on this thread; return now's mark.

        For back-to-back stages (read, then transform, then collate) without nesting
        ``with`` blocks: ``m = rec.mark(); ...; m = rec.add_since("read", m, items=n)``.
        Measures the same as :meth:`span` (wall, CPU, run-queue wait, blocking switches),
        the last two on the sampled chains only (see :meth:`mark`). ``now``: a mark
        taken already (by a :meth:`chain_clock`) instead of reading the clocks again.
        """
        if not self.enabled:
            return _NO_MARK
        if since[2] == _NOT_SAMPLED and now is None:  # the common path: wall clock only
            now_s = time.perf_counter()
            self._put(stage, since[0], now_s, items, nbytes, failed)
            return (now_s, -1.0, _NOT_SAMPLED, _NOT_SAMPLED)
        if now is None:
            now = _mark()
        if since is not _NO_MARK:
            self.add(
                stage,
                since[0],
                now[0],
                now[1] - since[1],
                items=items,
                nbytes=nbytes,
                failed=failed,
                runq_s=now[2] - since[2] if since[2] >= 0 and now[2] >= 0 else None,
                switches=now[3] - since[3] if since[3] >= 0 and now[3] >= 0 else None,
            )
        return now

    def chain(self) -> tuple[Callable[[], ChainTime], Callable[[ChainRecord], object]]:
        """``(clock, record)`` for timing back-to-back stages on this thread in one go.

        The cheapest way to time a batch's read, transform and collate: one call into
        the recorder per batch, ``time.perf_counter`` at each boundary and a list append
        at the end (both C functions)::

            clock, record = rec.chain()
            start = clock()
            ...; read = (STAGE_CODE[Stage.READ], clock(), n, nbytes)
            ...; transform = (STAGE_CODE[Stage.TRANSFORM], clock(), n, 0)
            record([2, start, *read, *transform])  # each starts where the previous ended

        Each span is ``(stage_code, end, items, nbytes)`` (a :data:`ChainSpan`), the
        record flat numbers (a :data:`ChainRecord`). One chain in
        :data:`.SCHED_SAMPLE_EVERY` (at most one every :data:`.SCHED_SAMPLE_GAP_S`)
        gets a clock that also reads the thread CPU time, run-queue wait and switches,
        as :meth:`mark` chains do.
        """
        if not self.enabled:
            return time.perf_counter, id  # id: a C-level no-op for one argument
        try:
            book: Book = self._local.book
        except AttributeError:
            book = self._open_book()
        now_s = time.perf_counter()
        if len(book.crows) >= CHAINS_FULL or now_s - book.touched_s > _TOUCH_S:
            self._after_put(book, now_s, None)
        n = book.chains + 1
        clock: Callable[[], ChainTime] = time.perf_counter
        if n < clocks.SCHED_SAMPLE_EVERY or now_s - book.sampled_s < clocks.SCHED_SAMPLE_GAP_S:
            book.chains = n
        else:
            book.chains = 0
            book.sampled_s = now_s
            clock = _mark
        if self._direct and clock is time.perf_counter:
            return clock, book.crows.fromlist  # type: ignore[return-value]  # floats here
        return clock, self._chain_via_add

    def _chain_via_add(self, chain: ChainRecord) -> None:
        """A measured chain (its times are full marks), or any chain of a recorder that
        keeps spans its own way: span by span."""
        names, prev = self._stage_names, chain[1]
        for i in range(2, 2 + 4 * int(chain[0]), 4):
            code, end, items, nbytes = chain[i : i + 4]
            stage = names[int(code)]
            if isinstance(prev, tuple) and isinstance(end, tuple):
                self.add_since(stage, prev, items=items, nbytes=nbytes, now=end)
            else:
                self._put(stage, chain_seconds(prev), chain_seconds(end), items, nbytes, False)
            prev = end

    # -- queues -----------------------------------------------------------------------


def chain_seconds(t: ChainTime) -> float:
    """A chain clock's reading (``perf_counter`` seconds, or a full mark) in seconds."""
    return t if isinstance(t, float) else t[0]


class _Span:
    """One :meth:`Recorder.span`: three calls in all (``span``, enter, exit), the common
    path inlined (a generator context manager cost ~2 us; the DataLoader's fetch opens
    two spans a batch)."""

    __slots__ = ("_book", "_items", "_nbytes", "_range", "_rec", "_stage", "_start")

    _book: Book
    _items: int
    _nbytes: int
    _range: contextlib.AbstractContextManager[None] | None
    _rec: StageHooks
    _stage: Any
    _start: Any  # perf_counter seconds, or a full mark on measured spans

    def __enter__(self) -> None:
        rec, stage = self._rec, self._stage
        if _torch_profiler_active():
            self._range = _torch_range(stage)
            self._range.__enter__()
        try:
            book: Book = rec._local.book
        except AttributeError:
            book = rec._open_book()
        self._book = book
        now_s = time.perf_counter()
        seen = book.spans.get(stage)
        if seen is None:
            seen = book.spans[stage] = [clocks.SCHED_SAMPLE_EVERY - 1, -1e9]
        seen[0] += 1
        if seen[0] < clocks.SCHED_SAMPLE_EVERY or now_s - seen[1] < clocks.SCHED_SAMPLE_GAP_S:
            self._start = now_s
        else:
            seen[0], seen[1] = 0, now_s
            self._start = _mark()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            rec, start = self._rec, self._start
            if not rec.enabled:  # switched off inside the span: dropped
                pass
            elif type(start) is float and rec._direct:
                now_s = time.perf_counter()
                code = rec._stage_code.get(self._stage)
                if code is None:
                    code = rec._register(rec._stage_code, rec._stage_names, self._stage)
                book = self._book
                rows = book.rows
                failed = exc_type is not None
                rows.frombytes(SPAN_ROW.pack(code, start, now_s, self._items, self._nbytes, failed))
                if len(rows) >= ROWS_FULL or now_s - book.touched_s > _TOUCH_S:
                    rec._after_put(book, now_s, self._stage)
            else:
                if type(start) is float:
                    start = (start, -1.0, _NOT_SAMPLED, _NOT_SAMPLED)
                rec.add_since(
                    self._stage,
                    start,
                    items=self._items,
                    nbytes=self._nbytes,
                    failed=exc_type is not None,
                )
        finally:
            if self._range is not None:
                self._range.__exit__(exc_type, exc, tb)


class _NullSpan:
    """What :meth:`Recorder.span` returns while recording is off: nothing at all."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NULL_SPAN = _NullSpan()
