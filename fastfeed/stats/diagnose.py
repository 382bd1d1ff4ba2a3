"""The diagnosis rules: who sets the pace, what the input time goes to, what to do.

- **compute-bound**: the training loop waits for data < 5% of its step time;
  **partially input-bound**: 5-20%; **input-bound**: >= 20% (or no steps: the loader alone).
- When input bound, the workers' time per batch, classified by what it was spent on
  (:class:`~fastfeed.stats.model.TimeSplit`), names the bottleneck: **copy** when the
  host-to-device copy is slower than the workers; **gil** when waiting for the GIL is
  >= 30% of the workers' time on 2+ threads; **io** when IO wait is the largest class;
  **host-saturated** when computing and the cores are full (threads wait >= 25% of
  their time for a core, or >= 85% of the machine is busy); **cpu** otherwise.

Actions are only what the user can do with what they have: ``MemoryCache`` and repacking
only around a fastfeed Source; for a plain Dataset behind ``fastfeed.DataLoader``:
``num_workers``, ``worker_type="process"``, ``fastfeed pack`` + ``Loader``,
``--max-side``; no repack advice for a pack already at ``max_side <= 512``. Every
predicted gain is capped by the cores free for the workers (the machine's cores less
other processes' load from ``/proc/stat`` and the training loop's own CPU use).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastfeed._size import format_size
from fastfeed.profiling.stages import Stage
from fastfeed.stats.analyze import cache_whatif, worker_batches
from fastfeed.stats.model import (
    Action,
    Bottleneck,
    Bound,
    LoaderStats,
    Neighbour,
    TimeSplit,
    Verdict,
)
from fastfeed.stats.probe import SourceFacts
from fastfeed.stats.storage import BLOCK_READ_BYTES, StorageSummary

__all__ = ["COMPUTE_BOUND_BELOW", "INPUT_BOUND_FROM", "diagnose", "neighbour", "whatif"]

COMPUTE_BOUND_BELOW = 0.05  # stall fraction under which the model, not input, sets the pace
INPUT_BOUND_FROM = 0.20  # stall fraction from which input sets the pace
GIL_SHARE = 0.30  # share of the workers' time waiting for the GIL that names the GIL
_RUNQ_SATURATED = 0.25  # share of the workers' time waiting for a core: cores are full
_BUSY_SATURATED = 0.85  # share of the machine busy: cores are full
_NEIGHBOUR_FROM = 0.10  # slowdown of the step worth a sentence
_STEP_MIN_S = 1e-3  # a training step shorter than this has nothing to slow
_IO_THREADS_GROWTH = 4  # IO advice raises the threads at most this many times per step
_TARGET_SIDE = 512  # --max-side advised (decode cost scales with pixels)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _ms(x: float) -> str:
    return f"{1e3 * x:.1f} ms" if x < 10 else f"{x:.1f} s"


@dataclass(frozen=True)
class _Work:
    """Per-batch figures the rules work from, seconds per batch."""

    worker: float  # the workers' wall time (all stages but the copy)
    cpu: float
    runq: float
    gil: float
    io: float
    read: float  # the read stage's wall time
    copy: float
    threads: int
    compute: float  # the model step without the wait
    step: float  # the model step with the wait
    cores: float  # cores free for the workers

    def now(self) -> float:
        """Measured seconds between batches."""
        return max(self.step, self.worker / self.threads, self.copy, 1e-12)

    def supply(
        self,
        threads: int | None = None,
        *,
        io_scale: float = 1.0,
        gil: bool = True,
        cores: float | None = None,
    ) -> float:
        """Predicted seconds between batches the input side can deliver.

        Each thread spends ``cpu + io + gil`` per batch; all threads together cannot
        use more than the free cores (``cpu / cores``); the copy runs beside them.
        """
        t = max(1, self.threads if threads is None else threads)
        per_thread = self.cpu + self.io * io_scale + (self.gil if gil else 0.0)
        c = max(1e-9, self.cores if cores is None else cores)
        return max(per_thread / t, self.cpu / c, self.copy)

    def speedup(self, new_supply: float) -> float:
        """Throughput ratio when the supply time per batch becomes ``new_supply``."""
        return self.now() / max(self.compute, new_supply, 1e-12)


def _work(stats: LoaderStats) -> _Work:
    nb = worker_batches(stats)
    split = stats.workers or TimeSplit(0.0, 0.0, 0.0, 0.0)
    worker = sum(s.busy_s for n, s in stats.stages.items() if n not in (Stage.COPY, Stage.WAIT))
    blocked_unknown = max(0.0, worker - split.cpu_s) if split.runq_s is None else 0.0
    consumer_cores = 0.0
    if stats.neighbour is not None and stats.elapsed_s > 0:
        consumer_cores = stats.neighbour.step.cpu_s * max(1, stats.steps) / stats.elapsed_s
    read = stats.stages.get(Stage.READ)
    copy = stats.stages.get(Stage.COPY)
    return _Work(
        worker=worker / nb,
        cpu=split.cpu_s / nb,
        runq=(split.runq_s or 0.0) / nb,
        gil=(split.gil_s or 0.0) / nb,
        io=((split.io_s or 0.0) + blocked_unknown) / nb,
        read=read.busy_s / nb if read else 0.0,
        copy=copy.busy_s / max(1, copy.count) if copy else 0.0,
        threads=max(1, stats.num_threads or 1),
        compute=stats.compute_per_step_s,
        step=stats.step_s / max(1, stats.steps),
        cores=max(0.5, stats.available_cores - consumer_cores),
    )


def _supports_processes() -> bool:
    """Whether this Loader takes ``processes=`` (the worker-process engine)."""
    from fastfeed.loader import Loader

    return "processes" in inspect.signature(Loader.__init__).parameters


def _process_advice(facts: SourceFacts, k: int) -> str | None:
    if facts.kind == "dataset":
        return f'use worker_type="process" with num_workers={k}'
    if facts.kind == "source":
        if _supports_processes():
            return f"use processes={k}"
        return None
    return "run the loader's workers as processes"


def _cut_work(facts: SourceFacts) -> Action:
    """Less CPU per sample, in the form this user can apply."""
    side = _TARGET_SIDE
    if facts.is_pack and facts.packed_max_side is not None and facts.packed_max_side <= side:
        return Action(
            "move augmentation to the GPU, or use a cheaper transform",
            f"images are already packed at max_side {facts.packed_max_side}",
        )
    if facts.is_pack:
        text = f"repack with fastfeed pack SRC out.lmdb --max-side {side}"
    elif facts.kind == "source" and facts.storage == "FileSource":
        text = f"pack with fastfeed pack SRC out.lmdb --max-side {side} and read it with Loader"
    elif facts.kind == "dataset":
        text = (
            f"pack the images with fastfeed pack SRC out.lmdb --max-side {side} and train "
            "from fastfeed.Loader"
        )
    else:
        text = "move augmentation to the GPU, or use a cheaper transform"
        return Action(text, "cuts the CPU time per sample")
    return Action(text, "decode cost scales with pixels: gain depends on the image sizes")


def _threads_word(facts: SourceFacts) -> str:
    return "num_workers" if facts.kind in ("dataset", "opaque") else "num_threads"


def diagnose(stats: LoaderStats, facts: SourceFacts) -> Verdict:
    """The verdict on ``stats`` (its ``workers``, ``neighbour`` and stages filled in)."""
    w = _work(stats)
    stall = stats.stall_fraction
    if stats.steps == 0:
        if w.worker <= 0:
            return Verdict(Bound.UNKNOWN, Bottleneck.NONE, 0.0, "unknown: no batches recorded yet")
        bound = Bound.INPUT
        head = f"loader alone (no training steps measured): {stats.samples_per_s:,.0f} samples/s"
    elif stall < COMPUTE_BOUND_BELOW:
        return _compute_bound(stats, w, facts)
    else:
        bound = Bound.PARTIAL if stall < INPUT_BOUND_FROM else Bound.INPUT
        head = (
            f"{bound.value}: {_pct(stall)} of step time waiting for data "
            f"({_ms(stats.wait_s / max(1, stats.steps))} of {_ms(w.step)} per step)"
        )
    if w.worker <= 0 and w.copy <= 0:
        if _in_processes(stats) and facts.kind == "dataset":
            # The drop-in DataLoader's process workers are torch's: their stages run where
            # this process's recorder does not see them.
            why = "the worker processes time their stages where fastfeed does not see them"
            action = Action(
                'run a few epochs with worker_type="thread" (or `fastfeed profile` on the data)',
                "times each stage in this process and classifies the time",
            )
        else:
            why = "no pipeline stage reported its time"
            action = Action(
                "run `fastfeed profile` on the data, or switch to fastfeed.DataLoader",
                "times each stage and classifies the time",
            )
        return Verdict(
            bound,
            Bottleneck.NONE,
            stall,
            f"{head}; {why}, so what is slow is not measured",
            (action,),
        )
    total = max(w.cpu + w.runq + w.gil + w.io, 1e-12)
    parts = [("CPU", w.cpu), ("waiting for a core", w.runq), ("GIL", w.gil), ("IO wait", w.io)]
    split = ", ".join(f"{_pct(v / total)} {k}" for k, v in parts if v / total >= 0.01)
    unit = "processes" if _in_processes(stats) else "threads"
    where = f"worker time {_ms(w.worker)} per batch on {w.threads} {unit}: {split}"
    saturated = (
        w.runq / total >= _RUNQ_SATURATED
        or (stats.machine_busy or 0.0) >= _BUSY_SATURATED
        or stats.host_busy >= _BUSY_SATURATED
    )
    actions: list[Action] = []
    k = max(2, min(w.threads, math.floor(w.cores + 0.5)))
    if w.copy > 0 and w.copy >= w.worker / w.threads:
        bottleneck = Bottleneck.COPY
        sentence = f"{head}; the host-to-device copy ({_ms(w.copy)} per batch) is the slowest"
        actions.append(
            Action(
                "send uint8 images and convert/normalize on the GPU (4x fewer bytes)",
                f"copy {_ms(w.copy)} -> ~{_ms(w.copy / 4)} per batch",
                w.speedup(max(w.copy / 4, w.worker / w.threads)),
            )
        )
    elif w.threads >= 2 and w.gil / total >= GIL_SHARE:
        bottleneck = Bottleneck.GIL
        sentence = f"{head}; {where}: the threads wait for each other's GIL"
        advice = _process_advice(facts, k)
        new = max(w.supply(gil=False, cores=min(w.cores, k)), (w.cpu + w.io) / max(w.threads, k))
        if advice:
            gain = w.speedup(new)
            actions.append(Action(advice, f"{k} GILs instead of one: predicted {gain:.1f}x", gain))
        actions.append(
            Action(
                "make the transform release the GIL (Pillow, numpy, torch ops instead of "
                "Python loops)",
                "the time spent waiting for the GIL goes away",
                w.speedup(w.supply(gil=False)),
            )
        )
    elif w.io >= max(w.cpu + w.runq, w.gil) and stats.storage and stats.storage.iops_bound:
        bottleneck = Bottleneck.IO
        st = stats.storage
        sentence = (
            f"{head}; {where}: the disk is IOPS-bound ({st.reason}): each small read costs "
            "one operation, more threads will not help"
        )
        actions.append(_block_order(stats, w, facts, st))
    elif w.io >= max(w.cpu + w.runq, w.gil):
        bottleneck = Bottleneck.IO
        sentence = f"{head}; {where}: waiting on IO (storage, network, sleeps) dominates"
        full = stats.storage is not None and stats.storage.bandwidth_bound
        if full and stats.storage is not None:
            sentence += f"; the disk reads at its bandwidth ({stats.storage.reason})"
        target = max(w.compute, w.copy)
        need = math.ceil(w.worker / target) if target >= _STEP_MIN_S else 2 * w.threads
        need = min(need, _IO_THREADS_GROWTH * w.threads)
        if need > w.threads and not full:
            new = w.supply(need)
            actions.append(
                Action(
                    f"raise {_threads_word(facts)} from {w.threads} to {need} (more reads in "
                    "flight hide the latency; IO wait needs no core)",
                    f"predicted {w.speedup(new):.1f}x if the storage has bandwidth to spare",
                    w.speedup(new),
                )
            )
        if facts.kind == "source" and w.read > 0:
            new = w.supply(io_scale=0.0)
            size = f" (~{format_size(facts.dataset_bytes)})" if facts.dataset_bytes else ""
            actions.append(
                Action(
                    f"cache the dataset in RAM{size} with MemoryCache(source, capacity=...)",
                    f"predicted {w.speedup(new):.1f}x once the cache is full",
                    w.speedup(new),
                )
            )
        if facts.storage == "FileSource" or facts.kind == "dataset":
            actions.append(
                Action(
                    "pack the files into one LMDB (fastfeed pack SRC out.lmdb) and train "
                    "from fastfeed.Loader",
                    f"one sequential file instead of {stats.samples:,}+ small reads",
                )
            )
    elif saturated or w.threads >= w.cores:
        bottleneck = Bottleneck.HOST
        others = (
            f"; other processes keep {stats.others_cores:.1f} of {stats.cpu_count} cores busy"
            if stats.others_cores and stats.others_cores >= 0.5
            else ""
        )
        sentence = f"{head}; {where}: every core is busy{others}, more threads will not help"
        actions.append(_cut_work(facts))
    else:
        bottleneck = Bottleneck.CPU
        sentence = f"{head}; {where}: computing dominates and cores are free"
        target = max(w.compute, w.copy)
        want = math.ceil(w.worker / target) if target > 0 else w.threads + 1
        usable = max(w.threads + 1, min(want, math.floor(w.cores + 0.5)))
        new = w.supply(usable)
        actions.append(
            Action(
                f"raise {_threads_word(facts)} from {w.threads} to {usable}",
                f"predicted {w.speedup(new):.1f}x (capped by {w.cores:.1f} free cores)",
                w.speedup(new),
            )
        )
        if want > w.cores:
            actions.append(_cut_work(facts))
    actions.sort(key=lambda a: -(a.speedup or 0.0))
    return Verdict(bound, bottleneck, stall, sentence, tuple(actions))


def _block_order(stats: LoaderStats, w: _Work, facts: SourceFacts, st: StorageSummary) -> Action:
    """Read runs of consecutive records, one large request each, on an IOPS-bound disk."""
    order = (stats.execution or {}).get("order")
    if facts.is_pack and order == "block":
        return Action(
            "the loader already reads runs (shuffle='block'): a faster disk, or cache "
            "the hot part of the dataset with MemoryCache(source, capacity=...)",
            f"the disk gives {st.mb_per_s:,.1f} MB/s in {st.bytes_per_read / 1e3:,.0f} KB reads",
        )
    if facts.is_pack:
        text = 'read it in runs with Loader(source, shuffle="block")'
    else:
        text = (
            "pack the files into one LMDB (fastfeed pack SRC out.lmdb) and read it in runs "
            'with fastfeed.Loader(source, shuffle="block")'
        )
    if st.block_mb_per_s is None or stats.samples <= 0 or stats.elapsed_s <= 0:
        return Action(
            text,
            f"{BLOCK_READ_BYTES >> 20} MiB per operation instead of "
            f"{st.bytes_per_read / 1e3:,.0f} KB; the gain depends on the disk's bandwidth "
            "(not known here)",
        )
    # Storage time per batch at block-order speed, beside the workers' other work.
    nb = worker_batches(stats)
    batch_bytes = st.mb_per_s * 1e6 * stats.elapsed_s / max(1.0, nb)
    new = max(w.supply(io_scale=0.0), batch_bytes / (st.block_mb_per_s * 1e6))
    gain = w.speedup(new)
    return Action(
        text,
        f"{BLOCK_READ_BYTES >> 20} MiB per operation, up to {st.block_mb_per_s:,.0f} MB/s: "
        f"predicted {gain:.1f}x ({stats.samples_per_s * gain:,.0f} samples/s)",
        gain,
    )


def _compute_bound(stats: LoaderStats, w: _Work, facts: SourceFacts) -> Verdict:
    sentence = (
        f"compute-bound: only {_pct(stats.stall_fraction)} of step time waiting for data "
        f"({_ms(stats.wait_s / max(1, stats.steps))} of {_ms(w.step)} per step); "
        "the model step sets the pace"
    )
    actions: list[Action] = []
    nb = stats.neighbour
    if nb is not None and nb.sentence:
        actions.append(Action(nb.sentence, "gives the training step its time back"))
    if w.compute > 0 and w.worker > 0:
        need = max(1, math.ceil(w.worker / w.compute))
        if need < w.threads:
            actions.append(
                Action(
                    f"{_threads_word(facts)} could drop from {w.threads} to {need}",
                    f"frees {w.threads - need} core(s) for the model",
                )
            )
    actions.append(
        Action(
            "speed up the model step (mixed precision, torch.compile, larger batch)",
            f"the loader supplies a batch every {_ms(w.worker / w.threads)}, "
            f"the model takes {_ms(w.compute)}",
        )
    )
    return Verdict(Bound.COMPUTE, Bottleneck.NONE, stats.stall_fraction, sentence, tuple(actions))


def neighbour(
    stats: LoaderStats, consumer: Mapping[str, Any] | None, facts: SourceFacts
) -> Neighbour | None:
    """How much waiting for a core or the GIL lengthened the training loop's steps.

    The loop's time outside the waits (on the sampled steps: one in
    :data:`~fastfeed.profiling.recorder.CONSUMER_SAMPLE_EVERY`) is split like a worker's:
    CPU, run-queue wait,
    GIL wait (its blocking switches x the probe's cost per acquisition) and other
    blocking (a CUDA sync, a sleep). The slowdown is run-queue + GIL over the rest.
    """
    if not consumer or int(consumer.get("steps", 0)) < 2:
        return None
    n = int(consumer["steps"])
    compute, cpu = float(consumer["compute_s"]), float(consumer["cpu_s"])
    runq = float(consumer.get("runq_s", 0.0))
    if compute / n < _STEP_MIN_S:  # the loop does (almost) nothing: no step to slow
        return None
    blocked = max(0.0, compute - cpu - runq)
    per_acquire = stats.gil_wait_per_acquire_s or 0.0
    gil = min(blocked, int(consumer.get("switches", 0)) * per_acquire)
    step = TimeSplit(cpu / n, runq / n, gil / n, (blocked - gil) / n)
    own = max(compute - runq - gil, 1e-9)
    slowdown = (runq + gil) / own
    cause = "gil" if gil >= runq else "cores"
    if cause == "cores" and gil > 0 and not _short_of_cores(stats):
        # Cores were free, so the loop's run-queue wait is the wake-up latency of its GIL
        # hand-offs (an idle VM core takes a while to wake), not a shortage of cores: a
        # quiet 2-core run read "waiting for a core" with 1 core busy in all.
        cause = "gil"
    sentence = ""
    if slowdown >= _NEIGHBOUR_FROM and (runq + gil) / n >= 2e-4:
        threads = max(1, stats.num_threads or 1)
        cores = stats.available_cores
        in_processes = _in_processes(stats)
        # With worker processes, the workers hold no GIL and no core of this process: what
        # slowed the loop is its other threads (torch's pin-memory and queue threads, the
        # user's own) or, waiting for a core, the worker processes themselves.
        if cause == "gil" and in_processes:
            advice = "the loader's workers are processes and do not hold it"
        elif cause == "gil":
            k = max(2, min(threads, math.floor(cores + 0.5)))
            advice = (
                _process_advice(facts, k) or "move the transform's Python work to GIL-releasing ops"
            )
        else:
            advice = (
                f"leave a core to the training loop ({_threads_word(facts)}="
                f"{max(1, min(threads, math.floor(cores)) - 1)})"
            )
        if in_processes:
            who = "other threads of this process" if cause == "gil" else "the worker processes"
        elif cause == "cores" and stats.others_cores and stats.others_cores >= 0.5:
            who = "the loader's threads and other processes"
        else:
            who = "the loader's threads"
        by = _pct(slowdown) if slowdown < 2 else f"{1 + slowdown:.0f}x (it takes that much longer)"
        sentence = (
            f"{who} slow your step by {by} "
            f"({'GIL' if cause == 'gil' else 'waiting for a core'}); {advice}"
        )
    return Neighbour(slowdown, cause, step, sentence)


def _in_processes(stats: LoaderStats) -> bool:
    """Whether the loader's workers ran as processes (``stats().execution``)."""
    return (stats.execution or {}).get("mode") == "processes"


def _short_of_cores(stats: LoaderStats) -> bool:
    """Whether this process and the others kept 80%+ of the cores busy (True if unknown)."""
    if stats.others_cores is None:
        return True
    busy = stats.host_busy * stats.cpu_count + stats.others_cores
    return busy >= 0.8 * stats.cpu_count


def whatif(stats: LoaderStats, facts: SourceFacts) -> list[tuple[float, float]]:
    """Cache what-if for a Source's read stage: RAM hits cost ~nothing vs storage reads."""
    read = stats.stages.get(Stage.READ)
    if facts.kind != "source" or read is None or not stats.batch_size:
        return []
    w = _work(stats)
    storage = w.read
    if stats.cache is not None and stats.cache.hit_rate < 1.0:
        storage = w.read / max(1e-3, 1.0 - stats.cache.hit_rate)  # scale to all-storage
    return cache_whatif(
        read_storage_s=storage,
        read_memory_s=0.0,
        other_s=max(0.0, w.worker - w.read),
        threads=w.threads,
        batch_size=stats.batch_size,
        compute_s=w.compute,
        copy_s=w.copy,
        cores=w.cores,
        other_cpu_s=max(0.0, w.cpu - (read.cpu_s or 0.0) / worker_batches(stats)),
    )
