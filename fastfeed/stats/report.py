"""What the recorded numbers mean: :class:`LoaderStats`, its :class:`Verdict` and summary.

``loader.stats()`` returns a :class:`LoaderStats` built by :meth:`LoaderStats.collect`
from the loader's :class:`~fastfeed.profiling.Recorder`. The verdict comes from the
measured fractions:

- **compute-bound**: the training loop waits for data < 5% of its step time;
- **partially input-bound**: 5-20%;
- **input-bound**: >= 20%;

and, when input bound, which side supplies too slowly:

- **io**: the read stage dominates the workers' time (storage; CPU/wall in read is low);
- **cpu**: decode/transform dominates and more threads would help;
- **gil**: decode/transform dominates and its threads sit *blocked* (neither running nor
  waiting for a core: the GIL) — more threads will not help, processes or GIL-releasing
  ops will;
- **host-saturated**: decode/transform dominates and every core is busy (process CPU
  time / (wall x cores) near 1, or threads waiting in the run queue) — more threads
  will not help, less work per sample will;
- **copy**: the host-to-device copy takes longer per batch than the workers.

Each verdict names the next actions with the gain predicted from the same numbers
(threads needed = ceil(per-batch worker time / per-step compute time), the cache
fraction that removes the read stall, ...).

Under ``torch.distributed`` (a process group initialized, world size > 1),
:meth:`LoaderStats.collect` gathers every rank's figures with ``all_gather_object`` and
names the slowest rank and the stragglers. That makes it a *collective*: every rank
must call it (pass ``gather=False`` to stay local).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from fastfeed._procio import io_accounting_works
from fastfeed.profiling import Recorder, TraceEvent

__all__ = [
    "Action",
    "Bottleneck",
    "Bound",
    "CacheSummary",
    "IOSummary",
    "LoaderStats",
    "QueueSummary",
    "RankSummary",
    "StageSummary",
    "Verdict",
    "cache_whatif",
]

COMPUTE_BOUND_BELOW = 0.05  # stall fraction under which the model, not input, sets the pace
INPUT_BOUND_FROM = 0.20  # stall fraction from which input sets the pace
_HOST_BUSY = 0.85  # share of all cores busy that counts as saturated
_RUNQ_SATURATED = 0.25  # share of busy time spent runnable-but-not-running: oversubscribed
_GIL_SWITCHES_PER_S = 30.0  # voluntary switches per busy second in transform: blocking
_BLOCKED_GIL = 0.20  # share of transform busy time blocked (not running, not runnable)
_WORKER_STAGES_EXCLUDED = frozenset({"copy", "wait"})
_CPU_STAGES_EXCLUDED = frozenset({"read", "copy", "wait"})
_MB = 1e6


class Bound(str, Enum):
    """Who sets the pace: the model (compute) or the input pipeline."""

    COMPUTE = "compute-bound"
    PARTIAL = "partially-input-bound"
    INPUT = "input-bound"
    UNKNOWN = "unknown"


class Bottleneck(str, Enum):
    """The input stage that limits supply (``NONE`` when compute bound)."""

    NONE = "none"
    IO = "io"
    CPU = "cpu"
    GIL = "gil"
    HOST = "host-saturated"
    COPY = "copy"


@dataclass(frozen=True)
class Action:
    """One next step and what it should buy.

    Attributes:
        text: What to do (``"raise threads from 4 to 8"``).
        expected: The predicted effect in words, with numbers.
        speedup: Predicted throughput ratio (new / now), when it can be computed.
    """

    text: str
    expected: str
    speedup: float | None = None

    def __str__(self) -> str:
        return f"{self.text} — {self.expected}"


@dataclass(frozen=True)
class Verdict:
    """The diagnosis: who sets the pace, which stage, and what to do next.

    Attributes:
        bound: Compute-bound, partially input-bound, input-bound (or unknown: no steps).
        bottleneck: The limiting input stage; ``Bottleneck.NONE`` when compute bound.
        stall_fraction: Share of step time the training loop waited for data (0..1).
        sentence: One human sentence with the deciding numbers.
        actions: Next steps, most promising first.
    """

    bound: Bound
    bottleneck: Bottleneck
    stall_fraction: float
    sentence: str
    actions: tuple[Action, ...] = ()

    def matches(self, name: str) -> bool:
        """Whether ``name`` describes this verdict.

        ``name`` is a bound (``compute-bound``, ``partially-input-bound``,
        ``input-bound``) or a bottleneck (``io``, ``cpu``, ``gil``, ``host-saturated``,
        ``copy``); a bottleneck matches only while the verdict is (partially) input bound.
        """
        name = name.strip().lower()
        if name == self.bound.value:
            return True
        return self.bound in (Bound.PARTIAL, Bound.INPUT) and name == self.bottleneck.value

    def to_dict(self) -> dict[str, Any]:
        return {
            "bound": self.bound.value,
            "bottleneck": self.bottleneck.value,
            "stall_fraction": self.stall_fraction,
            "sentence": self.sentence,
            "actions": [
                {"text": a.text, "expected": a.expected, "speedup": a.speedup} for a in self.actions
            ],
        }

    def __str__(self) -> str:
        return self.sentence


@dataclass(frozen=True)
class StageSummary:
    """One stage's figures.

    Attributes:
        name: Stage name.
        count: Spans (usually batches).
        items: Samples.
        failures: Spans that raised.
        busy_s: Wall time in the stage summed over threads, seconds.
        cpu_s: Thread CPU time in the stage, seconds.
        runq_s: Time runnable but without a core, seconds (None if not measured).
        switches: Voluntary context switches (blocking) in the stage (None if not measured).
        bytes: Bytes handled.
        p50_s: Median span duration, seconds (p90_s, p99_s alike).
        per_item_s: ``busy_s / items``, seconds per sample.
        cpu_per_wall: ``cpu_s / busy_s``: ~1 computing; low: waiting (IO, GIL, cores).
        blocked_fraction: Share of busy time neither running nor runnable (IO, GIL);
            None if run-queue time was not measured.
        utilization: ``busy_s / (elapsed_s x threads)``: how busy the stage keeps its threads.
        rate_items_per_s: Samples through the stage per second of elapsed time.
        mb_per_s: Megabytes (1e6) through the stage per second of elapsed time.
        threads: Distinct threads seen running the stage in the kept timeline.
    """

    name: str
    count: int
    items: int
    failures: int
    busy_s: float
    cpu_s: float
    runq_s: float | None
    switches: int | None
    bytes: int
    p50_s: float
    p90_s: float
    p99_s: float
    per_item_s: float
    cpu_per_wall: float
    blocked_fraction: float | None
    utilization: float
    rate_items_per_s: float
    mb_per_s: float
    threads: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class QueueSummary:
    """One queue between stages.

    Attributes:
        name: Queue name (``batches``: workers to consumer; ``staged``: stager to consumer).
        put_wait_s: Producers blocked on a full queue (the consumer side is slow), seconds.
        get_wait_s: Consumers blocked on an empty queue (the producer side is slow), seconds.
        mean_depth: Mean depth sampled at each put/get.
        capacity: The queue's bound.
        occupancy: ``mean_depth / capacity`` (0..1).
        slow_side: ``"producer"``, ``"consumer"`` or ``"balanced"``.
    """

    name: str
    put_wait_s: float
    get_wait_s: float
    mean_depth: float
    capacity: int
    occupancy: float
    slow_side: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class IOSummary:
    """Bytes requested vs bytes fetched from storage (``/proc/self/io``).

    Attributes:
        requested_bytes: Bytes the pipeline asked its storage source for.
        rchar: Bytes returned by read syscalls of the whole process (page cache or not).
        read_bytes: Bytes the kernel fetched from storage for this process.
        page_cache_hit: ``1 - read_bytes / requested_bytes`` (0..1), or None when unknown.
        status: ``"ok"``, ``"unknown"`` (``read_bytes`` is not accounted here: some
            containers and overlay/FUSE/network filesystems) or ``"unavailable"``
            (no ``/proc/self/io``).
        note: A short explanation of the status.
    """

    requested_bytes: int
    rchar: int
    read_bytes: int
    page_cache_hit: float | None
    status: str
    note: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class CacheSummary:
    """The in-RAM cache's figures (from ``MemoryCache.cache_stats()``).

    Attributes:
        hits: Reads served from RAM.
        misses: Reads that went to the wrapped source.
        hit_rate: ``hits / (hits + misses)``.
        bytes_cached: Bytes held.
        capacity_bytes: The byte budget.
        policy: ``"static"`` or ``"lru"``.
    """

    hits: int
    misses: int
    hit_rate: float
    bytes_cached: int
    capacity_bytes: int
    policy: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class RankSummary:
    """One rank's headline figures under torch.distributed.

    Attributes:
        rank: The rank.
        stall_fraction: Its training loop's share of step time waiting for data.
        wait_per_step_s: Mean wait per step, seconds.
        step_mean_s: Mean step time, seconds.
        samples_per_s: Samples delivered per second of elapsed time.
        bound: Its verdict's bound.
        bottleneck: Its verdict's bottleneck.
    """

    rank: int
    stall_fraction: float
    wait_per_step_s: float
    step_mean_s: float
    samples_per_s: float
    bound: str
    bottleneck: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def cache_whatif(
    *,
    read_storage_s: float,
    read_memory_s: float,
    other_s: float,
    threads: int,
    batch_size: float,
    compute_s: float = 0.0,
    copy_s: float = 0.0,
    fractions: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
) -> list[tuple[float, float]]:
    """Predicted throughput when a fraction of the dataset is cached in RAM.

    Static policy ("fill once, never evict"): a fraction ``f`` of reads hit RAM. The
    workers' per-batch time becomes ``(1-f) x read_storage_s + f x read_memory_s +
    other_s`` spread over ``threads``; the pipeline delivers a batch every
    ``max(compute_s, worker time / threads, copy_s)`` seconds.

    Args:
        read_storage_s: Read time per batch from storage, seconds.
        read_memory_s: Read time per batch from RAM, seconds.
        other_s: Decode/transform/collate time per batch, seconds.
        threads: Worker threads (0 counts as 1: inline).
        batch_size: Samples per batch.
        compute_s: Model step time per batch, seconds (0: the loader alone).
        copy_s: Device copy time per batch (one thread), seconds.
        fractions: Cache fractions to evaluate (0..1).

    Returns:
        ``[(fraction, samples_per_s), ...]``.
    """
    out = []
    t = max(1, threads)
    for f in fractions:
        worker = (1.0 - f) * read_storage_s + f * read_memory_s + other_s
        per_batch = max(compute_s, worker / t, copy_s)
        out.append((f, batch_size / per_batch if per_batch > 0 else math.inf))
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _ms(x: float) -> str:
    return f"{1e3 * x:.1f} ms" if x < 10 else f"{x:.1f} s"


def _find_cache(source: Any) -> Any:
    """The first object along ``source.source`` links that has ``cache_stats()``."""
    obj, seen = source, 0
    while obj is not None and seen < 8:
        if callable(getattr(obj, "cache_stats", None)):
            return obj
        obj, seen = getattr(obj, "source", None), seen + 1
    return None


def _innermost(source: Any) -> Any:
    obj, seen = source, 0
    while getattr(obj, "source", None) is not None and seen < 8:
        obj, seen = obj.source, seen + 1
    return obj


def _dataset_bytes(source: Any) -> int | None:
    """Total record bytes of ``source`` if cheaply known (``record_sizes()``), else None."""
    inner = _innermost(source)
    sizes = getattr(inner, "record_sizes", None)
    if callable(sizes):
        try:
            return int(sum(sizes()))
        except Exception:  # a best-effort figure; never fail stats over it
            return None
    return None


def _format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


@dataclass
class LoaderStats:
    """Everything the loader measured, with a verdict. Build with :meth:`collect`.

    Attributes:
        elapsed_s: Wall time covered (since the recorder started or was reset), seconds.
        steps: Training steps measured (batches after each epoch's first).
        batches: Batches handed to the training loop.
        samples: Samples handed over (estimated from the stages when not reported).
        stall_fraction: Share of step time the training loop waited for data (0..1).
        wait_s: Steady-state waiting, summed over steps, seconds.
        startup_wait_s: Waiting for each epoch's first batch, seconds.
        step_s: Step time summed (wait + compute), seconds.
        compute_per_step_s: Mean time the training loop spent outside the wait, seconds.
        step_p50_s: Median step time, seconds (``step_p99_s``, ``wait_p50_s``,
            ``wait_p99_s`` alike).
        samples_per_s: Samples delivered per elapsed second.
        num_threads: Worker threads (None when unknown).
        cpu_count: Cores of the machine.
        process_cpu_s: CPU time of the whole process over ``elapsed_s``, seconds.
        host_busy: ``process_cpu_s / (elapsed_s x cpu_count)`` (0..1).
        machine_busy: Share of all cores busy machine-wide, any process (None if unknown).
        stages: Per-stage figures.
        queues: Per-queue figures.
        io: Storage vs page cache (None when ``/proc/self/io`` is unavailable).
        cache: The in-RAM cache's hits and misses (None without a cache).
        source: The source's read counters (reads, bytes, time_s, calls), if given.
        skipped: Samples skipped by ``on_error="skip"``.
        skipped_indices: The first skipped indices (up to 20).
        device: The target device, as a string, or None.
        verdict: The diagnosis.
        whatif: ``[(cache_fraction, predicted_samples_per_s)]``, when the read stage was seen.
        rank: This process's rank (0 without torch.distributed).
        world_size: Ranks gathered (1 without torch.distributed).
        ranks: Every rank's headline figures (empty when not gathered).
        slowest_rank: The rank that waits most per step (None when not gathered).
        stragglers: Ranks waiting markedly longer than the median rank.
        extra: Further figures (e.g. the ``fastfeed profile`` phases).
    """

    elapsed_s: float
    steps: int
    batches: int
    samples: int
    stall_fraction: float
    wait_s: float
    startup_wait_s: float
    step_s: float
    compute_per_step_s: float
    step_p50_s: float
    step_p99_s: float
    wait_p50_s: float
    wait_p99_s: float
    samples_per_s: float
    num_threads: int | None
    cpu_count: int
    process_cpu_s: float
    host_busy: float
    machine_busy: float | None
    stages: dict[str, StageSummary]
    queues: dict[str, QueueSummary]
    io: IOSummary | None
    cache: CacheSummary | None
    source: dict[str, Any] | None
    skipped: int
    skipped_indices: list[int]
    device: str | None
    verdict: Verdict
    whatif: list[tuple[float, float]] = field(default_factory=list)
    rank: int = 0
    world_size: int = 1
    ranks: list[RankSummary] = field(default_factory=list)
    slowest_rank: int | None = None
    stragglers: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    _events: list[TraceEvent] = field(default_factory=list, repr=False)
    _counters: list[tuple[str, float, float]] = field(default_factory=list, repr=False)
    _step_log: list[tuple[float, float, float]] = field(default_factory=list, repr=False)
    _t0: float = field(default=0.0, repr=False)

    # -- building -------------------------------------------------------------------

    @classmethod
    def collect(
        cls,
        recorder: Recorder,
        *,
        source: Any = None,
        num_threads: int | None = None,
        skipped: Iterable[int] = (),
        device: Any = None,
        gather: bool | None = None,
    ) -> LoaderStats:
        """Read ``recorder`` (and the source's counters) into a :class:`LoaderStats`.

        Args:
            recorder: The loader's recorder.
            source: The loader's source: its ``counters``, a ``MemoryCache``'s
                ``cache_stats()`` and the dataset size (``record_sizes()``) are read.
            num_threads: Worker threads; None guesses from the threads seen in the timeline.
            skipped: Samples skipped by ``on_error="skip"``: indices, or entries with an
                ``index`` attribute (``Loader.skipped``).
            device: The target device (``"cuda"``...), or None.
            gather: Gather every rank's figures under torch.distributed. None (default):
                when a process group is initialized with world size > 1. This is a
                collective call: every rank must make it, or the others wait until the
                process group's timeout.

        Returns:
            The stats, with a verdict.
        """
        snapshot = recorder.snapshot()
        events, counters = recorder.timeline()
        stats = cls.from_snapshot(
            snapshot,
            source=source,
            num_threads=num_threads,
            skipped=skipped,
            device=device,
            events=events,
        )
        stats._events = events
        stats._counters = counters
        stats._step_log = recorder.steps_log()
        stats._t0 = recorder.started_at
        if gather is None:
            gather = _dist_world() > 1
        if gather:
            stats._gather()
        return stats

    @classmethod
    def from_snapshot(
        cls,
        snapshot: Mapping[str, Any],
        *,
        source: Any = None,
        num_threads: int | None = None,
        skipped: Iterable[int] = (),
        device: Any = None,
        events: Sequence[TraceEvent] = (),
    ) -> LoaderStats:
        """Analyze a :meth:`Recorder.snapshot` dict (pure: no clock, no IO but the source's).

        Args:
            snapshot: A recorder snapshot (possibly edited, e.g. in tests).
            source: See :meth:`collect`.
            num_threads: See :meth:`collect`.
            skipped: See :meth:`collect`.
            device: See :meth:`collect`.
            events: Timeline events, used to count threads per stage.
        """
        elapsed = max(float(snapshot.get("elapsed_s", 0.0)), 1e-9)
        cpu_count = int(snapshot.get("cpu_count") or os.cpu_count() or 1)
        threads_seen: dict[str, set[str]] = {}
        for ev in events:
            threads_seen.setdefault(ev[0], set()).add(ev[1])
        worker_threads = set().union(
            *(v for k, v in threads_seen.items() if k not in _WORKER_STAGES_EXCLUDED)
        )
        threads = num_threads if num_threads is not None else (len(worker_threads) or None)

        stages: dict[str, StageSummary] = {}
        for name, st in snapshot.get("stages", {}).items():
            busy, cpu, items = float(st["busy_s"]), float(st["cpu_s"]), int(st["items"])
            runq = st.get("runq_s")
            n_threads = len(threads_seen.get(name, ())) or (1 if name == "copy" else (threads or 1))
            stages[name] = StageSummary(
                name=name,
                count=int(st["count"]),
                items=items,
                failures=int(st["failures"]),
                busy_s=busy,
                cpu_s=cpu,
                runq_s=None if runq is None else float(runq),
                switches=None if st.get("switches") is None else int(st["switches"]),
                bytes=int(st["bytes"]),
                p50_s=float(st.get("p50_s", 0.0)),
                p90_s=float(st.get("p90_s", 0.0)),
                p99_s=float(st.get("p99_s", 0.0)),
                per_item_s=busy / items if items else 0.0,
                cpu_per_wall=cpu / busy if busy > 0 else 0.0,
                blocked_fraction=(
                    None if runq is None or busy <= 0 else max(0.0, busy - cpu - runq) / busy
                ),
                utilization=busy / (elapsed * max(1, n_threads)),
                rate_items_per_s=items / elapsed,
                mb_per_s=int(st["bytes"]) / _MB / elapsed,
                threads=n_threads,
            )

        queues: dict[str, QueueSummary] = {}
        for name, q in snapshot.get("queues", {}).items():
            put, get = float(q["put_wait_s"]), float(q["get_wait_s"])
            if put > 1.5 * get and put > 0.01 * elapsed:
                side = "consumer"
            elif get > 1.5 * put and get > 0.01 * elapsed:
                side = "producer"
            else:
                side = "balanced"
            queues[name] = QueueSummary(
                name=name,
                put_wait_s=put,
                get_wait_s=get,
                mean_depth=float(q["mean_depth"]),
                capacity=int(q["capacity"]),
                occupancy=float(q["occupancy"]),
                slow_side=side,
            )

        steps = int(snapshot.get("steps", 0))
        batches = steps + int(snapshot.get("first_batches", 0))
        step_s = float(snapshot.get("step_s", 0.0))
        step_wait = float(snapshot.get("step_wait_s", snapshot.get("wait_s", 0.0)))
        stall = step_wait / step_s if step_s > 0 else 0.0
        compute = (step_s - step_wait) / steps if steps else 0.0
        worker_items = [s.items for n, s in stages.items() if n not in _WORKER_STAGES_EXCLUDED]
        worker_counts = [s.count for n, s in stages.items() if n not in _WORKER_STAGES_EXCLUDED]
        batch_size = (max(worker_items) / max(worker_counts)) if worker_counts else 0.0
        if batches == 0 and worker_counts:
            batches = max(worker_counts)
        samples = round(batches * batch_size)

        process_cpu = float(snapshot.get("process_cpu_s", 0.0))
        host_busy = process_cpu / (elapsed * cpu_count)

        # Plain indices, or entries with an ``index`` (the loader's SkippedSample).
        skipped_list = [int(getattr(i, "index", i)) for i in skipped]
        cache = _cache_summary(source)
        src_counters = None
        if source is not None and getattr(source, "counters", None) is not None:
            try:
                src_counters = dict(source.counters.snapshot())
            except Exception:
                src_counters = None
        io = _io_summary(snapshot.get("io"), stages, source)

        stats = cls(
            elapsed_s=elapsed,
            steps=steps,
            batches=batches,
            samples=samples,
            stall_fraction=stall,
            wait_s=step_wait,
            startup_wait_s=float(snapshot.get("startup_wait_s", 0.0)),
            step_s=step_s,
            compute_per_step_s=compute,
            step_p50_s=float(snapshot.get("step_time", {}).get("p50", 0.0)),
            step_p99_s=float(snapshot.get("step_time", {}).get("p99", 0.0)),
            wait_p50_s=float(snapshot.get("step_wait", {}).get("p50", 0.0)),
            wait_p99_s=float(snapshot.get("step_wait", {}).get("p99", 0.0)),
            samples_per_s=samples / elapsed,
            num_threads=threads,
            cpu_count=cpu_count,
            process_cpu_s=process_cpu,
            host_busy=host_busy,
            machine_busy=snapshot.get("machine_busy"),
            stages=stages,
            queues=queues,
            io=io,
            cache=cache,
            source=src_counters,
            skipped=len(skipped_list),
            skipped_indices=skipped_list[:20],
            device=None if device is None else str(device),
            verdict=Verdict(Bound.UNKNOWN, Bottleneck.NONE, 0.0, ""),
        )
        stats.verdict = _diagnose(stats, batch_size, _dataset_bytes(source), source)
        stats.whatif = _whatif_from(stats, batch_size)
        return stats

    # -- distributed ----------------------------------------------------------------

    def _gather(self) -> None:
        import torch.distributed as dist

        mine = self.to_dict(include_ranks=False)
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        self.rank = dist.get_rank()
        self.world_size = len(everyone)
        self.ranks = [_rank_summary(r, d) for r, d in enumerate(everyone)]
        self.slowest_rank, self.stragglers = _stragglers(self.ranks)

    # -- output ---------------------------------------------------------------------

    def to_dict(self, include_ranks: bool = True) -> dict[str, Any]:
        """Everything as JSON-serializable plain data (no timeline)."""
        out: dict[str, Any] = {
            k: getattr(self, k)
            for k in (
                "elapsed_s",
                "steps",
                "batches",
                "samples",
                "stall_fraction",
                "wait_s",
                "startup_wait_s",
                "step_s",
                "compute_per_step_s",
                "step_p50_s",
                "step_p99_s",
                "wait_p50_s",
                "wait_p99_s",
                "samples_per_s",
                "num_threads",
                "cpu_count",
                "process_cpu_s",
                "host_busy",
                "machine_busy",
                "source",
                "skipped",
                "skipped_indices",
                "device",
            )
        }
        out["verdict"] = self.verdict.to_dict()
        out["stages"] = {k: v.to_dict() for k, v in self.stages.items()}
        out["queues"] = {k: v.to_dict() for k, v in self.queues.items()}
        out["io"] = self.io.to_dict() if self.io else None
        out["cache"] = self.cache.to_dict() if self.cache else None
        out["whatif"] = [{"cache_fraction": f, "samples_per_s": r} for f, r in self.whatif]
        if include_ranks:
            out["rank"] = self.rank
            out["world_size"] = self.world_size
            out["ranks"] = [r.to_dict() for r in self.ranks]
            out["slowest_rank"] = self.slowest_rank
            out["stragglers"] = list(self.stragglers)
        if self.extra:
            out["extra"] = self.extra
        return out

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as a JSON string (infinities written as null)."""
        return json.dumps(_finite(self.to_dict()), indent=indent)

    def save_json(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_json` to ``path``."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())
            f.write("\n")

    def save_trace(self, path: str | os.PathLike[str]) -> None:
        """Write the kept timeline as a Chrome trace JSON (Perfetto, chrome://tracing)."""
        from fastfeed.profiling.trace import write_chrome_trace

        write_chrome_trace(
            path,
            self._events,
            self._counters,
            t0=self._t0,
            pid=self.rank,
            process_name=f"fastfeed rank {self.rank}",
            metadata={"verdict": self.verdict.sentence},
        )

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Save a PNG: stage breakdown, wait vs compute per step, cache what-if (matplotlib)."""
        from fastfeed.stats.plot import plot_stats

        plot_stats(self, path)

    @property
    def step_log(self) -> list[tuple[float, float, float]]:
        """``(end_s, wait_s, step_s)`` of the latest steps (``end_s`` from the start)."""
        return [(e - self._t0, w, s) for e, w, s in self._step_log]

    def summary(self) -> str:
        """A human paragraph: the verdict with its numbers, the stages, IO, cache, actions."""
        v = self.verdict
        parts = [v.sentence if v.sentence.endswith(".") else v.sentence + "."]
        if self.steps:
            parts.append(
                f"Over {self.steps} steps ({_ms(self.elapsed_s)}), a step took "
                f"{_ms(self.step_s / self.steps)} on average, of which "
                f"{_ms(self.wait_s / self.steps)} waiting for data and "
                f"{_ms(self.compute_per_step_s)} computing; "
                f"{self.samples_per_s:,.0f} samples/s delivered."
            )
        shown = [s for n, s in self.stages.items() if n != "wait"]
        if shown:
            bits = []
            for s in sorted(shown, key=lambda s: -s.busy_s):
                bits.append(
                    f"{s.name} {_ms(s.per_item_s * max(1.0, self.samples / max(1, self.batches)))}"
                    f"/batch (CPU/wall {s.cpu_per_wall:.2f}"
                    + (f", {s.failures} failed" if s.failures else "")
                    + ")"
                )
            parts.append("Per stage: " + "; ".join(bits) + ".")
        if self.io is not None and (self.io.requested_bytes >= 1 << 20 or self.io.read_bytes):
            if self.io.page_cache_hit is not None:
                parts.append(
                    f"IO: {_format_bytes(self.io.requested_bytes)} requested, "
                    f"{_format_bytes(self.io.read_bytes)} fetched from storage "
                    f"(page-cache hit {_pct(self.io.page_cache_hit)})."
                )
            else:
                parts.append(f"IO: page-cache hit ratio unknown ({self.io.note}).")
        if self.cache is not None:
            parts.append(
                f"RAM cache: {_pct(self.cache.hit_rate)} hits "
                f"({self.cache.hits} hits, {self.cache.misses} misses, "
                f"{_format_bytes(self.cache.bytes_cached)} of "
                f"{_format_bytes(self.cache.capacity_bytes)} used)."
            )
        parts.append(
            f"Host CPU: {_pct(self.host_busy)} of {self.cpu_count} cores used by this process"
            + (
                f", {_pct(self.machine_busy)} busy machine-wide."
                if self.machine_busy is not None
                else "."
            )
        )
        if self.skipped:
            parts.append(f"{self.skipped} samples skipped (first: {self.skipped_indices[:5]}).")
        if self.world_size > 1 and self.ranks:
            worst = self.ranks[self.slowest_rank or 0]
            med = statistics.median(r.stall_fraction for r in self.ranks)
            parts.append(
                f"Across {self.world_size} ranks the slowest is rank {worst.rank} "
                f"({_pct(worst.stall_fraction)} stall vs median {_pct(med)})"
                + (
                    f"; stragglers: {', '.join(map(str, self.stragglers))}."
                    if self.stragglers
                    else "; no stragglers."
                )
            )
        if v.actions:
            parts.append("Next: " + "; ".join(str(a) for a in v.actions) + ".")
        return " ".join(parts)

    def table(self) -> str:
        """A terminal table, one row per stage (and queue), plus the verdict and actions."""
        head = (
            f"{'stage':<10} {'rate/s':>9} {'p50':>9} {'p99':>9} {'busy':>6} "
            f"{'CPU/wall':>8} {'blocked':>7} {'MB/s':>8} {'fail':>5}"
        )
        lines = [head, "-" * len(head)]
        for s in sorted(self.stages.values(), key=lambda s: _STAGE_ORDER.get(s.name, 9)):
            if s.name == "wait":
                continue
            blocked = "-" if s.blocked_fraction is None else _pct(s.blocked_fraction)
            lines.append(
                f"{s.name:<10} {s.rate_items_per_s:>9,.0f} {_ms(s.p50_s):>9} "
                f"{_ms(s.p99_s):>9} {_pct(s.utilization):>6} {s.cpu_per_wall:>8.2f} "
                f"{blocked:>7} {s.mb_per_s:>8.1f} {s.failures:>5}"
            )
        if self.steps:
            lines.append(
                f"{'consumer':<10} {self.samples_per_s:>9,.0f} {_ms(self.step_p50_s):>9} "
                f"{_ms(self.step_p99_s):>9} {'':>6} {'wait':>8} {_pct(self.stall_fraction):>7}"
            )
        for q in self.queues.values():
            lines.append(
                f"queue {q.name}: occupancy {_pct(q.occupancy)} of {q.capacity}, "
                f"put-wait {_ms(q.put_wait_s)}, get-wait {_ms(q.get_wait_s)} "
                f"(slow side: {q.slow_side})"
            )
        lines.append("")
        lines.append(f"verdict: {self.verdict.sentence}")
        for i, a in enumerate(self.verdict.actions, 1):
            lines.append(f"  {i}. {a}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


_STAGE_ORDER = {"read": 0, "decode": 1, "transform": 2, "collate": 3, "copy": 4}


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _cache_summary(source: Any) -> CacheSummary | None:
    cache = _find_cache(source)
    if cache is None:
        return None
    try:
        d = cache.cache_stats()
        hits, misses = int(d.get("hits", 0)), int(d.get("misses", 0))
        return CacheSummary(
            hits=hits,
            misses=misses,
            hit_rate=float(d.get("hit_rate", hits / (hits + misses) if hits + misses else 0.0)),
            bytes_cached=int(d.get("bytes_cached", 0)),
            capacity_bytes=int(d.get("capacity_bytes", 0)),
            policy=str(d.get("policy", "")),
        )
    except Exception:  # duck-typed; a foreign cache_stats() must not break stats()
        return None


def _io_summary(
    io: Mapping[str, int] | None, stages: Mapping[str, StageSummary], source: Any
) -> IOSummary | None:
    if io is None:
        return None
    rchar, read_bytes = int(io["rchar"]), int(io["read_bytes"])
    requested = 0
    inner = _innermost(source) if source is not None else None
    if inner is not None and getattr(inner, "counters", None) is not None:
        try:
            requested = int(inner.counters.snapshot()["bytes"])
        except Exception:
            requested = 0
    if not requested and "read" in stages:
        requested = stages["read"].bytes
    if not requested:
        requested = rchar
    if requested <= 0:
        return IOSummary(requested, rchar, read_bytes, None, "unknown", "nothing read yet")
    if read_bytes > 0:
        hit = min(1.0, max(0.0, 1.0 - read_bytes / requested))
        return IOSummary(requested, rchar, read_bytes, hit, "ok", "from /proc/self/io")
    works = io_accounting_works()
    if works:
        return IOSummary(
            requested, rchar, 0, 1.0, "ok", "nothing fetched from storage: all page-cache hits"
        )
    note = (
        "read_bytes is not accounted on this system (container or overlay/FUSE filesystem)"
        if works is False
        else "could not check whether read_bytes is accounted here"
    )
    return IOSummary(requested, rchar, 0, None, "unknown", note)


def _dist_world() -> int:
    try:
        import torch.distributed as dist
    except ImportError:
        return 1
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def _rank_summary(rank: int, d: Mapping[str, Any]) -> RankSummary:
    steps = int(d.get("steps", 0))
    return RankSummary(
        rank=rank,
        stall_fraction=float(d.get("stall_fraction", 0.0)),
        wait_per_step_s=float(d.get("wait_s", 0.0)) / steps if steps else 0.0,
        step_mean_s=float(d.get("step_s", 0.0)) / steps if steps else 0.0,
        samples_per_s=float(d.get("samples_per_s", 0.0)),
        bound=str(d.get("verdict", {}).get("bound", "unknown")),
        bottleneck=str(d.get("verdict", {}).get("bottleneck", "none")),
    )


def _stragglers(ranks: Sequence[RankSummary]) -> tuple[int | None, list[int]]:
    """The rank that waits most per step, and ranks waiting markedly more than the median.

    Under synchronous data parallelism every rank's step takes as long as the slowest;
    the rank starved of input is the one whose training loop *waits for data*, while
    the others wait inside the gradient all-reduce (counted as compute).
    """
    if not ranks:
        return None, []
    slowest = max(ranks, key=lambda r: r.wait_per_step_s).rank
    med = statistics.median(r.wait_per_step_s for r in ranks)
    step = statistics.median(r.step_mean_s for r in ranks)
    margin = max(0.5 * med, 0.05 * step, 1e-4)
    stragglers = [r.rank for r in ranks if r.wait_per_step_s > med + margin]
    return slowest, stragglers


# -- the diagnosis ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Work:
    """Per-batch figures the diagnosis works from (seconds per batch)."""

    read: float
    cpu_side: float  # decode/transform/collate and other worker stages
    copy: float
    threads: int
    compute: float  # model step excluding the wait
    step: float  # model step including the wait
    batch_size: float

    @property
    def worker(self) -> float:
        return self.read + self.cpu_side

    def supply(self, threads: int | None = None, read_scale: float = 1.0) -> float:
        """Seconds between batches the input side can deliver."""
        t = max(1, self.threads if threads is None else threads)
        return max((self.read * read_scale + self.cpu_side) / t, self.copy)


def _work(stats: LoaderStats, batch_size: float) -> _Work:
    def per_batch(names: Iterable[str]) -> float:
        return sum(stats.stages[n].per_item_s * batch_size for n in names if n in stats.stages)

    cpu_names = [n for n in stats.stages if n not in _CPU_STAGES_EXCLUDED]
    steps = max(1, stats.steps)
    return _Work(
        read=per_batch(["read"]),
        cpu_side=per_batch(cpu_names),
        copy=per_batch(["copy"]),
        threads=max(1, stats.num_threads or 1),
        compute=stats.compute_per_step_s,
        step=stats.step_s / steps,
        batch_size=batch_size,
    )


def _speedup(w: _Work, new_supply: float) -> float:
    """Predicted throughput ratio when supply time per batch becomes ``new_supply``."""
    now = max(w.step, w.supply(), 1e-12)
    new = max(w.compute, new_supply, 1e-12)
    return now / new


def _diagnose(
    stats: LoaderStats, batch_size: float, dataset_bytes: int | None, source: Any
) -> Verdict:
    w = _work(stats, batch_size)
    stall = stats.stall_fraction
    if stats.steps == 0:
        if w.worker <= 0:
            return Verdict(Bound.UNKNOWN, Bottleneck.NONE, 0.0, "unknown: no batches recorded yet")
        # No consumer steps measured (the loader alone): it is, by definition, the pace.
        sentence_head = (
            f"loader alone (no training steps measured): {stats.samples_per_s:,.0f} samples/s"
        )
        bound = Bound.INPUT
    elif stall < COMPUTE_BOUND_BELOW:
        return _compute_bound(stats, w)
    else:
        bound = Bound.PARTIAL if stall < INPUT_BOUND_FROM else Bound.INPUT
        sentence_head = (
            f"{bound.value}: {_pct(stall)} of step time waiting for data "
            f"({_ms(stats.wait_s / max(1, stats.steps))} of "
            f"{_ms(w.step)} per step)"
        )

    if w.worker <= 0 and w.copy <= 0:
        # Waits were measured (e.g. fastfeed.hooks.watch around another loader) but no
        # stage reported its time: the stall is real, its cause unmeasured.
        return Verdict(
            bound,
            Bottleneck.NONE,
            stall,
            f"{sentence_head}; no pipeline stage reported its time, so which one is slow "
            "is not measured here",
            (
                Action(
                    "run `fastfeed profile` on the data, or switch to fastfeed.DataLoader, "
                    "to time each stage (read, decode/transform, collate, copy)",
                    "names the slow stage and the next step, with numbers",
                ),
            ),
        )

    cpu_stage_names = [n for n in stats.stages if n not in _CPU_STAGES_EXCLUDED]
    busy_cpu = sum(stats.stages[n].busy_s for n in cpu_stage_names)
    runq_cpu = sum(stats.stages[n].runq_s or 0.0 for n in cpu_stage_names)
    runq_known = all(stats.stages[n].runq_s is not None for n in cpu_stage_names)
    cpu_cpu = sum(stats.stages[n].cpu_s for n in cpu_stage_names)
    runq_share = runq_cpu / busy_cpu if busy_cpu > 0 and runq_known else 0.0
    saturated = stats.host_busy >= _HOST_BUSY or runq_share >= _RUNQ_SATURATED
    actions: list[Action] = []

    if w.copy > 0 and w.copy >= w.worker / w.threads:
        bottleneck = Bottleneck.COPY
        copy_st = stats.stages["copy"]
        gbps = copy_st.bytes / copy_st.busy_s / 1e9 if copy_st.busy_s > 0 else 0.0
        sentence = (
            f"{sentence_head}; the host-to-device copy dominates: {_ms(w.copy)} per batch "
            f"({gbps:.1f} GB/s) vs {_ms(w.worker / w.threads)} for the workers"
        )
        need = (copy_st.bytes / max(1, copy_st.count)) / max(w.compute, 1e-9) / 1e9
        actions.append(
            Action(
                "send uint8 images and convert/normalize on the GPU (4x fewer bytes than "
                "float32); keep batches in pinned memory",
                f"copy {_ms(w.copy)} -> ~{_ms(w.copy / 4)} per batch; "
                f"keeping up needs {need:.1f} GB/s",
                _speedup(w, max(w.copy / 4, w.worker / w.threads)),
            )
        )
    elif w.read >= w.cpu_side:
        bottleneck = Bottleneck.IO
        read_st = stats.stages["read"]
        sentence = (
            f"{sentence_head}; reading from storage dominates: {_ms(w.read)} of "
            f"{_ms(w.worker)} worker time per batch, CPU/wall in read "
            f"{read_st.cpu_per_wall:.2f}, across {w.threads} threads"
        )
        target = max(w.compute, w.copy)
        if target > 0:
            # Fraction f of reads served from RAM (~free) so (read(1-f)+cpu)/T <= target.
            f = (w.worker - target * w.threads) / w.read if w.read > 0 else 0.0
            f = min(1.0, max(0.05, f))
            size = f" (~{_format_bytes(f * dataset_bytes)})" if dataset_bytes else ""
            new = w.supply(read_scale=1.0 - f)
            actions.append(
                Action(
                    f"cache {_pct(f)} of the dataset in RAM{size} with "
                    f"MemoryCache(source, capacity=...)",
                    f"predicted stall {_pct(stall)} -> "
                    f"{_pct(max(0.0, new - w.compute) / max(new, w.compute, 1e-12))}",
                    _speedup(w, new),
                )
            )
            need = math.ceil(w.worker / target)
            if read_st.cpu_per_wall < 0.5 and need > w.threads:
                actions.append(
                    Action(
                        f"raise threads from {w.threads} to {need} (reads mostly wait: "
                        f"more concurrent reads hide storage latency)",
                        f"predicted {_speedup(w, w.supply(threads=need)):.1f}x throughput "
                        "if the storage has bandwidth to spare",
                        _speedup(w, w.supply(threads=need)),
                    )
                )
        if type(_innermost(source)).__name__ == "FileSource":
            actions.append(
                Action(
                    "pack the files into one LMDB (fastfeed pack SRC out.lmdb)",
                    f"one sequential file instead of {stats.samples:,}+ small reads",
                )
            )
    else:
        transform_pb = w.cpu_side
        # GIL signature: several threads, much of their busy time blocked (not running,
        # not waiting for a core), and together they use no more than about one core.
        # Checked before saturation: on a busy machine GIL waiters also queue for cores.
        cpu_per_wall = cpu_cpu / busy_cpu if busy_cpu > 0 else 1.0
        gil_like = _gil_like(stats, w)
        if gil_like:
            bottleneck = Bottleneck.GIL
            sentence = (
                f"{sentence_head}; decode/transform dominates ({_ms(transform_pb)} per batch) "
                f"and its {w.threads} threads keep blocking (CPU/wall {cpu_per_wall:.2f}, "
                f"{_pct(stats.host_busy)} of the cores used by this process): GIL contention"
            )
            cpu_pb = cpu_cpu / max(1, max(s.count for s in stats.stages.values()))
            par = max(1, min(w.threads, stats.cpu_count))
            new = max((w.read + cpu_pb) / par, w.copy)
            actions.append(
                Action(
                    "use process workers, or a transform that releases the GIL "
                    "(Pillow, numpy, torch ops instead of Python loops)",
                    f"{par} cores instead of ~1: predicted {_speedup(w, new):.1f}x throughput",
                    _speedup(w, new),
                )
            )
        elif saturated:
            bottleneck = Bottleneck.HOST
            why = (
                f"{_pct(stats.host_busy)} of {stats.cpu_count} cores used by this process"
                + (
                    f", {_pct(stats.machine_busy)} busy machine-wide"
                    if stats.machine_busy is not None
                    else ""
                )
                + (
                    f", threads waited {_pct(runq_share)} of the time for a core"
                    if runq_share
                    else ""
                )
            )
            sentence = (
                f"{sentence_head}; decode/transform dominates ({_ms(transform_pb)} per batch) "
                f"and the host is saturated ({why}): more threads will not help"
            )
            factor = w.supply() / max(w.compute, 1e-9) if w.compute > 0 else None
            actions.append(
                Action(
                    "cut CPU work per sample: pack with --max-side 512 (decode cost scales "
                    "with pixels) or move augmentation to the GPU",
                    (
                        f"keeping up needs {factor:.1f}x less CPU per sample "
                        f"({_ms(transform_pb / max(1.0, w.batch_size))} -> "
                        f"{_ms(transform_pb / max(1.0, w.batch_size) / factor)} per sample)"
                        if factor and factor > 1
                        else "frees cores for the model and the copy"
                    ),
                    _speedup(w, w.supply() / factor) if factor and factor > 1 else None,
                )
            )
        else:
            bottleneck = Bottleneck.CPU
            sentence = (
                f"{sentence_head}; decode/transform dominates: {_ms(transform_pb)} of "
                f"{_ms(w.worker)} worker time per batch across {w.threads} threads "
                f"vs {_ms(w.compute)} of model compute"
            )
            target = max(w.compute, w.copy)
            need = math.ceil(w.worker / target) if target > 0 else w.threads + 1
            if need > w.threads:
                usable = min(need, max(stats.cpu_count, w.threads + 1))
                actions.append(
                    Action(
                        f"raise threads from {w.threads} to {usable}",
                        f"predicted {_speedup(w, w.supply(threads=usable)):.1f}x throughput"
                        + (
                            f" ({need} would be needed; the machine has {stats.cpu_count} cores)"
                            if need > usable
                            else ""
                        ),
                        _speedup(w, w.supply(threads=usable)),
                    )
                )
            if need > stats.cpu_count:
                actions.append(
                    Action(
                        "pack with --max-side 512 (decode cost scales with pixels) or "
                        "move augmentation to the GPU",
                        f"{need} threads' worth of CPU is needed on {stats.cpu_count} cores",
                    )
                )
    return Verdict(bound, bottleneck, stall, sentence, tuple(actions))


def _gil_like(stats: LoaderStats, w: _Work) -> bool:
    """Whether the decode/transform threads show the GIL-contention signature."""
    names = [n for n in stats.stages if n not in _CPU_STAGES_EXCLUDED]
    busy = sum(stats.stages[n].busy_s for n in names)
    if w.threads < 2 or busy <= 0:
        return False
    cpu = sum(stats.stages[n].cpu_s for n in names)
    switches = [stats.stages[n].switches for n in names]
    if all(x is not None for x in switches):
        # Blocking switches per busy second: GIL waiters wake every 5 ms (~100+/s);
        # numpy/Pillow work stays near 0 even when the machine is crowded.
        rate = sum(x or 0 for x in switches) / busy
        return rate >= _GIL_SWITCHES_PER_S and cpu / busy < 0.7
    runqs = [stats.stages[n].runq_s for n in names]
    if any(x is None for x in runqs):
        # Without run-queue times, "not on a CPU" mixes blocking with waiting for a
        # core (a crowded machine): no claim about the GIL.
        return False
    blocked = max(0.0, busy - cpu - sum(x or 0.0 for x in runqs)) / busy
    return blocked >= _BLOCKED_GIL and cpu / stats.elapsed_s <= 1.25


def _compute_bound(stats: LoaderStats, w: _Work) -> Verdict:
    sentence = (
        f"compute-bound: only {_pct(stats.stall_fraction)} of step time waiting for data "
        f"({_ms(stats.wait_s / max(1, stats.steps))} of {_ms(w.step)} per step); "
        f"the model step sets the pace"
    )
    actions: list[Action] = []
    if w.compute > 0 and w.worker > 0:
        need = max(1, math.ceil(w.worker / w.compute))
        if need < w.threads:
            actions.append(
                Action(
                    f"threads could drop from {w.threads} to {need}",
                    f"frees {w.threads - need} core(s) for the model "
                    f"(workers need {_ms(w.worker)} per batch, the model {_ms(w.compute)})",
                )
            )
    if _gil_like(stats, w):
        actions.append(
            Action(
                "use process workers, or a transform that releases the GIL",
                f"the {w.threads} worker threads contend for the GIL, which also slows the "
                "training loop's own Python code",
            )
        )
    actions.append(
        Action(
            "speed up the model step (mixed precision, torch.compile, larger batch)",
            f"input has headroom: the loader supplies a batch every {_ms(w.supply())}, "
            f"the model takes {_ms(w.compute)}",
            w.compute / max(w.supply(), 1e-12) if w.supply() > 0 else None,
        )
    )
    return Verdict(Bound.COMPUTE, Bottleneck.NONE, stats.stall_fraction, sentence, tuple(actions))


def _whatif_from(stats: LoaderStats, batch_size: float) -> list[tuple[float, float]]:
    """Cache what-if from the in-training figures: RAM hits cost ~nothing vs the read stage."""
    if "read" not in stats.stages or batch_size <= 0:
        return []
    w = _work(stats, batch_size)
    cache = stats.cache
    storage = w.read
    if cache is not None and cache.hit_rate < 1.0:
        # Reads are a mix already: scale to the all-storage cost.
        storage = w.read / max(1e-3, 1.0 - cache.hit_rate)
    return cache_whatif(
        read_storage_s=storage,
        read_memory_s=0.0,
        other_s=w.cpu_side,
        threads=w.threads,
        batch_size=batch_size,
        compute_s=w.compute,
        copy_s=w.copy,
    )
