"""Per-thread books: what one thread recorded lately, written without a lock.

The hooks run on every batch of every worker, so their common path must cost well
under a microsecond: a span or a queue operation appends a handful of numbers to its
thread's :class:`Book` (flat arrays: no object kept per span, no lock, no thread-name
lookup) and nothing else. Every :data:`CHUNK` records, and whenever something reads the
recorder, the books are folded into the shared figures and rings under the recorder's
lock, vectorized (numpy ``bincount`` and slice copies), about 0.1 us a record.

Only the owning thread appends to its book (or the consumer tap, to the hand-over
array of the thread it runs on); a fold copies the numbers from ``base`` to the end and
advances ``base``, so a reader folding another thread's book while that thread appends
never counts a record twice or loses one. Only the owner empties a full book, under the
lock; :meth:`BookKeeper._clear_books` (a reset) empties every book in place.
"""

from __future__ import annotations

import struct
import threading
from array import array
from typing import Any

import numpy as np

from fastfeed.profiling import gil
from fastfeed.profiling.clocks import (
    SCHED_SAMPLE_EVERY,
    Mark,
    _run_delay_s,
)
from fastfeed.profiling.figures import QueueStats, StageStats
from fastfeed.profiling.rings import TraceEvent, _CounterRing, _EventRing, _Reservoir, _StepRing
from fastfeed.profiling.stages import Stage

__all__ = ["CHUNK", "Book", "BookKeeper", "ConsumerFigures"]

#: Records a book holds before its thread folds it (~80 KB a thread at most): a fold
#: costs ~30 us plus ~0.1 us a record.
CHUNK = 512
#: A span row, a queue row, a hand-over row as the bytes a book's array takes:
#: ``array.frombytes(pack(...))`` costs 0.11 us, ``array.extend(tuple)`` 0.29 us.
SPAN_ROW, QUEUE_ROW, STEP_ROW = struct.Struct("6d"), struct.Struct("5d"), struct.Struct("3d")
#: Numbers of span rows (6 a span) and of chains (~14 a batch) before a fold.
ROWS_FULL = 6 * CHUNK
CHAINS_FULL = 14 * CHUNK
#: The stages' codes in every recorder (custom stage names get the next ones), as the
#: floats a chain record holds (``Recorder.chain``).
STAGE_CODE: dict[Stage, float] = {s: float(i) for i, s in enumerate(Stage)}
#: How often a recording thread tells the GIL probe it still records, seconds.
_TOUCH_S = 0.1
_NO_ITEMS = -1  # an event without args (the consumer's waits, kept apart in ``srows``)


class Book:
    """One thread's records for one recorder since they were last folded.

    Each record is a few numbers appended to a flat ``array("d")`` (``frombytes`` of a
    packed struct, ~0.1 us), fixed width per kind:

    - ``rows``: a span, ``(stage_code, start_s, end_s, items, nbytes, failed)``;
    - ``qrows``: a queue operation, ``(queue_code, time_s, depth, put_wait_s, get_wait_s)``;
    - ``srows``: a hand-over to the training loop, ``(time_s, wait_s, step_s or -1)``;
    - ``crows``: a chain of spans (``Recorder.chain``), ``(k, start, code, end, items,
      nbytes, ...)`` with ``k`` spans, each starting where the previous one ended
      (``fromlist``: the chain's length varies).

    Numbers in arrays, not tuples in lists: a kept tuple is an object the garbage
    collector tracks until its next pass, and 512 of them a thread set off collections
    that promoted the loop's live objects, then full collections (75 ms each with torch
    imported: 30% of a 50,000-record epoch of 3 KB records).

    Attributes:
        thread: The owning thread (its book is dropped once it finished and was folded).
        name: The thread's name, read once.
        base / qbase / sbase / cbase: Numbers of each array already folded.
        chains: Mark chains started since the last measured one (``SCHED_SAMPLE_EVERY``).
        sampled_s: When the last measured chain started (``perf_counter``, seconds).
        spans: Per stage, ``[spans since the last measured one, when it started]``
            (the same sampling as chains, per stage).
        touched_s: When this thread last told the GIL probe it records (``perf_counter``).
    """

    __slots__ = (
        "base",
        "cbase",
        "chains",
        "crows",
        "name",
        "qbase",
        "qrows",
        "rows",
        "sampled_s",
        "sbase",
        "spans",
        "srows",
        "thread",
        "touched_s",
    )

    def __init__(self, thread: threading.Thread, first_sample: int) -> None:
        self.thread = thread
        self.name = thread.name
        self.rows = array("d")
        self.qrows = array("d")
        self.srows = array("d")
        self.crows = array("d")
        self.base = self.qbase = self.sbase = self.cbase = 0
        self.chains = first_sample  # so the first chain is measured
        self.sampled_s = -1e9
        self.spans: dict[Any, list[float]] = {}
        self.touched_s = -1e9

    def clear(self) -> None:
        """Forget every record, in place (whoever holds ``crows.fromlist`` keeps it)."""
        del self.rows[:]
        del self.qrows[:]
        del self.srows[:]
        del self.crows[:]
        self.base = self.qbase = self.sbase = self.cbase = 0

    def full(self) -> bool:
        return (
            len(self.rows) >= ROWS_FULL
            or len(self.qrows) >= 5 * CHUNK
            or len(self.srows) >= 3 * CHUNK
            or len(self.crows) >= CHAINS_FULL
        )


