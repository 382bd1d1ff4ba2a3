"""The result types of :mod:`fastfeed.stats`: plain frozen records, no analysis here.

The verdict's types (:class:`Verdict`, :class:`Bound`, :class:`Bottleneck`,
:class:`Action`) live in :mod:`.verdict` and are re-exported here.

:class:`LoaderStats` holds everything a loader measured; its methods only delegate to
:mod:`.render` (text, JSON), :mod:`.plot` and :mod:`fastfeed.profiling.trace`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from fastfeed.profiling import TraceEvent
from fastfeed.stats.storage import StorageSummary
from fastfeed.stats.verdict import Action, Bottleneck, Bound, Verdict

__all__ = [
    "Action",
    "Bottleneck",
    "Bound",
    "CacheSummary",
    "IOSummary",
    "LoaderStats",
    "Neighbour",
    "QueueSummary",
    "RankSummary",
    "StageSummary",
    "TimeSplit",
    "Verdict",
]


@dataclass(frozen=True)
class TimeSplit:
    """Where a thread's wall time went, seconds (what it was spent on, not which stage).

    Attributes:
        cpu_s: Running on a core (thread CPU time).
        runq_s: Runnable, waiting for a free core (schedstat); None if not measured.
        gil_s: Waiting for the GIL (blocking switches x the GIL probe's cost per
            acquisition, capped by the blocked time); None if not measured.
        io_s: Blocked on anything else: storage, network, sleeps, locks; None if unknown.
    """

    cpu_s: float
    runq_s: float | None
    gil_s: float | None
    io_s: float | None

    @property
    def total_s(self) -> float:
        return self.cpu_s + (self.runq_s or 0.0) + (self.gil_s or 0.0) + (self.io_s or 0.0)

    def shares(self) -> dict[str, float]:
        """Each class's share of the total (0..1); unknown classes left out."""
        total = self.total_s
        if total <= 0:
            return {}
        out = {"cpu": self.cpu_s / total}
        for k, v in (("runq", self.runq_s), ("gil", self.gil_s), ("io", self.io_s)):
            if v is not None:
                out[k] = v / total
        return out

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class StageSummary:
    """One stage's figures.

    Attributes:
        name: Stage name (a :class:`~fastfeed.profiling.Stage` value or a user's name).
        count: Spans (usually batches).
        items: Samples.
        failures: Spans that raised.
        busy_s: Wall time in the stage summed over threads, seconds.
        cpu_s: Thread CPU time in the stage, seconds (None if not measured).
        runq_s: Time runnable but without a core, seconds (None if not measured).
        switches: Voluntary context switches (blocking) in the stage (None if not measured).
        gil_s: Estimated GIL wait in the stage, seconds (None if not measured).
        io_wait_s: Blocked time that was not GIL wait (storage, sleeps...), seconds.
        bytes: Bytes handled.
        p50_s: Median span duration, seconds (p90_s, p99_s alike).
        per_item_s: ``busy_s / items``, seconds per sample.
        cpu_per_wall: ``cpu_s / busy_s``: ~1 computing; low: waiting (IO, GIL, cores);
            None if not measured.
        blocked_fraction: Share of busy time neither running nor runnable (IO, GIL);
            None if run-queue time was not measured.
        utilization: ``busy_s / (elapsed_s x threads)``: how busy the stage keeps its threads.
        rate_items_per_s: Samples through the stage per second of elapsed time.
        mb_per_s: Megabytes (1e6) through the stage per second of elapsed time.
        threads: Threads that ran the stage (the loader's count; 1 for the copy).
    """

    name: str
    count: int
    items: int
    failures: int
    busy_s: float
    cpu_s: float | None
    runq_s: float | None
    switches: int | None
    gil_s: float | None
    io_wait_s: float | None
    bytes: int
    p50_s: float
    p90_s: float
    p99_s: float
    per_item_s: float
    cpu_per_wall: float | None
    blocked_fraction: float | None
    utilization: float
    rate_items_per_s: float
    mb_per_s: float
    threads: int

    def split(self) -> TimeSplit | None:
        """This stage's busy time by what it was spent on (None: CPU time not measured)."""
        if self.cpu_s is None:
            return None
        return TimeSplit(self.cpu_s, self.runq_s, self.gil_s, self.io_wait_s)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class QueueSummary:
    """One queue between stages.

    Attributes:
        name: Queue name (``batches``: workers to consumer; ``staged``: stager to consumer).
        put_wait_s: Producers blocked on a full queue (waiting for room), seconds.
        get_wait_s: Consumers blocked on an empty queue (waiting for batches), seconds.
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
            containers and overlay/FUSE/network filesystems) or ``"unavailable"``.
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


@dataclass(frozen=True)
class Neighbour:
    """How much the loader slows the training step it shares the process with.

    Attributes:
        slowdown: Extra step time caused by waiting for a core or the GIL, as a share of
            the step's undisturbed time (0.4: the step takes 40% longer).
        cause: ``"gil"`` or ``"cores"`` (whichever cost more).
        step: The training loop's time outside the waits, per step, by what it was spent on.
        sentence: One sentence saying it, with what to do (empty when below 10%).
    """

    slowdown: float
    cause: str
    step: TimeSplit
    sentence: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "slowdown": self.slowdown,
            "cause": self.cause,
            "step": self.step.to_dict(),
            "sentence": self.sentence,
        }


@dataclass
class LoaderStats:
    """Everything the loader measured, with a verdict. Build with :meth:`collect`.

    Attributes:
        elapsed_s: Wall time covered (since the recorder started or was reset), seconds.
        steps: Training steps measured (batches after each epoch's first).
        batches: Batches handed to the training loop.
        samples: Samples handed over (``batches x batch_size``; stage items when the
            batch size is not known).
        batch_size: Samples per batch as the loader was configured (None: unknown).
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
        others_cores: Cores kept busy by other processes on average (None if unknown).
        gil_wait_per_acquire_s: What one GIL acquisition cost on average (the GIL
            probe), seconds; None if not measured.
        workers: The workers' time per batch by what it was spent on (None: no stage).
        neighbour: How much the loader slows the training step (None: not measured).
        execution: How the workers ran, as the loader reports it (e.g. ``{"mode":
            "threads", "processes": 0, "reason": "..."}``); None when not reported.
        stages: Per-stage figures.
        queues: Per-queue figures.
        io: Storage vs page cache (None when ``/proc/self/io`` is unavailable).
        storage: What the busiest disk did, and whether it is IOPS-bound (None when
            unknown or nothing was read from a disk).
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
    batch_size: int | None = None
    others_cores: float | None = None
    gil_wait_per_acquire_s: float | None = None
    workers: TimeSplit | None = None
    neighbour: Neighbour | None = None
    execution: dict[str, Any] | None = None
    storage: StorageSummary | None = None
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

    @property
    def available_cores(self) -> float:
        """Cores this process can use: all of them less what other processes kept busy."""
        return max(1.0, self.cpu_count - (self.others_cores or 0.0))

    # -- building (see fastfeed.stats.collect and fastfeed.stats.analyze) ------------

    @classmethod
    def collect(cls, recorder: Any, **kwargs: Any) -> LoaderStats:
        """Read a live recorder: see :func:`fastfeed.stats.collect.collect`."""
        from fastfeed.stats.collect import collect

        return collect(recorder, **kwargs)

    @classmethod
    def from_snapshot(cls, snapshot: Any, **kwargs: Any) -> LoaderStats:
        """Analyze a snapshot dict: see :func:`fastfeed.stats.collect.from_snapshot`.

        The pure analysis, with the source's facts already read, is
        :func:`fastfeed.stats.analyze.analyze`.
        """
        from fastfeed.stats.collect import from_snapshot

        return from_snapshot(snapshot, **kwargs)

    # -- output (see fastfeed.stats.render) ------------------------------------------

    def to_dict(self, include_ranks: bool = True) -> dict[str, Any]:
        """Everything as JSON-serializable plain data (no timeline)."""
        from fastfeed.stats.render import to_dict

        return to_dict(self, include_ranks=include_ranks)

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as a JSON string (infinities written as null)."""
        from fastfeed.stats.render import to_json

        return to_json(self, indent=indent)

    def save_json(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_json` to ``path``."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())
            f.write("\n")

    def save_trace(self, path: str | os.PathLike[str]) -> None:
        """Write the kept timeline as a Chrome trace JSON (Perfetto, chrome://tracing).

        The trace's metadata says what it covers (``covers``): the whole recording, or
        for ``fastfeed profile`` the phase whose loader ran last.
        """
        from fastfeed.profiling.trace import write_chrome_trace
        from fastfeed.stats.render import trace_covers

        write_chrome_trace(
            path,
            self._events,
            self._counters,
            t0=self._t0,
            pid=self.rank,
            process_name=f"fastfeed rank {self.rank}",
            metadata={"verdict": self.verdict.sentence, "covers": trace_covers(self)},
        )

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Save a PNG: where the time goes, wait vs compute per step, cache what-if."""
        from fastfeed.stats.plot import plot_stats

        plot_stats(self, path)

    @property
    def step_log(self) -> list[tuple[float, float, float]]:
        """``(end_s, wait_s, step_s)`` of the latest steps (``end_s`` from the start)."""
        return [(e - self._t0, w, s) for e, w, s in self._step_log]

    def summary(self, details: bool = False) -> str:
        """At most three lines: the verdict, the next step, the noisy neighbour.

        Args:
            details: Add the figures behind it (stages, IO, cache, host, ranks), one per line.
        """
        from fastfeed.stats.render import summary

        return summary(self, details=details)

    def table(self) -> str:
        """A terminal table, one row per stage, a legend, the queues in words, the verdict."""
        from fastfeed.stats.render import table

        return table(self)

    def __str__(self) -> str:
        return self.summary()
