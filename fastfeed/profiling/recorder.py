"""In-training hooks: every pipeline stage reports to a :class:`Recorder`.

The recorder owns no stage. Stages call :meth:`Recorder.span` (per batch, not per
sample, so the cost stays far below 1% of a batch), queues report put-wait vs get-wait
(which side is slow), and the consumer reports how long each step waited for its batch.
Everything is kept as cumulative counters plus bounded reservoirs (for percentiles)
and a bounded ring of timeline events (for Chrome traces). The rings are preallocated
flat arrays (about 49 bytes per event, ~1 MiB for the default 20,000 events), so memory
stays flat however long training runs.

Cost per batch of the Loader's hooks (``mark`` + three ``add_since``): the run-queue wait
(``/proc/thread-self/schedstat``) and voluntary context switches (``getrusage``) are read
on every :data:`SCHED_SAMPLE_EVERY`-th chain of marks per thread and scaled up to every
span of the stage (:class:`StageStats`); wall and CPU time are measured on every span.

The consumer's own clocks are read at every hand-over (:meth:`Recorder.consumer_step`):
its CPU time, run-queue wait and blocking switches during the steps tell how much the
loader's threads slow the training step. A GIL probe thread (:mod:`.gil`) runs while the
recorder records and measures what one GIL acquisition costs, which splits blocked time
into GIL wait and IO wait.

The analysis of these numbers (verdict, summary, JSON) lives in :mod:`fastfeed.stats`,
the Chrome trace export in :mod:`fastfeed.profiling.trace`, the plots in :mod:`fastfeed.stats.plot`.

Stage spans also appear in ``torch.profiler`` traces as ``fastfeed/<stage>`` ranges while
a torch profiler is running. Worker threads are not the thread that started the profiler,
so torch records their ranges only with
``experimental_config=torch._C._profiler._ExperimentalConfig(profile_all_threads=True)``.
The check costs one module-attribute read per span while no profiler runs.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from fastfeed._diskstats import disk_snapshot, storage_delta
from fastfeed._procio import ProcIO, cpu_times, read_proc_io
from fastfeed.profiling import gil
from fastfeed.profiling.clocks import (
    _NO_MARK,
    _NOT_SAMPLED,
    SCHED_SAMPLE_EVERY,
    Mark,
    _light_mark,
    _mark,
    _run_delay_s,
    _tls,
    _torch_profiler_active,
    _torch_range,
    _voluntary_switches,
)
from fastfeed.profiling.figures import QueueStats, StageStats
from fastfeed.profiling.rings import _NO_ITEMS, TraceEvent, _CounterRing, _EventRing, _Reservoir
from fastfeed.profiling.stages import Stage

__all__ = [
    "CONSUMER_SAMPLE_EVERY",
    "DEFAULT_MAX_EVENTS",
    "SCHED_SAMPLE_EVERY",
    "Mark",
    "QueueStats",
    "Recorder",
    "StageStats",
    "TraceEvent",
]

_STEP_LOG = 20_000  # per-step (wait, step) pairs kept for plots, count
#: Timeline events (and, separately, queue-depth samples) a Recorder keeps by default.
DEFAULT_MAX_EVENTS = 20_000
#: Training steps of which one measures the loop's own CPU time, run-queue wait and
#: blocking switches (~14 us on a busy VM); the figures are ratios over those steps.
CONSUMER_SAMPLE_EVERY = 8


class Recorder:
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
        extra: Free-form figures merged into :meth:`snapshot`.
    """

    def __init__(self, enabled: bool = True, max_events: int = DEFAULT_MAX_EVENTS) -> None:
        self.enabled = enabled
        self._lock = threading.Lock()
        self.stages: dict[str, StageStats] = {}
        self.queues: dict[str, QueueStats] = {}
        self._events = _EventRing(max_events)
        self._counters = _CounterRing(max_events)
        self.extra: dict[str, Any] = {}
        self._zero()

    @property
    def events(self) -> list[TraceEvent]:
        """A copy of the kept timeline events, oldest first (see :meth:`timeline`)."""
        with self._lock:
            return self._events.events()

    @property
    def counters(self) -> list[tuple[str, float, float]]:
        """A copy of the kept ``(queue_name, time_s, depth)`` samples, oldest first."""
        with self._lock:
            return self._counters.samples()

    def _zero(self) -> None:
        """Start every figure from zero, now (caller holds the lock or owns the object)."""
        self.steps = 0
        self.wait_s = 0.0
        self.step_wait_s = 0.0
        self.step_s = 0.0
        self.first_batches = 0
        self.step_waits = _Reservoir()
        self.step_times = _Reservoir()
        self.step_log: deque[tuple[float, float, float]] = deque(maxlen=_STEP_LOG)
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
        self._consumer_n = 0
        self._consumer_prev: tuple[int, float, float, float, int] | None = None
        self._consumer_enter: tuple[int, float, float, float, int] | None = None

    # -- stage spans ----------------------------------------------------------------

    @contextlib.contextmanager
    def span(self, stage: str, items: int = 1, nbytes: int = 0) -> Iterator[None]:
        """Time the enclosed block as one span of ``stage`` (wall and thread CPU time).

        Like a :meth:`mark` chain, one span in :data:`SCHED_SAMPLE_EVERY` per thread (the
        first included) also reads the thread CPU time, run-queue wait and context
        switches (~7 us); the others read only the wall clock, and the figures are
        scaled to every span.

        Args:
            stage: A :class:`~fastfeed.profiling.stages.Stage` or any name.
            items: Samples in the span (spans are per batch, not per sample).
            nbytes: Bytes the span handled (for MB/s).
        """
        if not self.enabled:
            yield
            return
        # No ExitStack per span (~2 us): the torch range only while a profiler runs.
        ranged = _torch_range(stage) if _torch_profiler_active() else contextlib.nullcontext()
        with ranged:
            start = _mark() if self._next_span_sampled(stage) else _light_mark()
            failed = False
            try:
                yield
            except BaseException:
                failed = True
                raise
            finally:
                self.add_since(stage, start, items=items, nbytes=nbytes, failed=failed)

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
        wall = end_s - start_s
        name = threading.current_thread().name
        if not gil.running():
            gil.ensure_running(_run_delay_s)
        gil.touch(end_s)
        with self._lock:
            st = self.stages.get(stage)
            if st is None:
                st = self.stages[stage] = StageStats()
            st.count += 1
            st.items += items
            st.failures += failed
            st.busy_s += wall
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
            st.bytes += nbytes
            st.durations.add(wall)
            self._events.append(stage, name, start_s, end_s, items, nbytes, failed)

    def mark(self) -> Mark:
        """This thread's clocks now, for :meth:`add_since` (free when disabled).

        Starts a chain of marks: one chain in :data:`SCHED_SAMPLE_EVERY` per thread
        reads the thread CPU time, run-queue wait and context switches (~7 us on a
        busy VM), the others only the wall clock (~0.1 us); :meth:`add_since`
        continues in the same mode and the figures are scaled to every span.
        """
        if not self.enabled:
            return _NO_MARK
        return _mark() if self._next_chain_sampled() else _light_mark()

    def _next_span_sampled(self, stage: str) -> bool:
        """Count a span of ``stage`` on this thread; True for its first and every
        :data:`SCHED_SAMPLE_EVERY`-th after (per stage: a stage timed per sample and
        one timed per batch both get measured)."""
        counts = getattr(_tls, "spans", None)
        if counts is None:
            counts = _tls.spans = {}
        key = (id(self), stage)
        n = counts.get(key, 0)
        counts[key] = n + 1
        return n % SCHED_SAMPLE_EVERY == 0

    def _next_chain_sampled(self) -> bool:
        """Count a chain on this thread; True for its first with this recorder and every
        :data:`SCHED_SAMPLE_EVERY`-th after."""
        c = getattr(_tls, "chains", None)
        if c is None or c[0] != id(self):
            c = _tls.chains = [id(self), 0]
        n = c[1]
        c[1] = n + 1
        return n % SCHED_SAMPLE_EVERY == 0

    def add_since(
        self,
        stage: str,
        since: Mark,
        *,
        items: int = 1,
        nbytes: int = 0,
        failed: bool = False,
    ) -> Mark:
        """Record a span of ``stage`` from ``since`` to now on this thread; return now's mark.

        For back-to-back stages (read, then transform, then collate) without nesting
        ``with`` blocks: ``m = rec.mark(); ...; m = rec.add_since("read", m, items=n)``.
        Measures the same as :meth:`span` (wall, CPU, run-queue wait, blocking switches),
        the last two on the sampled chains only (see :meth:`mark`).
        """
        if not self.enabled:
            return _NO_MARK
        if since[2] == _NOT_SAMPLED:
            now = _light_mark()
            cpu_s: float | None = None
            runq_s: float | None = None
            switches: int | None = None
        else:
            now = _mark()
            cpu_s = now[1] - since[1]
            runq_s = now[2] - since[2] if since[2] >= 0 and now[2] >= 0 else None
            switches = now[3] - since[3] if since[3] >= 0 and now[3] >= 0 else None
        if since is not _NO_MARK:
            self.add(
                stage,
                since[0],
                now[0],
                cpu_s,
                items=items,
                nbytes=nbytes,
                failed=failed,
                runq_s=runq_s,
                switches=switches,
            )
        return now

    # -- queues -----------------------------------------------------------------------

    def queue(
        self,
        name: str,
        *,
        depth: int,
        capacity: int,
        put_wait_s: float = 0.0,
        get_wait_s: float = 0.0,
    ) -> None:
        """Report one put or get on queue ``name``: its depth after the operation and the wait."""
        if not self.enabled:
            return
        with self._lock:
            q = self.queues.get(name)
            if q is None:
                q = self.queues[name] = QueueStats(capacity=capacity)
            q.put_wait_s += put_wait_s
            q.get_wait_s += get_wait_s
            q.depth_sum += depth
            q.depth_samples += 1
            self._counters.append(name, time.perf_counter(), depth)

    # -- consumer ---------------------------------------------------------------------

    def consumer_enter(self) -> None:
        """Note the training loop's clocks as it asks for the next batch (the tap calls it).

        On the sampled steps (one in :data:`CONSUMER_SAMPLE_EVERY`) the loop's own work
        is measured from the previous hand-over to here, so the time it spends waiting
        (and being woken up) for the batch is not counted as its own.
        """
        if self._consumer_prev is None or not self.enabled:
            return
        self._consumer_enter = _consumer_clocks()

    def consumer_step(self, wait_s: float, step_s: float | None) -> None:
        """Report one batch handed to the training loop (call right after the hand-over).

        Args:
            wait_s: How long the training loop was blocked waiting for it, seconds.
            step_s: Time since the previous batch was handed over (one training step),
                seconds; None for the first batch of an epoch.
        """
        if not self.enabled:
            return
        now = time.perf_counter()
        name = threading.current_thread().name
        prev, self._consumer_prev = self._consumer_prev, None
        enter, self._consumer_enter = self._consumer_enter, None
        gil.touch(now)
        with self._lock:
            if (
                step_s is not None
                and prev is not None
                and enter is not None
                and prev[0] == enter[0] == threading.get_ident()
            ):
                # A sampled step: the loop's own work, from the previous hand-over to
                # asking for this batch.
                self.consumer_steps += 1
                self.consumer_compute_s += enter[1] - prev[1]
                self.consumer_cpu_s += enter[2] - prev[2]
                if enter[3] >= 0 and prev[3] >= 0:
                    self.consumer_runq_s += enter[3] - prev[3]
                if enter[4] >= 0 and prev[4] >= 0:
                    self.consumer_switches += enter[4] - prev[4]
            self._consumer_n += 1
            sample_next = self._consumer_n % CONSUMER_SAMPLE_EVERY == 0
            self.wait_s += wait_s
            self.step_waits.add(wait_s)
            if step_s is not None:
                self.steps += 1
                self.step_s += step_s
                self.step_wait_s += wait_s
                self.step_times.add(step_s)
                self.step_log.append((now, wait_s, step_s))
            else:
                self.first_batches += 1
            if wait_s > 0:
                self._events.append(Stage.WAIT, name, now - wait_s, now, _NO_ITEMS, 0, False)
        if sample_next:  # the next step is measured: its start is this hand-over
            self._consumer_prev = _consumer_clocks()

    # -- reading ----------------------------------------------------------------------

    @property
    def stall_fraction(self) -> float:
        """Fraction of step time the training loop spent waiting for input (0..1).

        Steady state: the waits for each epoch's first batch (start-up) are left out;
        they are in ``wait_s`` and in the snapshot's ``startup_wait_s``.
        """
        with self._lock:
            return self.step_wait_s / self.step_s if self.step_s > 0 else 0.0

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
                "steps": self.steps,
                "first_batches": self.first_batches,
                "wait_s": self.wait_s,
                "step_wait_s": self.step_wait_s,
                "startup_wait_s": self.wait_s - self.step_wait_s,
                "step_s": self.step_s,
                "stall_fraction": self.step_wait_s / self.step_s if self.step_s > 0 else 0.0,
                "step_wait": self.step_waits.percentiles(),
                "step_time": self.step_times.percentiles(),
                "stages": {k: v.to_dict() for k, v in self.stages.items()},
                "queues": {k: v.to_dict() for k, v in self.queues.items()},
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
            return self._events.events(), self._counters.samples()

    def steps_log(self) -> list[tuple[float, float, float]]:
        """Copy of the latest ``(end_s, wait_s, step_s)`` consumer steps."""
        with self._lock:
            return list(self.step_log)

    def reset(self) -> None:
        """Forget everything recorded (e.g. after warm-up)."""
        with self._lock:
            self.stages.clear()
            self.queues.clear()
            self._events.clear()
            self._counters.clear()
            self._zero()


def _consumer_clocks() -> tuple[int, float, float, float, int]:
    """``(thread id, perf_counter, thread CPU, run-queue wait, switches)`` of this thread."""
    return (
        threading.get_ident(),
        time.perf_counter(),
        time.thread_time(),
        _run_delay_s(),
        _voluntary_switches(),
    )
