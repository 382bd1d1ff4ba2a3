"""Hand-made recorder snapshots with known per-batch figures, for the rule tests."""

from __future__ import annotations

import copy
from typing import Any

from fastfeed.stats import LoaderStats
from fastfeed.stats.analyze import analyze
from fastfeed.stats.probe import SourceFacts


def stage(
    busy: float, cpu: float, runq: float = 0.0, switches: int = 0, nbytes: int = 0
) -> dict[str, Any]:
    """One stage over 101 batches of 10 samples."""
    return {
        "count": 101,
        "items": 1010,
        "failures": 0,
        "busy_s": busy,
        "cpu_s": cpu,
        "runq_s": runq,
        "switches": switches,
        "bytes": nbytes,
        "p50_s": busy / 101,
        "p90_s": busy / 101,
        "p99_s": busy / 101,
    }


def snapshot(**over: Any) -> dict[str, Any]:
    """100 steps of batch 10: 100 ms per step, 50 ms of it waiting (50% stall).

    Per batch: read 10 ms, transform 390 ms (on 4 threads: 100 ms between batches); 8
    cores, nothing else running; the GIL free (0 ms per acquisition).
    """
    snap: dict[str, Any] = {
        "elapsed_s": 10.0,
        "process_cpu_s": 4.0,
        "cpu_count": 8,
        "machine_busy": 0.05,  # 0.4 cores: exactly this process
        "io": None,
        "steps": 100,
        "first_batches": 1,
        "wait_s": 5.0,
        "step_wait_s": 5.0,
        "startup_wait_s": 0.0,
        "step_s": 10.0,
        "step_time": {"p50": 0.1, "p90": 0.1, "p99": 0.1},
        "step_wait": {"p50": 0.05, "p90": 0.05, "p99": 0.05},
        "stages": {"read": stage(1.01, 1.0), "transform": stage(39.39, 39.0)},
        "queues": {},
        "gil": {"wakeups": 1000, "wait_per_acquire_s": 0.0, "runq_s": 0.0},
    }
    snap.update(copy.deepcopy(over))
    return snap


def stats_of(
    snap: dict[str, Any], threads: int = 4, kind: str = "source", **facts: Any
) -> LoaderStats:
    return analyze(
        snap,
        batch_size=10,
        num_threads=threads,
        facts=SourceFacts(kind=kind, **facts),
    )
