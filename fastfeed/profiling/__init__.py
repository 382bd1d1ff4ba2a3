"""Profiling: the :class:`Recorder` every stage reports to, its event rings, the trace export.

- :mod:`.recorder`: the Recorder: queue depths, the consumer tap's (wait, step) pairs, reading;
- :mod:`.spans`: the stage hooks (spans, mark chains, one-call chains);
- :mod:`.books`: the per-thread books the hooks append to without a lock, and their folds;
- :mod:`.clocks`: the per-thread clocks a mark reads (wall, CPU, run-queue wait, switches);
- :mod:`.figures`: the cumulative per-stage and per-queue figures;
- :mod:`.rings`: the bounded reservoirs and preallocated event rings;
- :mod:`.stages`: the stage and queue names (:class:`Stage`, :class:`Queue`);
- :mod:`.gil`: the GIL probe that splits blocked time into GIL wait and IO wait;
- :mod:`.trace`: Chrome trace (``chrome://tracing`` / Perfetto) export of the recorded events.
"""

from __future__ import annotations

from fastfeed.profiling.recorder import (
    DEFAULT_MAX_EVENTS,
    Mark,
    QueueStats,
    Recorder,
    StageStats,
    TraceEvent,
)
from fastfeed.profiling.stages import Queue, Stage

__all__ = [
    "DEFAULT_MAX_EVENTS",
    "Mark",
    "Queue",
    "QueueStats",
    "Recorder",
    "Stage",
    "StageStats",
    "TraceEvent",
]
