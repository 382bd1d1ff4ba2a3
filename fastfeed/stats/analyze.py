"""Turn a :meth:`Recorder.snapshot` into :class:`LoaderStats` (pure: no clock, no IO).

Everything the analysis needs comes in as arguments: the batch size and the thread
count as the loader was configured (never guessed back from the stage counts), the
source's facts (:class:`~fastfeed.stats.probe.SourceFacts`) and whether the kernel
accounts storage reads, both read by :mod:`.collect` beforehand.

Time is classified by what it was spent on (:class:`~fastfeed.stats.model.TimeSplit`):
CPU (thread CPU time), waiting for a core (schedstat run delay), waiting for the GIL
(blocking switches x the GIL probe's cost per acquisition, capped by the blocked time)
and the rest of the blocked time, IO wait (storage, network, sleeps, locks). So the time
a user's ``__getitem__`` spends decoding counts as CPU even though its stage is "read".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from fastfeed.profiling.stages import WORKER_EXCLUDED, Stage
from fastfeed.stats.model import (
    Bottleneck,
    Bound,
    CacheSummary,
    IOSummary,
    LoaderStats,
    QueueSummary,
    StageSummary,
    TimeSplit,
    Verdict,
)
from fastfeed.stats.probe import SourceFacts
from fastfeed.stats.storage import storage_summary

__all__ = ["analyze", "cache_whatif", "worker_batches"]

_MB = 1e6
_SLOW_SIDE_RATIO = 1.5  # one side of a queue waits this much more than the other: it is slow


def cache_whatif(
    *,
    read_storage_s: float,
    read_memory_s: float,
    other_s: float,
    threads: int,
    batch_size: float,
    compute_s: float = 0.0,
    copy_s: float = 0.0,
    fractions: Iterable[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    cores: float | None = None,
    other_cpu_s: float | None = None,
    disk_s: float | None = None,
) -> list[tuple[float, float]]:
    """Predicted throughput when a fraction of the dataset is cached in RAM.

    Static policy ("fill once, never evict"): a fraction ``f`` of reads hit RAM. The
    workers' per-batch time becomes ``(1-f) x read_storage_s + f x read_memory_s +
    other_s`` spread over ``threads``; the pipeline delivers a batch every
    ``max(compute_s, worker time / threads, CPU time / cores, copy_s)`` seconds.

    Args:
        read_storage_s: Read time per batch from storage, seconds.
        read_memory_s: Read time per batch from RAM, seconds.
        other_s: Decode/transform/collate time per batch, seconds.
        threads: Worker threads (0 counts as 1: inline).
        batch_size: Samples per batch.
        compute_s: Model step time per batch, seconds (0: the loader alone).
        copy_s: Device copy time per batch (one thread), seconds.
        fractions: Cache fractions to evaluate (0..1).
        cores: Cores free for the workers (None: no cap).
        other_cpu_s: CPU time per batch of the non-read stages (for the core cap;
            None: ``other_s``).
        disk_s: Seconds per batch the disk needs at its best, whatever the threads (an
            IOPS- or bandwidth-bound disk); ``(1 - f) x disk_s`` caps the rate. None:
            more threads keep more reads in flight.

    Returns:
        ``[(fraction, samples_per_s), ...]``.
    """
    out = []
    t = max(1, threads)
    cpu = other_s if other_cpu_s is None else other_cpu_s
    for f in fractions:
        worker = (1.0 - f) * read_storage_s + f * read_memory_s + other_s
        core_bound = cpu / cores if cores else 0.0
        per_batch = max(compute_s, worker / t, core_bound, copy_s, (1.0 - f) * (disk_s or 0.0))
        out.append((f, batch_size / per_batch if per_batch > 0 else math.inf))
    return out


def worker_batches(stats: LoaderStats) -> float:
    """Batches the workers built: items / batch size, else the batches handed over."""
    items = max((s.items for n, s in stats.stages.items() if n not in WORKER_EXCLUDED), default=0)
    if stats.batch_size and items:
        return max(1.0, items / stats.batch_size)
    counts = max((s.count for n, s in stats.stages.items() if n not in WORKER_EXCLUDED), default=0)
    return float(max(1, stats.batches or counts))


def _stage(
    name: str,
    st: Mapping[str, Any],
    *,
    elapsed: float,
    threads: int,
    gil_per_acquire: float | None,
) -> StageSummary:
    busy, items = float(st["busy_s"]), int(st["items"])
    cpu = None if st.get("cpu_s") is None else float(st["cpu_s"])
    runq = None if st.get("runq_s") is None else float(st["runq_s"])
    switches = None if st.get("switches") is None else int(st["switches"])
    blocked = None if runq is None or cpu is None else max(0.0, busy - cpu - runq)
    gil = io = None
    if blocked is not None:
        if switches is not None and gil_per_acquire is not None:
            gil = min(blocked, switches * gil_per_acquire)
        io = blocked - (gil or 0.0)
    return StageSummary(
        name=str(name),
        count=int(st["count"]),
        items=items,
        failures=int(st["failures"]),
        busy_s=busy,
        cpu_s=cpu,
        runq_s=runq,
        switches=switches,
        gil_s=gil,
        io_wait_s=io,
        bytes=int(st["bytes"]),
        p50_s=float(st.get("p50_s", 0.0)),
        p90_s=float(st.get("p90_s", 0.0)),
        p99_s=float(st.get("p99_s", 0.0)),
        per_item_s=busy / items if items else 0.0,
        cpu_per_wall=None if cpu is None else (cpu / busy if busy > 0 else 0.0),
        blocked_fraction=None if blocked is None or busy <= 0 else blocked / busy,
        utilization=busy / (elapsed * max(1, threads)),
        rate_items_per_s=items / elapsed,
        mb_per_s=int(st["bytes"]) / _MB / elapsed,
        threads=threads,
    )


def _queue(name: str, q: Mapping[str, Any], elapsed: float) -> QueueSummary:
    put, get = float(q["put_wait_s"]), float(q["get_wait_s"])
    if put > _SLOW_SIDE_RATIO * get and put > 0.01 * elapsed:
        side = "consumer"
    elif get > _SLOW_SIDE_RATIO * put and get > 0.01 * elapsed:
        side = "producer"
    else:
        side = "balanced"
    return QueueSummary(
        name=str(name),
        put_wait_s=put,
        get_wait_s=get,
        mean_depth=float(q["mean_depth"]),
        capacity=int(q["capacity"]),
        occupancy=float(q["occupancy"]),
        slow_side=side,
    )


def _sum_split(stages: Iterable[StageSummary]) -> TimeSplit | None:
    """The stages' time by class, summed; stages whose CPU time was never measured
    count in the same proportions as the measured ones (scaled by busy time)."""
    stages = list(stages)
    measured = [s for s in stages if s.cpu_s is not None]
    if not measured:
        return None
    busy_all = sum(s.busy_s for s in stages)
    busy_measured = sum(s.busy_s for s in measured)
    scale = busy_all / busy_measured if busy_measured > 0 else 1.0

    def total(values: list[float | None]) -> float | None:
        if any(v is None for v in values):
            return None
        return scale * sum(v or 0.0 for v in values)

    return TimeSplit(
        cpu_s=scale * sum(s.cpu_s or 0.0 for s in measured),
        runq_s=total([s.runq_s for s in measured]),
        gil_s=total([s.gil_s for s in measured]),
        io_s=total([s.io_wait_s for s in measured]),
    )


def _cache(d: Mapping[str, Any] | None) -> CacheSummary | None:
    if d is None:
        return None
    hits, misses = int(d.get("hits", 0)), int(d.get("misses", 0))
    return CacheSummary(
        hits=hits,
        misses=misses,
        hit_rate=float(d.get("hit_rate", hits / (hits + misses) if hits + misses else 0.0)),
        bytes_cached=int(d.get("bytes_cached", 0)),
        capacity_bytes=int(d.get("capacity_bytes", 0)),
        policy=str(d.get("policy", "")),
    )


def _io(
    io: Mapping[str, int] | None,
    stages: Mapping[str, StageSummary],
    facts: SourceFacts,
    accounted: bool | None,
) -> IOSummary | None:
    if io is None:
        return None
    rchar, read_bytes = int(io["rchar"]), int(io["read_bytes"])
    requested = facts.storage_bytes or 0
    if not requested and Stage.READ in stages:
        requested = stages[Stage.READ].bytes
    if not requested:
        requested = rchar
    if requested <= 0:
        return IOSummary(requested, rchar, read_bytes, None, "unknown", "nothing read yet")
    if read_bytes > 0:
        hit = min(1.0, max(0.0, 1.0 - read_bytes / requested))
        return IOSummary(requested, rchar, read_bytes, hit, "ok", "from /proc/self/io")
    if accounted:
        return IOSummary(
            requested, rchar, 0, 1.0, "ok", "nothing fetched from storage: all page-cache hits"
        )
    note = (
        "read_bytes is not accounted on this system (container or overlay/FUSE filesystem)"
        if accounted is False
        else "could not check whether read_bytes is accounted here"
    )
    return IOSummary(requested, rchar, 0, None, "unknown", note)


def analyze(
    snapshot: Mapping[str, Any],
    *,
    batch_size: int | None = None,
    num_threads: int | None = None,
    facts: SourceFacts | None = None,
    io_accounted: bool | None = None,
    skipped: Iterable[Any] = (),
    device: Any = None,
    execution: Mapping[str, Any] | None = None,
) -> LoaderStats:
    """Analyze a :meth:`Recorder.snapshot` dict into :class:`LoaderStats` with a verdict.

    Args:
        snapshot: A recorder snapshot (possibly edited, e.g. in tests).
        batch_size: Samples per batch as configured (None: unknown, e.g. ``watch()``).
        num_threads: Worker threads as configured (None: unknown).
        facts: What is known about the source (:func:`~fastfeed.stats.probe.source_facts`).
        io_accounted: Whether ``read_bytes`` counts storage reads here (None: unknown).
        skipped: Samples skipped by ``on_error="skip"``: indices, or entries with an
            ``index`` attribute.
        device: The target device, or None.
        execution: How the workers ran (``{"mode", "processes", "reason"}``), or None.
    """
    from fastfeed.stats.diagnose import diagnose, neighbour, whatif

    facts = facts or SourceFacts()
    elapsed = max(float(snapshot.get("elapsed_s", 0.0)), 1e-9)
    cpu_count = int(snapshot.get("cpu_count") or 1)
    threads = max(1, num_threads or 1)
    gil = snapshot.get("gil") or {}
    per_acquire = gil.get("wait_per_acquire_s")
    per_acquire = None if per_acquire is None else float(per_acquire)

    stages = {
        str(name): _stage(
            name,
            st,
            elapsed=elapsed,
            threads=1 if name == Stage.COPY else threads,
            gil_per_acquire=per_acquire,
        )
        for name, st in snapshot.get("stages", {}).items()
    }
    queues = {str(n): _queue(n, q, elapsed) for n, q in snapshot.get("queues", {}).items()}

    steps = int(snapshot.get("steps", 0))
    batches = steps + int(snapshot.get("first_batches", 0))
    step_s = float(snapshot.get("step_s", 0.0))
    step_wait = float(snapshot.get("step_wait_s", snapshot.get("wait_s", 0.0)))
    worker_stages = [s for n, s in stages.items() if n not in WORKER_EXCLUDED]
    if batches == 0 and worker_stages:  # the loader alone: no consumer counted batches
        items = max(s.items for s in worker_stages)
        batches = (
            math.ceil(items / batch_size) if batch_size else max(s.count for s in worker_stages)
        )
    # What reached the batches: the collate stage counts the samples it collated; the
    # read and transform stages also count samples that failed and were skipped.
    collated = stages.get(str(Stage.COLLATE))
    delivered = (collated.items if collated is not None else 0) or max(
        (s.items for s in worker_stages), default=0
    )
    if batch_size:
        samples = batches * batch_size
        if worker_stages:  # the last batch of an epoch may be short; skips make it shorter
            samples = min(samples, delivered) or samples
    else:
        samples = delivered

    process_cpu = float(snapshot.get("process_cpu_s", 0.0))
    machine_busy = snapshot.get("machine_busy")
    others = None
    if machine_busy is not None:
        others = max(0.0, float(machine_busy) * cpu_count - process_cpu / elapsed)

    skipped_list = [int(getattr(i, "index", i)) for i in skipped]
    stats = LoaderStats(
        elapsed_s=elapsed,
        steps=steps,
        batches=batches,
        samples=samples,
        stall_fraction=step_wait / step_s if step_s > 0 else 0.0,
        wait_s=step_wait,
        startup_wait_s=float(snapshot.get("startup_wait_s", 0.0)),
        step_s=step_s,
        compute_per_step_s=(step_s - step_wait) / steps if steps else 0.0,
        step_p50_s=float(snapshot.get("step_time", {}).get("p50", 0.0)),
        step_p99_s=float(snapshot.get("step_time", {}).get("p99", 0.0)),
        wait_p50_s=float(snapshot.get("step_wait", {}).get("p50", 0.0)),
        wait_p99_s=float(snapshot.get("step_wait", {}).get("p99", 0.0)),
        samples_per_s=samples / elapsed,
        num_threads=num_threads,
        cpu_count=cpu_count,
        process_cpu_s=process_cpu,
        host_busy=process_cpu / (elapsed * cpu_count),
        machine_busy=None if machine_busy is None else float(machine_busy),
        stages=stages,
        queues=queues,
        io=_io(snapshot.get("io"), stages, facts, io_accounted),
        storage=storage_summary(snapshot.get("storage")),
        cache=_cache(facts.cache),
        source=facts.counters,
        skipped=len(skipped_list),
        skipped_indices=skipped_list[:20],
        device=None if device is None else str(device),
        verdict=Verdict(Bound.UNKNOWN, Bottleneck.NONE, 0.0, ""),
        batch_size=batch_size,
        others_cores=others,
        gil_wait_per_acquire_s=per_acquire,
        workers=_sum_split(worker_stages),
        execution=None if execution is None else dict(execution),
    )
    stats.neighbour = neighbour(stats, snapshot.get("consumer"), facts)
    stats.verdict = diagnose(stats, facts)
    stats.whatif = whatif(stats, facts)
    return stats
