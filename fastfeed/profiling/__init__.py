"""Profiling: the :class:`Recorder` every stage reports to, its event rings, the trace export.

- :mod:`.recorder`: spans, marks, queue depths and the consumer tap's (wait, step) pairs.
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

__all__ = ["DEFAULT_MAX_EVENTS", "Mark", "QueueStats", "Recorder", "StageStats", "TraceEvent"]
