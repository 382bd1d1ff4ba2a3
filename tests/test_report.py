"""LoaderStats: verdicts on constructed scenarios with known answers, math, distributed."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from fakes import ledger_source

from fastfeed.pipeline.prefetch import Prefetcher
from fastfeed.pipeline.tap import Tap
from fastfeed.profiling import Recorder
from fastfeed.sources.base import Source
from fastfeed.stats import Bottleneck, Bound, LoaderStats, Verdict, cache_whatif


@dataclass
class _Task:
    indices: list[int]


def _run(
    source: Source,
    transform: Callable[[bytes], Any],
    *,
    threads: int,
    step_s: float,
    batches: int,
    batch_size: int = 8,
) -> LoaderStats:
    """A miniature loader: read + transform per batch on a Prefetcher, a sleeping model."""
    rec = Recorder()

    def work(task: _Task) -> list[Any]:
        with rec.span("read", items=len(task.indices)):
            recs = source.read_many(task.indices)
        with rec.span("transform", items=len(recs)):
            return [transform(r.data) for r in recs]

    tasks = [_Task(list(range(i * batch_size, (i + 1) * batch_size))) for i in range(batches)]
    with Prefetcher(tasks, work, num_threads=threads, depth=threads + 1, recorder=rec) as pf:
        for _ in Tap(pf, rec):  # the tap times the loop, as in a loader
            time.sleep(step_s)
    return LoaderStats.collect(rec, source=source, num_threads=threads)


_NOISE = np.random.default_rng(0).random(300_000)


def _numpy_burn(data: bytes) -> float:
    # Single-threaded numpy ufuncs: CPU work that releases the GIL.
    return float(np.sqrt(np.abs(np.sin(_NOISE)) + 1.0).sum())


def _python_burn(data: bytes) -> int:
    # A pure-Python loop: holds the GIL the whole time.
    s = 0
    for i in range(80_000):
        s += i * i
    return s


def test_sleeping_reads_are_io_bound() -> None:
    src = ledger_source(200, delay_s=0.003)
    stats = _run(src, lambda d: d, threads=2, step_s=0.001, batches=16)
    v = stats.verdict
    assert v.bound is Bound.INPUT, v.sentence
    assert v.bottleneck is Bottleneck.IO, v.sentence
    assert stats.stall_fraction >= 0.2
    assert "reading from storage dominates" in v.sentence
    assert stats.stages["read"].cpu_per_wall < 0.5
    assert stats.stages["read"].count == 16 and stats.stages["read"].items == 128
    texts = [a.text for a in v.actions]
    assert any(t.startswith("cache ") and "in RAM" in t for t in texts), texts
    assert any(t.startswith("raise threads from 2 to ") for t in texts), texts
    assert v.matches("input-bound") and v.matches("io") and not v.matches("cpu")
    assert stats.queues["batches"].slow_side == "producer"


def test_numpy_transform_is_cpu_bound() -> None:
    stats = _run(ledger_source(200), _numpy_burn, threads=1, step_s=0.001, batches=8)
    v = stats.verdict
    assert v.bound is Bound.INPUT, v.sentence
    # On a machine other jobs keep busy the same run reads as host saturated; both name
    # decode/transform, neither is IO or the GIL.
    assert v.bottleneck in (Bottleneck.CPU, Bottleneck.HOST), v.sentence
    assert "decode/transform dominates" in v.sentence
    # Running or waiting for a core, hardly ever blocked (that would be IO or the GIL).
    tr = stats.stages["transform"]
    assert tr.blocked_fraction is None or tr.blocked_fraction < 0.3, tr
    assert tr.switches is None or tr.switches / tr.busy_s < 30, tr
    if v.bottleneck is Bottleneck.CPU:
        assert v.actions[0].text.startswith("raise threads from 1 to ")


def test_slow_consumer_is_compute_bound() -> None:
    stats = _run(ledger_source(200), lambda d: d, threads=2, step_s=0.03, batches=12)
    v = stats.verdict
    assert v.bound is Bound.COMPUTE, v.sentence
    assert v.bottleneck is Bottleneck.NONE
    assert stats.stall_fraction < 0.05
    assert stats.steps == 11 and stats.batches == 12 and stats.samples == 96
    assert stats.compute_per_step_s >= 0.025
    assert stats.queues["batches"].slow_side == "consumer"
    assert v.matches("compute-bound") and not v.matches("input-bound")
    assert v.sentence.startswith("compute-bound: only ")


def test_gil_holding_transform_with_threads_flags_contention() -> None:
    stats = _run(ledger_source(200), _python_burn, threads=4, step_s=0.0005, batches=20)
    v = stats.verdict
    assert v.bound in (Bound.INPUT, Bound.PARTIAL), v.sentence
    assert v.bottleneck is Bottleneck.GIL, v.sentence
    assert "GIL contention" in v.sentence
    assert stats.stages["transform"].cpu_per_wall < 0.7
    assert "process workers" in v.actions[0].text


# -- exact numbers on hand-made snapshots ---------------------------------------------


def _snapshot(**over: Any) -> dict[str, Any]:
    """A recorder snapshot of 100 steps of batch 10 with known per-batch figures."""

    def stage(busy: float, cpu: float, runq: float = 0.0, nbytes: int = 0) -> dict[str, Any]:
        return {
            "count": 101,
            "items": 1010,
            "failures": 0,
            "busy_s": busy,
            "cpu_s": cpu,
            "runq_s": runq,
            "switches": 0,
            "bytes": nbytes,
            "p50_s": busy / 101,
            "p90_s": busy / 101,
            "p99_s": busy / 101,
        }

    snap: dict[str, Any] = {
        "elapsed_s": 10.0,
        "process_cpu_s": 4.0,
        "cpu_count": 8,
        "machine_busy": 0.3,
        "io": None,
        "steps": 100,
        "first_batches": 1,
        "wait_s": 5.0,
        "step_wait_s": 5.0,  # 50 ms of 100 ms per step: 50% stall
        "startup_wait_s": 0.0,
        "step_s": 10.0,
        "step_time": {"p50": 0.1, "p90": 0.1, "p99": 0.1},
        "step_wait": {"p50": 0.05, "p90": 0.05, "p99": 0.05},
        "stages": {
            # per batch: read 10 ms, transform 390 ms (on 4 threads: 100 ms per batch)
            "read": stage(1.01, 1.0),
            "transform": stage(39.39, 39.0),
        },
        "queues": {},
    }
    snap.update(over)
    return snap


def test_cpu_verdict_computes_threads_needed() -> None:
    stats = LoaderStats.from_snapshot(_snapshot(), num_threads=4)
    v = stats.verdict
    assert v.bound is Bound.INPUT and v.bottleneck is Bottleneck.CPU, v.sentence
    assert stats.stall_fraction == pytest.approx(0.5)
    assert stats.compute_per_step_s == pytest.approx(0.05)
    # workers need 400 ms per batch; the model 50 ms: ceil(0.4 / 0.05) = 8 threads.
    assert v.actions[0].text == "raise threads from 4 to 8"
    # now a batch every 100 ms; with 8 threads every 50 ms = the model: 2x.
    assert v.actions[0].speedup == pytest.approx(2.0)
    assert "50% of step time waiting for data" in v.sentence


def test_saturated_host_says_more_threads_will_not_help() -> None:
    stats = LoaderStats.from_snapshot(_snapshot(process_cpu_s=76.0), num_threads=4)
    v = stats.verdict
    assert stats.host_busy == pytest.approx(0.95)
    assert v.bottleneck is Bottleneck.HOST, v.sentence
    assert "more threads will not help" in v.sentence
    # supply 100 ms per batch vs 50 ms compute: 2x less CPU per sample needed.
    assert "2.0x less CPU per sample" in v.actions[0].expected


def test_runq_waits_mean_saturation() -> None:
    snap = _snapshot()
    snap["stages"]["transform"]["cpu_s"] = 20.0
    snap["stages"]["transform"]["runq_s"] = 19.0
    stats = LoaderStats.from_snapshot(snap, num_threads=4)
    assert stats.verdict.bottleneck is Bottleneck.HOST, stats.verdict.sentence
    assert stats.stages["transform"].blocked_fraction == pytest.approx(0.39 / 39.39, abs=1e-6)


def test_blocking_switches_in_transform_threads_mean_gil() -> None:
    snap = _snapshot()
    snap["stages"]["transform"].update(cpu_s=12.0, switches=4000)  # ~100 per busy second
    stats = LoaderStats.from_snapshot(snap, num_threads=4)
    assert stats.verdict.bottleneck is Bottleneck.GIL, stats.verdict.sentence
    one_thread = LoaderStats.from_snapshot(snap, num_threads=1)
    assert one_thread.verdict.bottleneck is not Bottleneck.GIL
    snap["stages"]["transform"]["switches"] = 10  # preempted, not blocking: not the GIL
    assert LoaderStats.from_snapshot(snap, num_threads=4).verdict.bottleneck is Bottleneck.CPU


def test_partially_input_bound_band_and_compute_band() -> None:
    partial = LoaderStats.from_snapshot(_snapshot(step_wait_s=1.0, wait_s=1.0), num_threads=4)
    assert partial.verdict.bound is Bound.PARTIAL
    assert partial.verdict.matches("partially-input-bound")
    assert not partial.verdict.matches("input-bound")
    compute = LoaderStats.from_snapshot(_snapshot(step_wait_s=0.4, wait_s=0.4), num_threads=4)
    assert compute.verdict.bound is Bound.COMPUTE
    edge = LoaderStats.from_snapshot(_snapshot(step_wait_s=2.0, wait_s=2.0), num_threads=4)
    assert edge.verdict.bound is Bound.INPUT  # exactly 20%


def test_io_verdict_cache_fraction_from_numbers() -> None:
    snap = _snapshot()
    # read 390 ms per batch, transform 10 ms; 4 threads; model 50 ms.
    snap["stages"]["read"].update(busy_s=39.39, cpu_s=1.0)
    snap["stages"]["transform"].update(busy_s=1.01, cpu_s=1.0)
    stats = LoaderStats.from_snapshot(snap, num_threads=4)
    v = stats.verdict
    assert v.bottleneck is Bottleneck.IO, v.sentence
    # (400 - 390 f) / 4 <= 50  ->  f >= 200/390 = 51%.
    assert v.actions[0].text.startswith("cache 51% of the dataset in RAM")
    assert v.actions[1].text.startswith("raise threads from 4 to 8")
    curve = dict(stats.whatif)
    assert curve[0.0] == pytest.approx(10 / 0.1)  # 100 ms per batch of 10
    assert curve[1.0] == pytest.approx(10 / 0.05)  # capped by the model


def test_copy_dominating_is_copy_bound() -> None:
    snap = _snapshot()
    snap["stages"]["copy"] = dict(snap["stages"]["read"], busy_s=15.15, cpu_s=0.1, bytes=10**9)
    snap["stages"]["transform"].update(busy_s=10.1, cpu_s=10.0)  # 100 ms / 4 threads
    stats = LoaderStats.from_snapshot(snap, num_threads=4, device="cuda")
    assert stats.verdict.bottleneck is Bottleneck.COPY, stats.verdict.sentence
    assert "host-to-device copy dominates" in stats.verdict.sentence
    assert stats.device == "cuda"


def test_no_steps_yet_is_unknown() -> None:
    stats = LoaderStats.collect(Recorder(), gather=False)
    assert stats.verdict.bound is Bound.UNKNOWN
    assert stats.samples == 0 and stats.stages == {}


def test_cache_whatif_math() -> None:
    pts = cache_whatif(
        read_storage_s=0.3,
        read_memory_s=0.01,
        other_s=0.1,
        threads=2,
        batch_size=32,
        compute_s=0.05,
        fractions=(0.0, 0.5, 1.0),
    )
    assert [f for f, _ in pts] == [0.0, 0.5, 1.0]
    assert pts[0][1] == pytest.approx(32 / 0.2)
    assert pts[1][1] == pytest.approx(32 / ((0.15 + 0.005 + 0.1) / 2))
    assert pts[2][1] == pytest.approx(32 / 0.055)


def test_memory_cache_stats_and_to_dict_round_trip(tmp_path) -> None:
    from fastfeed.sources import MemoryCache

    cache = MemoryCache(ledger_source(40), capacity=1 << 20)
    stats = _run(cache, lambda d: d, threads=1, step_s=0.0, batches=3)
    assert stats.cache is not None
    assert stats.cache.misses == 24 and stats.cache.hits == 0
    assert stats.source is not None and stats.source["reads"] == 24
    d = json.loads(stats.to_json())
    assert d["verdict"]["bound"] == stats.verdict.bound.value
    assert d["cache"]["misses"] == 24
    assert set(d["stages"]) == {"read", "transform"}
    assert d["world_size"] == 1 and d["ranks"] == []
    stats.save_json(tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text())["steps"] == 2
    assert "read" in stats.summary()
    table = stats.table()
    assert table.splitlines()[0].split()[:4] == ["stage", "rate/s", "p50", "p99"]
    assert "verdict: " in table


def test_skipped_and_verdict_str() -> None:
    from collections import namedtuple

    entry = namedtuple("entry", "index where")
    stats = LoaderStats.from_snapshot(_snapshot(), num_threads=4, skipped=[7, entry(3, "a.jpg"), 9])
    assert stats.skipped == 3 and stats.skipped_indices == [7, 3, 9]
    assert "3 samples skipped" in stats.summary()
    assert str(stats.verdict) == stats.verdict.sentence
    assert isinstance(stats.verdict, Verdict)


# -- torch.distributed ------------------------------------------------------------------


def _rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rec = Recorder()
        # Rank 1 is starved: it waits 40 ms of each 50 ms step; rank 0 waits 1 ms.
        wait = 0.04 if rank == 1 else 0.001
        t = time.perf_counter()
        rec.add("read", t - 0.01, t, 0.001, items=8)
        rec.consumer_step(wait, None)
        for _ in range(10):
            rec.add("read", t - 0.01, t, 0.001, items=8)
            rec.consumer_step(wait, 0.05)
        stats = LoaderStats.collect(rec, num_threads=2)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(stats.to_dict() | {"summary": stats.summary()}, f)
        # Leave together (tearing gloo down under a peer can abort it); a CPU all_reduce,
        # not barrier(), which may touch CUDA in these forked children when it is present.
        dist.all_reduce(torch.zeros(1))
    finally:
        dist.destroy_process_group()


def test_distributed_gathers_ranks_and_names_the_straggler(tmp_path) -> None:
    import torch.multiprocessing as mp

    init_file = str(tmp_path / "init")
    mp.start_processes(
        _rank_main, args=(2, init_file, str(tmp_path)), nprocs=2, start_method="spawn"
    )
    for rank in (0, 1):
        d = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert d["rank"] == rank and d["world_size"] == 2
        assert [r["rank"] for r in d["ranks"]] == [0, 1]
        assert d["ranks"][1]["stall_fraction"] == pytest.approx(0.8)
        assert d["ranks"][0]["stall_fraction"] == pytest.approx(0.02)
        assert d["ranks"][1]["bound"] == "input-bound"
        assert d["ranks"][0]["bound"] == "compute-bound"
        assert d["slowest_rank"] == 1
        assert d["stragglers"] == [1]
        assert "slowest is rank 1" in d["summary"]
    assert math.isclose(
        json.loads((tmp_path / "rank0.json").read_text())["ranks"][1]["wait_per_step_s"], 0.04
    )
