"""In-training hooks: every pipeline stage reports to a :class:`Recorder`.

The recorder owns no stage. Stages call :meth:`Recorder.span` (per batch, not per
sample, so the cost stays far below 1% of a batch), queues report put-wait vs get-wait
(which side is slow), and the consumer reports how long each step waited for its batch.
Everything is kept as cumulative counters plus bounded reservoirs (for percentiles)
and a bounded ring of timeline events (for Chrome traces).

The analysis of these numbers (verdict, summary, JSON) lives in :mod:`fastfeed.report`,
the Chrome trace export in :mod:`fastfeed.trace`, the plots in :mod:`fastfeed.plot`.

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
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fastfeed._procio import ProcIO, cpu_times, read_proc_io

try:  # Linux: per-thread rusage (voluntary context switches)
    import resource

    _RUSAGE_THREAD: int | None = resource.RUSAGE_THREAD
except (ImportError, AttributeError):  # pragma: no cover - not Linux
    _RUSAGE_THREAD = None

__all__ = ["Mark", "QueueStats", "Recorder", "StageStats", "TraceEvent"]

_RESERVOIR = 2048
_STEP_LOG = 20_000  # per-step (wait, step) pairs kept for plots, count


_tls = threading.local()


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
            j = self._rng.randrange(self.seen)
            if j < _RESERVOIR:
                self.values[j] = value

    def percentiles(self) -> dict[str, float]:
        v = sorted(self.values)
        return {"p50": _percentile(v, 50), "p90": _percentile(v, 90), "p99": _percentile(v, 99)}


@dataclass
class StageStats:
    """Cumulative figures of one stage (read, decode, transform, collate, copy...).

    Attributes:
        count: Spans recorded (usually batches).
        items: Samples processed.
        failures: Spans that raised.
        busy_s: Wall time inside the stage, summed over threads, seconds.
        cpu_s: Thread CPU time inside the stage, seconds. ``cpu_s / busy_s`` well below
            1 while busy means waiting: on IO, on the GIL, or for a free core.
        runq_s: Time the stage's threads were runnable but had no core (Linux
            schedstat), seconds; ``busy_s - cpu_s - runq_s`` is time blocked (IO, GIL).
        runq_known: Whether ``runq_s`` was measured (schedstat readable) for every span.
        switches: Voluntary context switches inside the stage (blocking: IO, locks, the
            GIL); None if not measured (not Linux).
        bytes: Bytes the stage handled.
    """

    count: int = 0
    items: int = 0
    failures: int = 0
    busy_s: float = 0.0
    cpu_s: float = 0.0
    runq_s: float = 0.0
    runq_known: bool = True
    switches: int | None = 0
    bytes: int = 0
    durations: _Reservoir = field(default_factory=_Reservoir, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "count": self.count,
            "items": self.items,
            "failures": self.failures,
            "busy_s": self.busy_s,
            "cpu_s": self.cpu_s,
            "runq_s": self.runq_s if self.runq_known else None,
            "blocked_s": (
                max(0.0, self.busy_s - self.cpu_s - self.runq_s) if self.runq_known else None
            ),
            "switches": self.switches,
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

    Taken with :meth:`Recorder.mark`; run delay is -1 and switches -1 where unknown.
    """

    __slots__ = ()


def _mark() -> Mark:
    return Mark((time.perf_counter(), time.thread_time(), _run_delay_s(), _voluntary_switches()))


# Returned while recording is off; a span that started before recording was switched on
# is dropped rather than measured from a bogus start.
_NO_MARK = Mark((0.0, 0.0, -1.0, -1))


class TraceEvent(tuple):
    """``(name, thread_name, start_s, end_s, args)``: one slice of the timeline."""

    __slots__ = ()


class Recorder:
    """Collects stage spans, queue waits and consumer steps from every pipeline stage.

    Besides the per-stage and per-queue figures it notes, at creation and at
    :meth:`reset`, the process CPU time, ``/proc/self/io`` and the machine-wide CPU
    counters, so a snapshot can tell host saturation and page-cache hits apart.

    Args:
        enabled: When False every hook returns at once (no timing at all). May be
            flipped at any time (``recorder.enabled = False``).
        max_events: Timeline events kept for traces (the oldest are dropped), count.

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

    def __init__(self, enabled: bool = True, max_events: int = 200_000) -> None:
        self.enabled = enabled
        self._lock = threading.Lock()
        self.stages: dict[str, StageStats] = {}
        self.queues: dict[str, QueueStats] = {}
        self.events: deque[TraceEvent] = deque(maxlen=max_events)
        self.counters: deque[tuple[str, float, float]] = deque(maxlen=max_events)
        self.extra: dict[str, Any] = {}
        self._zero()

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

    # -- stage spans ----------------------------------------------------------------

    @contextlib.contextmanager
    def span(self, stage: str, items: int = 1, nbytes: int = 0) -> Iterator[None]:
        """Time the enclosed block as one span of ``stage`` (wall and thread CPU time).

        Args:
            stage: ``"read"``, ``"transform"``, ``"collate"``, ``"copy"`` or any name.
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
        with self._lock:
            st = self.stages.get(stage)
            if st is None:
                st = self.stages[stage] = StageStats()
            st.count += 1
            st.items += items
            st.failures += failed
            st.busy_s += wall
            st.cpu_s += cpu_s
            if runq_s is None:
                st.runq_known = False
            else:
                st.runq_s += runq_s
            if switches is None or st.switches is None:
                st.switches = None
            else:
                st.switches += switches
            st.bytes += nbytes
            st.durations.add(wall)
            args: dict[str, Any] = {"items": items}
            if nbytes:
                args["bytes"] = nbytes
            if failed:
                args["failed"] = True
            self.events.append(TraceEvent((stage, name, start_s, end_s, args)))

    def mark(self) -> Mark:
        """This thread's clocks now, for :meth:`add_since` (~4 us; free when disabled)."""
        return _mark() if self.enabled else _NO_MARK

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
        Measures the same as :meth:`span` (wall, CPU, run-queue wait, blocking switches).
        """
        if not self.enabled:
            return _NO_MARK
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
            self.counters.append((name, time.perf_counter(), float(depth)))

    # -- consumer ---------------------------------------------------------------------

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
        with self._lock:
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
                self.events.append(TraceEvent(("wait", name, now - wait_s, now, {})))

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
                **self.extra,
            }

    def timeline(self) -> tuple[list[TraceEvent], list[tuple[str, float, float]]]:
        """Copies of the kept timeline events and queue-depth samples (for traces)."""
        with self._lock:
            return list(self.events), list(self.counters)

    def steps_log(self) -> list[tuple[float, float, float]]:
        """Copy of the latest ``(end_s, wait_s, step_s)`` consumer steps."""
        with self._lock:
            return list(self.step_log)

    def reset(self) -> None:
        """Forget everything recorded (e.g. after warm-up)."""
        with self._lock:
            self.stages.clear()
            self.queues.clear()
            self.events.clear()
            self.counters.clear()
            self._zero()
