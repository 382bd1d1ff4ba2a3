"""Build :class:`LoaderStats` from a live recorder or a snapshot (the impure edge).

Reads the recorder, the source's facts and, when it matters, whether the kernel
accounts storage reads; then hands plain values to the pure :func:`.analyze.analyze`,
and gathers every rank's figures under ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fastfeed.profiling import Recorder, TraceEvent
from fastfeed.stats.analyze import analyze
from fastfeed.stats.gather import dist_world
from fastfeed.stats.gather import gather as _gather
from fastfeed.stats.model import LoaderStats
from fastfeed.stats.probe import io_accounted, source_facts

__all__ = ["collect", "from_snapshot"]


def from_snapshot(
    snapshot: Mapping[str, Any],
    *,
    batch_size: int | None = None,
    num_threads: int | None = None,
    source: Any = None,
    source_kind: str | None = None,
    skipped: Iterable[Any] = (),
    device: Any = None,
    execution: Mapping[str, Any] | None = None,
    events: Sequence[TraceEvent] = (),
) -> LoaderStats:
    """Analyze a snapshot, reading ``source``'s facts first (see :func:`collect`)."""
    stats = analyze(
        snapshot,
        batch_size=batch_size,
        num_threads=num_threads,
        facts=source_facts(source, kind=source_kind),
        io_accounted=io_accounted(snapshot.get("io")),
        skipped=skipped,
        device=device,
        execution=execution,
    )
    stats._events = list(events)
    return stats


def collect(
    recorder: Recorder,
    *,
    batch_size: int | None = None,
    num_threads: int | None = None,
    source: Any = None,
    source_kind: str | None = None,
    skipped: Iterable[Any] = (),
    device: Any = None,
    execution: Mapping[str, Any] | None = None,
    gather: bool | None = None,
) -> LoaderStats:
    """Read ``recorder`` (and the source's counters) into a :class:`LoaderStats`.

    Args:
        recorder: The loader's recorder.
        batch_size: Samples per batch as the loader was configured (None: unknown).
        num_threads: Worker threads (or workers) as configured (None: unknown).
        source: The loader's source or dataset: its ``counters``, a ``MemoryCache``'s
            ``cache_stats()``, the dataset size and a pack's ``max_side`` are read.
        source_kind: ``"source"`` (a fastfeed Source), ``"dataset"`` (a plain Dataset
            behind ``fastfeed.DataLoader``) or ``"opaque"`` (``watch()``); None decides
            from ``source``. It decides which actions are offered.
        skipped: Samples skipped by ``on_error="skip"``.
        device: The target device (``"cuda"``...), or None.
        execution: How the workers ran: ``{"mode": "threads" | "processes",
            "processes": K, "reason": "..."}``, shown in the summary and JSON.
        gather: Gather every rank's figures under torch.distributed. None (default):
            when a process group is initialized with world size > 1. A collective call:
            every rank must make it.

    Returns:
        The stats, with a verdict.
    """
    snapshot = recorder.snapshot()
    events, counters = recorder.timeline()
    stats = from_snapshot(
        snapshot,
        batch_size=batch_size,
        num_threads=num_threads,
        source=source,
        source_kind=source_kind,
        skipped=skipped,
        device=device,
        execution=execution,
        events=events,
    )
    stats._counters = counters
    stats._step_log = recorder.steps_log()
    stats._t0 = recorder.started_at
    if gather is None:
        gather = dist_world() > 1
    if gather:
        _gather(stats)
    return stats
