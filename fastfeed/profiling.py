"""In-training hooks: every pipeline stage reports to a :class:`Recorder`.

The recorder owns no stage. Stages call :meth:`Recorder.span` (per batch, not per
sample, so the cost stays far below 1% of a batch), queues report put-wait vs get-wait
(which side is slow), and the consumer reports how long each step waited for its batch.
Everything is kept as cumulative counters plus bounded reservoirs (for percentiles)
and a bounded ring of timeline events (for Chrome traces).
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["QueueStats", "Recorder", "StageStats", "TraceEvent"]

_RESERVOIR = 2048


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
            1 while busy means waiting: on IO, or on the GIL.
        bytes: Bytes the stage handled.
    """

    count: int = 0
    items: int = 0
    failures: int = 0
    busy_s: float = 0.0
    cpu_s: float = 0.0
    bytes: int = 0
    durations: _Reservoir = field(default_factory=_Reservoir, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "count": self.count,
            "items": self.items,
            "failures": self.failures,
            "busy_s": self.busy_s,
            "cpu_s": self.cpu_s,
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


class TraceEvent(tuple):
    """``(name, thread_name, start_s, end_s, args)``: one slice of the timeline."""

    __slots__ = ()


class Recorder:
    """Collects stage spans, queue waits and consumer steps from every pipeline stage.

    Args:
        enabled: When False every hook returns at once (no timing at all).
        max_events: Timeline events kept for traces (the oldest are dropped), count.
    """

    def __init__(self, enabled: bool = True, max_events: int = 200_000) -> None:
        self.enabled = enabled
        self._lock = threading.Lock()
        self.stages: dict[str, StageStats] = {}
        self.queues: dict[str, QueueStats] = {}
        self.events: deque[TraceEvent] = deque(maxlen=max_events)
        self.counters: deque[tuple[str, float, float]] = deque(maxlen=max_events)
        self.steps = 0
        self.wait_s = 0.0
        self.step_s = 0.0
        self.step_waits = _Reservoir()
        self.step_times = _Reservoir()
        self.started_at = time.perf_counter()
        self.extra: dict[str, Any] = {}

    # -- stage spans ----------------------------------------------------------------

    @contextlib.contextmanager
    def span(self, stage: str, items: int = 1, nbytes: int = 0) -> Iterator[None]:
        """Time the enclosed block as one span of ``stage`` (wall and thread CPU time)."""
        if not self.enabled:
            yield
            return
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
    ) -> None:
        """Record one span measured by the caller (``perf_counter`` times, seconds)."""
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
            st.bytes += nbytes
            st.durations.add(wall)
            self.events.append(TraceEvent((stage, name, start_s, end_s, {"items": items})))

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
        """Report one batch handed to the training loop.

        Args:
            wait_s: How long the training loop was blocked waiting for it, seconds.
            step_s: Time since the previous batch was handed over (one training step),
                seconds; None for the first batch of an epoch.
        """
        if not self.enabled:
            return
        with self._lock:
            self.wait_s += wait_s
            self.step_waits.add(wait_s)
            if step_s is not None:
                self.steps += 1
                self.step_s += step_s
                self.step_times.add(step_s)

    # -- reading ----------------------------------------------------------------------

    @property
    def stall_fraction(self) -> float:
        """Fraction of step time the training loop spent waiting for input (0..1)."""
        with self._lock:
            return self.wait_s / self.step_s if self.step_s > 0 else 0.0

    def snapshot(self) -> dict[str, Any]:
        """A JSON-serializable copy of everything recorded so far."""
        with self._lock:
            return {
                "elapsed_s": time.perf_counter() - self.started_at,
                "steps": self.steps,
                "wait_s": self.wait_s,
                "step_s": self.step_s,
                "stall_fraction": self.wait_s / self.step_s if self.step_s > 0 else 0.0,
                "step_wait": self.step_waits.percentiles(),
                "step_time": self.step_times.percentiles(),
                "stages": {k: v.to_dict() for k, v in self.stages.items()},
                "queues": {k: v.to_dict() for k, v in self.queues.items()},
                **self.extra,
            }

    def reset(self) -> None:
        """Forget everything recorded (e.g. after warm-up)."""
        with self._lock:
            self.stages.clear()
            self.queues.clear()
            self.events.clear()
            self.counters.clear()
            self.steps = 0
            self.wait_s = self.step_s = 0.0
            self.step_waits = _Reservoir()
            self.step_times = _Reservoir()
            self.started_at = time.perf_counter()
