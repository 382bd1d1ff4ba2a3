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
import random
import sys
import threading
import time
import weakref
from array import array
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from fastfeed._procio import ProcIO, cpu_times, read_proc_io
from fastfeed.profiling.gil import GilProbeTotals, start_probe
from fastfeed.profiling.stages import Stage

try:  # Linux: per-thread rusage (voluntary context switches)
    import resource

    _RUSAGE_THREAD: int | None = resource.RUSAGE_THREAD
except (ImportError, AttributeError):  # pragma: no cover - not Linux
    _RUSAGE_THREAD = None

__all__ = [
    "DEFAULT_MAX_EVENTS",
    "SCHED_SAMPLE_EVERY",
    "Mark",
    "QueueStats",
    "Recorder",
    "StageStats",
    "TraceEvent",
]

_RESERVOIR = 2048
_STEP_LOG = 20_000  # per-step (wait, step) pairs kept for plots, count
#: Timeline events (and, separately, queue-depth samples) a Recorder keeps by default.
DEFAULT_MAX_EVENTS = 20_000
#: ``mark()`` chains per thread of which one reads the run-queue wait and context
#: switches (~2.5 us); the others read only the two clocks. 1 reads them every time.
SCHED_SAMPLE_EVERY = 4
_NOT_SAMPLED = -2  # run delay / switches of a mark that did not read them


_tls = threading.local()
_PROBE_IDLE_S = 0.5  # the GIL probe exits after this long without a span or a step


