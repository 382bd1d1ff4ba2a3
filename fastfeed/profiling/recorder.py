"""In-training hooks: every pipeline stage reports to a :class:`Recorder`.

The recorder owns no stage. Stages report spans (:mod:`.spans`: per batch, not per
sample), queues report put-wait vs get-wait (which side is slow), and the consumer tap
reports how long each step waited for its batch. Everything is kept as cumulative
counters plus bounded reservoirs (for percentiles) and a bounded ring of timeline events
(for Chrome traces, about 49 bytes an event, ~1 MiB for the default 20,000), so memory
stays flat however long training runs.

Always on, so it must cost nearly nothing (goal: < 2% on 3 KB records, a batch of 256
in ~300 us): each record is a few numbers appended to its thread's book without a lock
(:mod:`.books`), folded into the figures 512 records at a time; the Loader makes one
call into the recorder per batch (:meth:`Recorder.chain`) and the consumer tap most
hand-overs without any (:meth:`Recorder.consumer_report`). The thread CPU time,
run-queue wait (``/proc/thread-self/schedstat``) and voluntary context switches
(``getrusage``) are read on one chain in :data:`SCHED_SAMPLE_EVERY` per thread, at most
one every :data:`SCHED_SAMPLE_GAP_S`, and scaled up to every span of the stage
(:class:`StageStats`); wall time is measured on every span.

The consumer's own clocks are read on one step in :data:`CONSUMER_SAMPLE_EVERY` (at most
one per gap): its CPU time, run-queue wait and blocking switches during the steps tell
how much the loader's threads slow the training step. A GIL probe thread (:mod:`.gil`)
runs while the recorder records and measures what one GIL acquisition costs, which
splits blocked time into GIL wait and IO wait.

The analysis of these numbers (verdict, summary, JSON) lives in :mod:`fastfeed.stats`,
the Chrome trace export in :mod:`fastfeed.profiling.trace`, the plots in :mod:`fastfeed.stats.plot`.

Stage spans also appear in ``torch.profiler`` traces as ``fastfeed/<stage>`` ranges while
a torch profiler is running. Worker threads are not the thread that started the profiler,
so torch records their ranges only with
``experimental_config=torch._C._profiler._ExperimentalConfig(profile_all_threads=True)``.
The check costs one module-attribute read per span while no profiler runs.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeAlias

from fastfeed._diskstats import disk_snapshot, storage_delta
from fastfeed._procio import ProcIO, cpu_times, read_proc_io
from fastfeed.profiling import clocks, gil
from fastfeed.profiling.books import (
    _TOUCH_S,
    CHUNK,
    QUEUE_ROW,
    STEP_ROW,
    Book,
    ConsumerFigures,
)
from fastfeed.profiling.clocks import (
    SCHED_SAMPLE_EVERY,
    SCHED_SAMPLE_GAP_S,
    Mark,
    _run_delay_s,
    _voluntary_switches,
)
from fastfeed.profiling.figures import QueueStats, StageStats
from fastfeed.profiling.rings import TraceEvent
from fastfeed.profiling.spans import ChainRecord, ChainSpan, ChainTime, StageHooks
from fastfeed.profiling.stages import Stage

__all__ = [
    "CONSUMER_SAMPLE_EVERY",
    "DEFAULT_MAX_EVENTS",
    "SCHED_SAMPLE_EVERY",
    "SCHED_SAMPLE_GAP_S",
    "ChainRecord",
    "ChainSpan",
    "ChainTime",
    "Mark",
    "QueueStats",
    "Recorder",
    "StageStats",
    "TraceEvent",
]

#: ``(thread id, perf_counter, thread CPU, run-queue wait, switches)`` of the training loop.
_Clocks: TypeAlias = tuple[int, float, float, float, int]
#: Timeline events (and, separately, queue-depth samples) a Recorder keeps by default.
DEFAULT_MAX_EVENTS = 20_000
#: Training steps of which one measures the loop's own CPU time, run-queue wait and
#: blocking switches (~5 us); the figures are ratios over those steps. Like mark chains,
#: at most one every :data:`SCHED_SAMPLE_GAP_S` (a step of tiny records takes 0.3 ms).
CONSUMER_SAMPLE_EVERY = 8


class Recorder(StageHooks):
    """Collects stage spans, queue waits and consumer steps from every pipeline stage.

    Besides the per-stage and per-queue figures it notes, at creation and at
    :meth:`reset`, the process CPU time, ``/proc/self/io`` and the machine-wide CPU
    counters, so a snapshot can tell host saturation and page-cache hits apart.

    Args:
        enabled: When False every hook returns at once (no timing at all). May be
            flipped at any time (``recorder.enabled = False``).
        max_events: Timeline events kept for traces (the oldest are dropped), count;
            as many queue-depth samples are kept besides. Both rings are allocated on
            first use, about 73 bytes per event in all (1.5 MB for the default).

    Attributes:
        steps: Consumer steps counted (batches after the first of each epoch).
        wait_s: Time the consumer waited for batches, all batches, seconds.
        step_wait_s: The part of ``wait_s`` inside counted steps, seconds (excludes the
            wait for each epoch's first batch, which is start-up, not steady state).
        step_s: Time between consecutive batch hand-overs, summed, seconds.
        first_batches: Batches handed over without a previous one (epoch starts).
        step_log: ``(end_s, wait_s, step_s)`` of the latest steps (``perf_counter``
            times), for plots.
        measuring_step: The training loop's current step is one of the measured ones:
            whoever times the loop calls :meth:`consumer_enter` before asking for the
            next batch (only then: one call fewer per batch).
        extra: Free-form figures merged into :meth:`snapshot`.
    """

    def __init__(self, enabled: bool = True, max_events: int = DEFAULT_MAX_EVENTS) -> None:
        self.enabled = enabled
        super().__init__(max_events)
        # A subclass that keeps spans its own way gets every span through its add().
        self._direct = type(self).add is StageHooks.add
        if not self._direct:
            self._put = self._put_via_add  # type: ignore[method-assign]
        self.extra: dict[str, Any] = {}
        self._zero()

    @property
    def stages(self) -> dict[str, StageStats]:
        """Cumulative figures per stage (folded from every thread's book now)."""
        with self._lock:
            self._sync()
            return self._stages

    @property
    def queues(self) -> dict[str, QueueStats]:
        """Cumulative figures per queue (folded from every thread's book now)."""
        with self._lock:
            self._sync()
            return self._queues

    def _consumer_figures(self) -> ConsumerFigures:
        with self._lock:
            self._sync()
            return self._consumer

    @property
    def steps(self) -> int:
        """Consumer steps counted (batches after the first of each epoch)."""
        return self._consumer_figures().steps

    @property
    def wait_s(self) -> float:
        """Time the consumer waited for batches, all batches, seconds."""
        return self._consumer_figures().wait_s

    @property
    def step_wait_s(self) -> float:
        """The part of ``wait_s`` inside counted steps (no epoch's first batch), seconds."""
        return self._consumer_figures().step_wait_s

    @property
    def step_s(self) -> float:
        """Time between consecutive batch hand-overs, summed, seconds."""
        return self._consumer_figures().step_s

    @property
    def first_batches(self) -> int:
        """Batches handed over without a previous one (epoch starts)."""
        return self._consumer_figures().first_batches

    @property
    def step_log(self) -> list[tuple[float, float, float]]:
        """``(end_s, wait_s, step_s)`` of the latest steps (``perf_counter`` times)."""
        return self.steps_log()

    @property
    def events(self) -> list[TraceEvent]:
        """A copy of the kept timeline events, oldest first (see :meth:`timeline`)."""
        with self._lock:
            self._sync()
            return self._sorted_events()

    @property
    def counters(self) -> list[tuple[str, float, float]]:
        """A copy of the kept ``(queue_name, time_s, depth)`` samples, oldest first."""
        with self._lock:
            self._sync()
            return self._counters.samples()

    def _zero(self) -> None:
        """Start every figure from zero, now (caller holds the lock or owns the object)."""
        self.started_at = time.perf_counter()
        self.started_wall = time.time()
        self.started_cpu_s = time.process_time()
        self.started_io: ProcIO | None = read_proc_io()
        self.started_machine = cpu_times()
        self.started_disk = disk_snapshot()
        self._gil_start = gil.totals()
        # The training loop's own work on the sampled steps (see consumer_step): wall
        # from hand-over to asking again, CPU, run-queue wait, voluntary switches.
        self.consumer_compute_s = 0.0
        self.consumer_cpu_s = 0.0
        self.consumer_runq_s = 0.0
        self.consumer_switches = 0
        self.consumer_steps = 0
        self._consumer_n = 0  # steps since the last measured one
        self._consumer_sampled_s = -1e9
        self._consumer_prev: _Clocks | None = None
        self.measuring_step = False
        self._consumer_enter: _Clocks | None = None

    # -- stage spans ----------------------------------------------------------------

    def queue(
        self,
        name: str,
        *,
        depth: int,
        capacity: int,
        put_wait_s: float = 0.0,
        get_wait_s: float = 0.0,
        now_s: float | None = None,
    ) -> None:
        """Report one put or get on queue ``name``: its depth after the operation and the wait.

        Args:
            name: The queue.
            depth: Items in the queue after the operation.
            capacity: The queue's bound.
            put_wait_s: How long the producer waited for room, seconds.
            get_wait_s: How long the consumer waited for an item, seconds.
            now_s: ``time.perf_counter()`` of the operation when the caller has it.
        """
        if not self.enabled:
            return
        try:
            book: Book = self._local.book
        except AttributeError:
            book = self._open_book()
        code = self._queue_code.get(name)
        if code is None:
            code = self._register(self._queue_code, self._queue_names, name)
        if self._queue_capacity[code] != capacity:
            self._queue_capacity[code] = capacity
        now_s = time.perf_counter() if now_s is None else now_s
        rows = book.qrows
        rows.frombytes(QUEUE_ROW.pack(code, now_s, depth, put_wait_s, get_wait_s))
        if len(rows) >= 5 * CHUNK or now_s - book.touched_s > _TOUCH_S:
            self._after_put(book, now_s, Stage.WAIT)

    # -- consumer ---------------------------------------------------------------------

    def consumer_enter(self) -> None:
        """Note the training loop's clocks as it asks for the next batch (the tap calls it).

        On the sampled steps (one in :data:`CONSUMER_SAMPLE_EVERY`, at most one every
        :data:`SCHED_SAMPLE_GAP_S`) the loop's own work
        is measured from the previous hand-over to here, so the time it spends waiting
        (and being woken up) for the batch is not counted as its own.
        """
        if self._consumer_prev is None or not self.enabled:
            return
        self._consumer_enter = _consumer_clocks()

    def consumer_step(
        self, wait_s: float, step_s: float | None, now_s: float | None = None
    ) -> None:
        """Report one batch handed to the training loop (call right after the hand-over).

        Args:
            wait_s: How long the training loop was blocked waiting for it, seconds.
            step_s: Time since the previous batch was handed over (one training step),
                seconds; None for the first batch of an epoch.
            now_s: ``time.perf_counter()`` at the hand-over, when the caller has it.
        """
        if not self.enabled:
            return
        now = time.perf_counter() if now_s is None else now_s
        prev, self._consumer_prev = self._consumer_prev, None
        self.measuring_step = False
        enter, self._consumer_enter = self._consumer_enter, None
        try:
            book: Book = self._local.book
        except AttributeError:
            book = self._open_book()
        rows = book.srows
        rows.frombytes(STEP_ROW.pack(now, wait_s, -1.0 if step_s is None else step_s))
        if len(rows) >= 3 * CHUNK or now - book.touched_s > _TOUCH_S:
            self._after_put(book, now, Stage.WAIT)
        if prev is not None and enter is not None and step_s is not None:
            self._measured_step(prev, enter)
        # One step in CONSUMER_SAMPLE_EVERY, at most one per gap: the next is measured,
        # from this hand-over on (the training loop is the only writer of these).
        n = self._consumer_n + 1
        gap_s = clocks.SCHED_SAMPLE_GAP_S
        if n >= CONSUMER_SAMPLE_EVERY and now - self._consumer_sampled_s >= gap_s:
            self._consumer_n = 0
            self._consumer_sampled_s = now
            self._consumer_prev = _consumer_clocks()
            self.measuring_step = True
        else:
            self._consumer_n = n

    def consumer_report(
        self, wait_s: float, step_s: float | None, now_s: float
    ) -> tuple[Callable[[bytes], object] | None, int]:
        """:meth:`consumer_step`, plus a way to report the next hand-overs without a call.

        Returns:
            ``(sink, k)``: the caller may report each of the next ``k`` hand-overs as
            ``sink(STEP_ROW.pack(now_s, wait_s, step_s or -1.0))`` (C functions only, no
            call into the recorder's Python code) before it calls this again;
            ``(None, 0)`` when it must call every time (recording off, or the next step
            is a measured one).
        """
        self.consumer_step(wait_s, step_s, now_s)
        if not self.enabled or self.measuring_step:
            return None, 0
        k = CONSUMER_SAMPLE_EVERY - 1 - self._consumer_n
        if k <= 0:
            # Due for a measured step but within SCHED_SAMPLE_GAP_S of the last one (fast
            # batches): look again after as many direct reports, not at every batch (at
            # batch size 1, every batch came through here: ~1 us of the hooks' ~3.4).
            k = CONSUMER_SAMPLE_EVERY - 1
        self._consumer_n += k  # counted now: the sampling decision comes after them
        return self._book().srows.frombytes, k

    def _measured_step(
        self,
        prev: tuple[int, float, float, float, int],
        enter: tuple[int, float, float, float, int],
    ) -> None:
        """A sampled step: the loop's own work, from the previous hand-over to asking again."""
        if not prev[0] == enter[0] == threading.get_ident():
            return
        with self._lock:
            self.consumer_steps += 1
            self.consumer_compute_s += enter[1] - prev[1]
            self.consumer_cpu_s += enter[2] - prev[2]
            if enter[3] >= 0 and prev[3] >= 0:
                self.consumer_runq_s += enter[3] - prev[3]
            if enter[4] >= 0 and prev[4] >= 0:
                self.consumer_switches += enter[4] - prev[4]

    # -- reading ----------------------------------------------------------------------

    @property
    def stall_fraction(self) -> float:
        """Fraction of step time the training loop spent waiting for input (0..1).

        Steady state: the waits for each epoch's first batch (start-up) are left out;
        they are in ``wait_s`` and in the snapshot's ``startup_wait_s``.
        """
        c = self._consumer_figures()
        return c.step_wait_s / c.step_s if c.step_s > 0 else 0.0

    def snapshot(self) -> dict[str, Any]:
        """A JSON-serializable copy of everything recorded so far.

        Besides the stage, queue and consumer figures it holds ``process_cpu_s`` (CPU
        time of the whole process since the start or last reset), ``cpu_count``,
        ``machine_busy`` (share of all cores busy machine-wide, any process; None if
        unknown), ``io`` (``/proc/self/io`` deltas: ``rchar``, ``read_bytes``, or None) and
        ``storage`` (the busiest disk's reads, see
        :func:`fastfeed._diskstats.storage_delta`, or None).
        """
        now_io = read_proc_io()
        now_machine = cpu_times()
        now_disk = disk_snapshot()
        with self._lock:
            self._sync()
            c = self._consumer
            io = None
            if now_io is not None and self.started_io is not None:
                d = now_io - self.started_io
                io = {"rchar": d.rchar, "read_bytes": d.read_bytes, "syscr": d.syscr}
            machine = None
            if now_machine is not None and self.started_machine is not None:
                total = now_machine[1] - self.started_machine[1]
                if total > 0:
                    machine = (now_machine[0] - self.started_machine[0]) / total
            return {
                "elapsed_s": time.perf_counter() - self.started_at,
                "started_unix_s": self.started_wall,
                "process_cpu_s": time.process_time() - self.started_cpu_s,
                "cpu_count": os.cpu_count() or 1,
                "machine_busy": machine,
                "io": io,
                "storage": storage_delta(self.started_disk, now_disk),
                "steps": c.steps,
                "first_batches": c.first_batches,
                "wait_s": c.wait_s,
                "step_wait_s": c.step_wait_s,
                "startup_wait_s": c.wait_s - c.step_wait_s,
                "step_s": c.step_s,
                "stall_fraction": c.step_wait_s / c.step_s if c.step_s > 0 else 0.0,
                "step_wait": c.step_waits.percentiles(),
                "step_time": c.step_times.percentiles(),
                "stages": {k: v.to_dict() for k, v in self._stages.items()},
                "queues": {k: v.to_dict() for k, v in self._queues.items()},
                "gil": {
                    **gil.totals().since(self._gil_start),
                    "switch_interval_s": sys.getswitchinterval(),
                },
                "consumer": {
                    "steps": self.consumer_steps,
                    "compute_s": self.consumer_compute_s,
                    "cpu_s": self.consumer_cpu_s,
                    "runq_s": self.consumer_runq_s,
                    "switches": self.consumer_switches,
                },
                **self.extra,
            }

    def timeline(self) -> tuple[list[TraceEvent], list[tuple[str, float, float]]]:
        """Copies of the kept timeline events and queue-depth samples (for traces)."""
        with self._lock:
            self._sync()
            return self._sorted_events(), self._counters.samples()

    def steps_log(self) -> list[tuple[float, float, float]]:
        """Copy of the latest ``(end_s, wait_s, step_s)`` consumer steps."""
        with self._lock:
            self._sync()
            return self._consumer.step_log.steps()

    def reset(self) -> None:
        """Forget everything recorded (e.g. after warm-up)."""
        with self._lock:
            self._clear_books()
            self._zero()


def _consumer_clocks() -> _Clocks:
    """``(thread id, perf_counter, thread CPU, run-queue wait, switches)`` of this thread."""
    return (
        threading.get_ident(),
        time.perf_counter(),
        time.thread_time(),
        _run_delay_s(),
        _voluntary_switches(),
    )
