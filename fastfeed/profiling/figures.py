"""Cumulative figures per stage and per queue, as the recorder keeps them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastfeed.profiling.rings import _Reservoir

__all__ = ["QueueStats", "StageStats"]


@dataclass
class StageStats:
    """Cumulative figures of one stage (read, decode, transform, collate, copy...).

    CPU time, run-queue wait and switches are measured on a sample of the spans (every
    span of :meth:`Recorder.span`; one ``mark`` chain in :data:`SCHED_SAMPLE_EVERY` per
    thread for :meth:`Recorder.add_since`) and :meth:`to_dict` scales them to the stage's
    whole busy time.

    Attributes:
        count: Spans recorded (usually batches).
        items: Samples processed.
        failures: Spans that raised.
        busy_s: Wall time inside the stage, summed over threads, seconds.
        cpu_s: Thread CPU time inside the stage during the spans that measured it,
            seconds. ``cpu_s / cpu_busy_s`` well below 1 means waiting: on IO, on the
            GIL, or for a free core.
        cpu_busy_s: Wall time of the spans that measured ``cpu_s``, seconds.
        cpu_spans: Spans that measured ``cpu_s``.
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
    cpu_busy_s: float = 0.0
    cpu_spans: int = 0
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

        ``cpu_s`` / ``runq_s`` / ``blocked_s`` / ``switches`` / ``cpu_per_wall`` are None
        when never measured.
        """
        cpu_scale = self._scale(self.cpu_busy_s, self.cpu_spans)
        cpu = None if cpu_scale is None else self.cpu_s * cpu_scale
        runq_scale = self._scale(self.runq_busy_s, self.runq_spans)
        sw_scale = self._scale(self.switches_busy_s, self.switches_spans)
        runq = None if runq_scale is None else self.runq_s * runq_scale
        out = {
            "count": self.count,
            "items": self.items,
            "failures": self.failures,
            "busy_s": self.busy_s,
            "cpu_s": cpu,
            "runq_s": runq,
            "blocked_s": (
                None if runq is None or cpu is None else max(0.0, self.busy_s - cpu - runq)
            ),
            "switches": None if sw_scale is None else round(self.switches * sw_scale),
            "bytes": self.bytes,
            "cpu_per_wall": cpu / self.busy_s if cpu is not None and self.busy_s > 0 else None,
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