class _SchedFd:
    """This thread's open ``/proc/thread-self/schedstat`` (closed when the thread ends)."""

    __slots__ = ("fd", "pid")

    def __init__(self) -> None:
        self.pid = os.getpid()
        try:
            self.fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self.fd = -1

    def __del__(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass


def _run_delay_s() -> float:
    """This thread's cumulative run-queue wait (runnable, but no core free), seconds; -1 if unknown.

    Tells "waiting for a CPU" (cores oversubscribed) apart from "blocked" (IO, the
    GIL, locks), which ``thread_time`` alone cannot. One ``pread`` of an already open
    file, ~1.5 us.
    """
    holder: _SchedFd | None = getattr(_tls, "sched", None)
    if holder is None or holder.pid != os.getpid():  # new thread, or a forked child
        holder = _tls.sched = _SchedFd()
    if holder.fd < 0:
        return -1.0
    try:
        return int(os.pread(holder.fd, 96, 0).split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return -1.0


def _voluntary_switches() -> int:
    """This thread's voluntary context switches so far; -1 where unknown.

    A thread switches voluntarily when it blocks: on IO, on a lock, or waiting for the
    GIL (a waiter wakes every ``sys.getswitchinterval()``, 5 ms). Compute-bound code
    that releases the GIL (numpy, Pillow) hardly ever does, even on a crowded machine,
    where it is preempted instead: the rate tells GIL contention from oversubscription.
    """
    if _RUSAGE_THREAD is None:
        return -1
    return resource.getrusage(_RUSAGE_THREAD).ru_nvcsw


def _torch_profiler_active() -> bool:
    """Whether a torch profiler is running in this process (cheap; False without torch).

    ``torch.autograd._profiler_enabled()`` is thread-local and reads False in worker
    threads even while a profiler records every thread; torch's own process-global
    flag ``torch.autograd.profiler._is_profiler_enabled`` is the one to read.
    """
    mod = sys.modules.get("torch.autograd.profiler")
    return mod is not None and bool(getattr(mod, "_is_profiler_enabled", False))


@contextlib.contextmanager
def _torch_range(stage: str) -> Iterator[None]:
    import torch.profiler  # already imported: a profiler is running

    with torch.profiler.record_function(f"fastfeed/{stage}"):
        yield


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


class _Reservoir:
    """Uniform sample of at most ``_RESERVOIR`` values (Vitter's algorithm R)."""

    __slots__ = ("_rng", "seen", "values")

    def __init__(self) -> None:
        self.values: list[float] = []
        self.seen = 0
        self._rng = random.Random(0)

    def add(self, value: float) -> None:
        self.seen += 1
        if len(self.values) < _RESERVOIR:
            self.values.append(value)
        else:
            j = int(self._rng.random() * self.seen)  # cheaper than randrange
            if j < _RESERVOIR:
                self.values[j] = value

    def percentiles(self) -> dict[str, float]:
        v = sorted(self.values)
        return {"p50": _percentile(v, 50), "p90": _percentile(v, 90), "p99": _percentile(v, 99)}


@dataclass
class StageStats:
    """Cumulative figures of one stage (read, decode, transform, collate, copy...).

    Run-queue wait and switches are measured on a sample of the spans (every span of
    :meth:`Recorder.span`; one ``mark`` chain in :data:`SCHED_SAMPLE_EVERY` per thread
    for :meth:`Recorder.add_since`) and :meth:`to_dict` scales them to the stage's whole
    busy time.

    Attributes:
        count: Spans recorded (usually batches).
        items: Samples processed.
        failures: Spans that raised.
        busy_s: Wall time inside the stage, summed over threads, seconds.
        cpu_s: Thread CPU time inside the stage, seconds. ``cpu_s / busy_s`` well below
            1 while busy means waiting: on IO, on the GIL, or for a free core.
        runq_s: Time the stage's threads were runnable but had no core (Linux
            schedstat) during the spans that measured it, seconds.
        runq_busy_s: Wall time of the spans that measured ``runq_s``, seconds.
        runq_spans: Spans that measured ``runq_s`` (0: never measured, e.g. not Linux).
        switches: Voluntary context switches (blocking: IO, locks, the GIL) during the
            spans that measured them.
        switches_busy_s: Wall time of the spans that measured ``switches``, seconds.
        switches_spans: Spans that measured ``switches``.
        bytes: Bytes the stage handled.
    """

    count: int = 0
    items: int = 0
    failures: int = 0
    busy_s: float = 0.0
    cpu_s: float = 0.0
    runq_s: float = 0.0
    runq_busy_s: float = 0.0
    runq_spans: int = 0
    switches: int = 0
    switches_busy_s: float = 0.0
    switches_spans: int = 0
    bytes: int = 0
    durations: _Reservoir = field(default_factory=_Reservoir, repr=False)

    def _scale(self, busy_s: float, spans: int) -> float | None:
        """Factor from the measured spans to all spans; None if none was measured."""
        if spans == 0:
            return None
        if busy_s > 0:
            return self.busy_s / busy_s
        return self.count / spans  # only zero-length spans measured

    def to_dict(self) -> dict[str, Any]:
        """The figures, with run-queue wait and switches estimated for every span.

        ``runq_s`` / ``blocked_s`` / ``switches`` are None when never measured.
        """
        runq_scale = self._scale(self.runq_busy_s, self.runq_spans)
        sw_scale = self._scale(self.switches_busy_s, self.switches_spans)
        runq = None if runq_scale is None else self.runq_s * runq_scale
        out = {
            "count": self.count,
            "items": self.items,
            "failures": self.failures,
            "busy_s": self.busy_s,
            "cpu_s": self.cpu_s,
            "runq_s": runq,
            "blocked_s": None if runq is None else max(0.0, self.busy_s - self.cpu_s - runq),
            "switches": None if sw_scale is None else round(self.switches * sw_scale),
            "bytes": self.bytes,
            "cpu_per_wall": self.cpu_s / self.busy_s if self.busy_s > 0 else 0.0,
        }
        out.update({f"{k}_s": v for k, v in self.durations.percentiles().items()})
        return out


@dataclass
class QueueStats:
    """One queue between stages.

    Attributes:
        put_wait_s: Time producers spent blocked because the queue was full
            (the consumer side is slow), seconds.
        get_wait_s: Time consumers spent blocked because it was empty
            (the producer side is slow), seconds.
        depth_sum: Sum of sampled depths; ``depth_sum / depth_samples`` is the mean occupancy.
        capacity: The queue's bound.
    """

    put_wait_s: float = 0.0
    get_wait_s: float = 0.0
    depth_sum: int = 0
    depth_samples: int = 0
    capacity: int = 0

    def to_dict(self) -> dict[str, Any]:
        mean = self.depth_sum / self.depth_samples if self.depth_samples else 0.0
        return {
            "put_wait_s": self.put_wait_s,
            "get_wait_s": self.get_wait_s,
            "mean_depth": mean,
            "capacity": self.capacity,
            "occupancy": mean / self.capacity if self.capacity else 0.0,
        }


class Mark(tuple):
    """``(perf_counter_s, thread_time_s, run_delay_s, voluntary_switches)`` of one thread.

    Taken with :meth:`Recorder.mark`; run delay and switches are -1 where unknown and
    -2 in a mark that did not read them (see :data:`SCHED_SAMPLE_EVERY`).
    """

    __slots__ = ()


def _mark() -> Mark:
    return Mark((time.perf_counter(), time.thread_time(), _run_delay_s(), _voluntary_switches()))


def _light_mark() -> Mark:
    return Mark((time.perf_counter(), time.thread_time(), _NOT_SAMPLED, _NOT_SAMPLED))


# Returned while recording is off; a span that started before recording was switched on
# is dropped rather than measured from a bogus start.
_NO_MARK = Mark((0.0, 0.0, -1.0, -1))


class TraceEvent(tuple):
    """``(name, thread_name, start_s, end_s, args)``: one slice of the timeline."""

    __slots__ = ()


_NO_ARGS: Mapping[str, Any] = MappingProxyType({})  # shared by every event without args
_NO_ITEMS = -1  # an event without args (consumer waits)


class _EventRing:
    """The latest ``capacity`` timeline events in preallocated parallel arrays.

    About 49 bytes per event (two name references, two doubles, items, bytes, a flag),
    allocated on the first event and never grown: no object is created per event.
    Names are references to the callers' (shared) strings. Not thread-safe: the
    :class:`Recorder` holds its lock around every call.
    """

    __slots__ = (
        "_bytes",
        "_end",
        "_failed",
        "_items",
        "_n",
        "_stage",
        "_start",
        "_thread",
        "capacity",
    )

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, int(capacity))
        self._n = 0  # events ever appended
        self._stage: list[str | None] = []

    def _allocate(self) -> None:
        cap = self.capacity
        self._stage = [None] * cap
        self._thread: list[str | None] = [None] * cap
        self._start = array("d", bytes(8 * cap))
        self._end = array("d", bytes(8 * cap))
        self._items = array("q", bytes(8 * cap))
        self._bytes = array("q", bytes(8 * cap))
        self._failed = array("B", bytes(cap))

    def append(
        self,
        stage: str,
        thread: str,
        start_s: float,
        end_s: float,
        items: int,
        nbytes: int,
        failed: bool,
    ) -> None:
        """Keep one event (``items == -1``: no args), overwriting the oldest when full."""
        cap = self.capacity
        if cap == 0:
            return
        if not self._stage:
            self._allocate()
        i = self._n % cap
        self._n += 1
        self._stage[i] = stage
        self._thread[i] = thread
        self._start[i] = start_s
        self._end[i] = end_s
        self._items[i] = items
        self._bytes[i] = nbytes
        self._failed[i] = failed

    def __len__(self) -> int:
        return min(self._n, self.capacity)

    def clear(self) -> None:
        """Forget every event and release the arrays (re-allocated by the next event)."""
        self._n = 0
        self._stage = []
        self._thread = []
        self._start = self._end = array("d")
        self._items = self._bytes = array("q")
        self._failed = array("B")

    def events(self) -> list[TraceEvent]:
        """The kept events, oldest first, with their ``args`` mappings built now."""
        n, cap = len(self), self.capacity
        first = self._n - n
        out = []
        for k in range(first, first + n):
            i = k % cap
            items = self._items[i]
            if items == _NO_ITEMS:
                args: Mapping[str, Any] = _NO_ARGS
            else:
                args = {"items": items}
                if self._bytes[i]:
                    args["bytes"] = self._bytes[i]
                if self._failed[i]:
                    args["failed"] = True
            ev = (self._stage[i], self._thread[i], self._start[i], self._end[i], args)
            out.append(TraceEvent(ev))
        return out


class _CounterRing:
    """The latest ``capacity`` ``(queue_name, time_s, depth)`` samples, preallocated (24 B each)."""

    __slots__ = ("_depth", "_n", "_name", "_t", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, int(capacity))
        self._n = 0
        self._name: list[str | None] = []

    def append(self, name: str, t_s: float, depth: float) -> None:
        """Keep one sample, overwriting the oldest when full."""
        cap = self.capacity
        if cap == 0:
            return
        if not self._name:
            self._name = [None] * cap
            self._t = array("d", bytes(8 * cap))
            self._depth = array("d", bytes(8 * cap))
        i = self._n % cap
        self._n += 1
        self._name[i] = name
        self._t[i] = t_s
        self._depth[i] = depth

    def __len__(self) -> int:
        return min(self._n, self.capacity)

    def clear(self) -> None:
        """Forget every sample and release the arrays (re-allocated by the next one)."""
        self._n = 0
        self._name = []
        self._t = self._depth = array("d")

    def samples(self) -> list[tuple[str, float, float]]:
        """The kept samples, oldest first."""
        n, cap = len(self), self.capacity
        first = self._n - n
        return [
            (self._name[k % cap], self._t[k % cap], self._depth[k % cap])  # type: ignore[misc]
            for k in range(first, first + n)
        ]


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
        self._probe: threading.Thread | None = None
        self._last_activity = time.perf_counter()
        self._zero()
        _RECORDERS.add(self)

    # -- the GIL probe ----------------------------------------------------------------

    def _start_probe(self) -> None:
        """Start the GIL probe thread unless it runs (it exits when recording idles)."""
        with self._lock:
            if self._probe is not None:
                return
            self._probe = start_probe(self, _probe_report, _run_delay_s)

    def _probe_report(self, late_s: float, runq_s: float) -> bool:
        with self._lock:
            if not self.enabled or time.perf_counter() - self._last_activity > _PROBE_IDLE_S:
                self._probe = None
                return False
            self.gil.add(late_s, runq_s)
            return True

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
        self.gil = GilProbeTotals()
        # The training loop's thread during steps: wall outside the wait, CPU, run-queue
        # wait, voluntary switches (see consumer_step).
        self.consumer_compute_s = 0.0
        self.consumer_cpu_s = 0.0
        self.consumer_runq_s = 0.0
        self.consumer_switches = 0
        self.consumer_steps = 0
        self._consumer_prev: tuple[int, float, float, int] | None = None
        self._consumer_enter: tuple[int, float, float, int] | None = None

    # -- stage spans ----------------------------------------------------------------

    @contextlib.contextmanager
    def span(self, stage: str, items: int = 1, nbytes: int = 0) -> Iterator[None]:
        """Time the enclosed block as one span of ``stage`` (wall and thread CPU time).

        Always reads the run-queue wait and context switches too (~6 us per span).

        Args:
            stage: A :class:`~fastfeed.profiling.stages.Stage` or any name.
            items: Samples in the span (spans are per batch, not per sample).
            nbytes: Bytes the span handled (for MB/s).
        """
        if not self.enabled:
            yield
            return
        ranged = contextlib.ExitStack()
        if _torch_profiler_active():
            ranged.enter_context(_torch_range(stage))
        with ranged:
            q0 = _run_delay_s()
            v0 = _voluntary_switches()
            t0 = time.perf_counter()
            c0 = time.thread_time()
            failed = False
            try:
                yield
            except BaseException:
                failed = True
                raise
            finally:
                self.add(
                    stage,
                    t0,
                    time.perf_counter(),
                    time.thread_time() - c0,
                    items=items,
                    nbytes=nbytes,
                    failed=failed,
                    runq_s=_run_delay_s() - q0 if q0 >= 0 else None,
                    switches=_voluntary_switches() - v0 if v0 >= 0 else None,
                )

    def add(
        self,
        stage: str,
        start_s: float,
        end_s: float,
        cpu_s: float,
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
            cpu_s: Thread CPU time spent, seconds.
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
        if self._probe is None:
            self._start_probe()
        with self._lock:
            self._last_activity = end_s
            st = self.stages.get(stage)
            if st is None:
                st = self.stages[stage] = StageStats()
            st.count += 1
            st.items += items
            st.failures += failed
            st.busy_s += wall
            st.cpu_s += cpu_s
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
        also reads the run-queue wait and context switches (~4 us), the others only
        the wall and CPU clocks (~1 us); :meth:`add_since` continues in the same mode.
        """
        if not self.enabled:
            return _NO_MARK
        n = getattr(_tls, "chains", 0)
        _tls.chains = n + 1
        return _mark() if n % SCHED_SAMPLE_EVERY == 0 else _light_mark()

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
            runq_s: float | None = None
            switches: int | None = None
        else:
            now = _mark()
            runq_s = now[2] - since[2] if since[2] >= 0 and now[2] >= 0 else None
            switches = now[3] - since[3] if since[3] >= 0 and now[3] >= 0 else None
        if since is not _NO_MARK:
            self.add(
                stage,
                since[0],
                now[0],
                now[1] - since[1],
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

        The loop's work is then measured from the previous hand-over to here, so the
        time it spends waiting (and being woken up) for the batch is not counted as its
        own. Without this call the whole interval between hand-overs is used.
        """
        if not self.enabled:
            return
        self._consumer_enter = (
            threading.get_ident(),
            time.thread_time(),
            _run_delay_s(),
            _voluntary_switches(),
        )

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
        cpu = time.thread_time()
        runq = _run_delay_s()
        switches = _voluntary_switches()
        name = threading.current_thread().name
        ident = threading.get_ident()
        enter, self._consumer_enter = self._consumer_enter, None
        with self._lock:
            self._last_activity = now
            prev, self._consumer_prev = self._consumer_prev, (ident, cpu, runq, switches)
            if step_s is not None and prev is not None and prev[0] == ident:
                # The loop's own work: from the previous hand-over to asking for this
                # batch (consumer_enter); without that mark, to the hand-over, less one
                # switch for the blocking wait.
                end, less = (
                    (enter, 0)
                    if enter is not None and enter[0] == ident
                    else (
                        (ident, cpu, runq, switches),
                        int(wait_s > 0),
                    )
                )
                self.consumer_steps += 1
                self.consumer_compute_s += max(0.0, step_s - wait_s)
                self.consumer_cpu_s += end[1] - prev[1]
                if end[2] >= 0 and prev[2] >= 0:
                    self.consumer_runq_s += end[2] - prev[2]
                if end[3] >= 0 and prev[3] >= 0:
                    self.consumer_switches += max(0, end[3] - prev[3] - less)
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
        unknown) and ``io`` (``/proc/self/io`` deltas: ``rchar``, ``read_bytes``, or None).
        """
        now_io = read_proc_io()
        now_machine = cpu_times()
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
                "gil": {**self.gil.to_dict(), "switch_interval_s": sys.getswitchinterval()},
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


def _probe_report(rec: Recorder, late_s: float, runq_s: float) -> bool:
    return rec._probe_report(late_s, runq_s)


_RECORDERS: weakref.WeakSet[Recorder] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The probe thread did not survive the fork: let the next span start a new one.
    for rec in list(_RECORDERS):
        rec._probe = None
        rec._lock = threading.Lock()
        rec._consumer_prev = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