class ConsumerFigures:
    """The training loop's hand-overs, folded from the books (see :class:`Recorder`)."""

    def __init__(self) -> None:
        self.steps = 0
        self.wait_s = 0.0
        self.step_wait_s = 0.0
        self.step_s = 0.0
        self.first_batches = 0
        self.step_waits = _Reservoir()
        self.step_times = _Reservoir()
        self.step_log = _StepRing(_STEP_LOG)


_STEP_LOG = 20_000  # per-step (end, wait, step) kept for plots, count


class BookKeeper:
    """The recorder's shared figures and rings, and the per-thread books that feed them.

    Args:
        max_events: Timeline events (and, apart, queue-depth samples) kept.
    """

    def __init__(self, max_events: int) -> None:
        self._lock = threading.Lock()
        self._stages: dict[Any, StageStats] = {}
        self._queues: dict[Any, QueueStats] = {}
        self._consumer = ConsumerFigures()
        self._events = _EventRing(max_events)
        self._counters = _CounterRing(max_events)
        self._local = threading.local()
        self._books: list[Book] = []
        # Names travel in the books as small codes, fixed for the recorder's life.
        self._stage_code: dict[Any, int] = {s: int(c) for s, c in STAGE_CODE.items()}
        self._stage_names: list[Any] = list(STAGE_CODE)
        self._queue_code: dict[Any, int] = {}
        self._queue_names: list[Any] = []
        self._queue_capacity: list[int] = []

    def add(
        self,
        stage: Any,
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
        """Record one span measured by the caller (the recorder's)."""
        raise NotImplementedError

    def _clear_books(self) -> None:
        """Forget every figure and record (caller holds the lock).

        Books are emptied in place, not replaced: a thread (or the consumer tap) keeps
        appending to the lists it holds. A record appended while this runs lands
        before or after the reset, either is right.
        """
        for book in self._books:
            book.clear()
        self._stages.clear()
        self._queues.clear()
        self._consumer = ConsumerFigures()
        self._events.clear()
        self._counters.clear()

    def _book(self) -> Book:
        """This thread's book, opened on its first record (or after a reset)."""
        try:
            return self._local.book  # type: ignore[no-any-return]
        except AttributeError:
            return self._open_book()

    def _open_book(self) -> Book:
        with self._lock:
            self._sync()  # also drops the books of finished threads
            book = Book(threading.current_thread(), SCHED_SAMPLE_EVERY - 1)
            self._books.append(book)
            self._local.book = book
        return book

    def _sync(self) -> None:
        """Fold every book; forget those of finished threads (caller holds the lock)."""
        keep = []
        for book in self._books:
            self._fold(book)
            if book.thread.is_alive():
                keep.append(book)
        self._books = keep

    def _after_put(self, book: Book, now_s: float, stage: Any) -> None:
        """A record found its book full or the probe due for a touch."""
        if now_s - book.touched_s > _TOUCH_S:
            self._touch(book, now_s, stage)
        if book.full():
            with self._lock:  # the owner folds its full book and starts it over
                self._fold(book)
                book.clear()

    def _register(self, table: dict[Any, int], names: list[Any], name: Any) -> int:
        with self._lock:
            code = table.get(name)
            if code is None:
                code = table[name] = len(names)
                names.append(name)
                if names is self._queue_names:
                    self._queue_capacity.append(0)
            return code

    def _touch(self, book: Book, now_s: float, stage: Any) -> None:
        """Keep the GIL probe running while this thread records (every ``_TOUCH_S``).

        The training loop's waits keep a running probe alive but start none: a loop
        watched by :func:`fastfeed.watch` alone runs no probe (see :mod:`.gil`).
        """
        book.touched_s = now_s
        if stage is not Stage.WAIT and not gil.running():  # None: a chain of stages
            gil.ensure_running(_run_delay_s)
        gil.touch(now_s)

    def _put(
        self, stage: Any, start_s: float, end_s: float, items: int, nbytes: int, failed: bool
    ) -> None:
        """The common path of every span: one tuple into this thread's book."""
        try:
            book: Book = self._local.book
        except AttributeError:
            book = self._open_book()
        code = self._stage_code.get(stage)
        if code is None:
            code = self._register(self._stage_code, self._stage_names, stage)
        rows = book.rows
        rows.frombytes(SPAN_ROW.pack(code, start_s, end_s, items, nbytes, failed))
        if len(rows) >= ROWS_FULL or end_s - book.touched_s > _TOUCH_S:
            self._after_put(book, end_s, stage)

    def _put_via_add(
        self, stage: Any, start_s: float, end_s: float, items: int, nbytes: int, failed: bool
    ) -> None:
        self.add(stage, start_s, end_s, None, items=items, nbytes=nbytes, failed=failed)

    def _sorted_events(self) -> list[TraceEvent]:
        # Books hand over their events a chunk at a time: order by start for readers.
        return sorted(self._events.events(), key=lambda e: e[2])

    # -- folding (the caller holds the lock) -------------------------------------------

    def _fold(self, book: Book) -> None:
        """Add the book's unfolded records to the figures and rings.

        Copies (C slices) before viewing with numpy: a view would stop the owner's
        appends ("cannot resize an array that is exporting buffers").
        """
        hi = len(book.rows)
        if hi > book.base:
            rows, book.base = book.rows[book.base : hi], hi
            self._fold_spans(book.name, np.frombuffer(rows).reshape(-1, 6))
        hi = len(book.crows)
        if hi > book.cbase:
            chains, book.cbase = book.crows[book.cbase : hi], hi
            self._fold_spans(book.name, self._unchain(chains.tolist()))
        hi = len(book.qrows)
        if hi > book.qbase:
            qrows, book.qbase = book.qrows[book.qbase : hi], hi
            self._fold_queues(np.frombuffer(qrows).reshape(-1, 5))
        hi = len(book.srows)
        if hi > book.sbase:
            srows, book.sbase = book.srows[book.sbase : hi], hi
            self._fold_steps(book.name, np.frombuffer(srows).reshape(-1, 3))

    def _unchain(self, flat: list[float]) -> np.ndarray:
        """Span rows ``(m, 6)`` of chain records ``(k, start, code, end, items, nbytes, ...)``."""
        k = int(flat[0]) if flat else 0
        width = 2 + 4 * k
        if k and len(flat) % width == 0:
            a = np.array(flat, dtype=np.float64).reshape(-1, width)
            if (a[:, 0] == k).all():  # one loader's chains: all as long, vectorized
                spans = a[:, 2:].reshape(len(a), k, 4)  # code, end, items, nbytes
                rows = np.zeros((len(a), k, 6))
                rows[:, :, 0] = spans[:, :, 0]
                rows[:, 0, 1] = a[:, 1]
                rows[:, 1:, 1] = spans[:, :-1, 1]  # each starts where the previous ended
                rows[:, :, 2:5] = spans[:, :, 1:4]
                return rows.reshape(-1, 6)
        out: list[float] = []
        i, n = 0, len(flat)
        while i < n:
            k, prev = int(flat[i]), flat[i + 1]
            j = i + 2
            for _ in range(k):
                code, end, items, nbytes = flat[j : j + 4]
                out += (code, prev, end, items, nbytes, 0.0)
                prev = end
                j += 4
            i = j
        return np.frombuffer(array("d", out)).reshape(-1, 6)

    def _measured(self, stage: Any, since: Mark, now: Mark) -> None:
        """Add a measured span's CPU time, run-queue wait and switches (lock held)."""
        st = self._stages.get(stage)
        if st is None:
            st = self._stages[stage] = StageStats()
        wall = now[0] - since[0]
        st.cpu_s += now[1] - since[1]
        st.cpu_busy_s += wall
        st.cpu_spans += 1
        if since[2] >= 0 and now[2] >= 0:
            st.runq_s += now[2] - since[2]
            st.runq_busy_s += wall
            st.runq_spans += 1
        if since[3] >= 0 and now[3] >= 0:
            st.switches += now[3] - since[3]
            st.switches_busy_s += wall
            st.switches_spans += 1

    def _fold_spans(self, thread: str, a: np.ndarray) -> None:
        """Fold span rows ``(m, 6)``: events into the ring, figures per stage."""
        if len(a) == 0:
            return
        c = a[:, 0].astype(np.int64)
        starts, ends = np.ascontiguousarray(a[:, 1]), np.ascontiguousarray(a[:, 2])
        items, nbytes = a[:, 3].astype(np.int64), a[:, 4].astype(np.int64)
        failed = a[:, 5].astype(np.uint8)
        names = self._stage_names
        self._events.extend(
            list(map(names.__getitem__, c.tolist())),
            thread,
            array("d", starts.tobytes()),
            array("d", ends.tobytes()),
            array("q", items.tobytes()),
            array("q", nbytes.tobytes()),
            array("B", failed.tobytes()),
        )
        k = len(names)
        d = ends - starts
        count = np.bincount(c, minlength=k).tolist()
        busy = np.bincount(c, d, k).tolist()
        n_items = np.bincount(c, a[:, 3], k).tolist()
        n_bytes = np.bincount(c, a[:, 4], k).tolist()
        n_failed = np.bincount(c, a[:, 5], k).tolist()
        for code, n in enumerate(count):
            if n == 0:
                continue
            st = self._stages.get(names[code])
            if st is None:
                st = self._stages[names[code]] = StageStats()
            st.count += n
            st.items += round(n_items[code])
            st.failures += round(n_failed[code])
            st.busy_s += busy[code]
            st.bytes += round(n_bytes[code])
            st.durations.add_many(d if n == len(a) else d[c == code])

    def _fold_queues(self, a: np.ndarray) -> None:
        c = a[:, 0].astype(np.int64)
        names = self._queue_names
        depths = np.ascontiguousarray(a[:, 2])
        self._counters.extend(
            list(map(names.__getitem__, c.tolist())),
            array("d", np.ascontiguousarray(a[:, 1]).tobytes()),
            array("d", depths.tobytes()),
        )
        k = len(names)
        count = np.bincount(c, minlength=k).tolist()
        depth = np.bincount(c, depths, k).tolist()
        put = np.bincount(c, a[:, 3], k).tolist()
        get = np.bincount(c, a[:, 4], k).tolist()
        for code, n in enumerate(count):
            if n == 0:
                continue
            q = self._queues.get(names[code])
            if q is None:
                q = self._queues[names[code]] = QueueStats(capacity=self._queue_capacity[code])
            q.depth_samples += n
            q.depth_sum += round(depth[code])
            q.put_wait_s += put[code]
            q.get_wait_s += get[code]

    def _fold_steps(self, thread: str, a: np.ndarray) -> None:
        now, wait, step = a[:, 0], a[:, 1], a[:, 2]
        c = self._consumer
        steady = step >= 0
        c.wait_s += float(wait.sum())
        c.step_waits.add_many(wait)
        c.first_batches += int(np.count_nonzero(~steady))
        n_steady = int(np.count_nonzero(steady))
        if n_steady:
            every = n_steady == len(a)
            c.steps += n_steady
            c.step_s += float(step.sum() if every else step[steady].sum())
            c.step_wait_s += float(wait.sum() if every else wait[steady].sum())
            c.step_times.add_many(step if every else step[steady])
            c.step_log.extend(a if every else a[steady])
        waited = wait > 0  # the waits on the timeline, as ``wait`` events without args
        m = int(np.count_nonzero(waited))
        if m:
            self._events.extend(
                [Stage.WAIT] * m,
                thread,
                array("d", (now[waited] - wait[waited]).tobytes()),
                array("d", now[waited].tobytes()),
                array("q", [_NO_ITEMS]) * m,
                array("q", bytes(8 * m)),
                array("B", bytes(m)),
            )
