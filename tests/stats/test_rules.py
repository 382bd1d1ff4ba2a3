"""The diagnosis rules on hand-made snapshots: exact verdicts, actions and predictions."""

from __future__ import annotations

import pytest
from snapshots import snapshot, stage, stats_of

from fastfeed.stats import Bottleneck, Bound, LoaderStats, cache_whatif
from fastfeed.stats.analyze import analyze
from fastfeed.stats.probe import SourceFacts


def test_cpu_verdict_raises_threads_capped_by_free_cores() -> None:
    stats = stats_of(snapshot())
    v = stats.verdict
    assert v.bound is Bound.INPUT and v.bottleneck is Bottleneck.CPU, v.sentence
    assert stats.stall_fraction == pytest.approx(0.5)
    assert stats.compute_per_step_s == pytest.approx(0.05)
    # Workers need 400 ms per batch, the model 50 ms: 8 threads; 8 cores are free.
    assert v.actions[0].text == "raise num_threads from 4 to 8"
    assert v.actions[0].speedup == pytest.approx(2.0)
    assert "50% of step time waiting for data" in v.sentence


def test_other_processes_load_caps_the_prediction() -> None:
    # 60% of 8 cores busy: 4.8 cores, 0.4 of them ours: others keep 4.4 busy.
    stats = stats_of(snapshot(machine_busy=0.6))
    assert stats.others_cores == pytest.approx(4.4)
    assert stats.available_cores == pytest.approx(3.6)
    v = stats.verdict
    # 4 threads on 3.6 free cores: more threads will not help.
    assert v.bottleneck is Bottleneck.HOST, v.sentence
    assert "other processes keep 4.4 of 8 cores busy" in v.sentence
    assert not any(a.text.startswith("raise") for a in v.actions)


def test_saturated_host_says_more_threads_will_not_help() -> None:
    stats = stats_of(snapshot(process_cpu_s=76.0, machine_busy=0.95))
    v = stats.verdict
    assert stats.host_busy == pytest.approx(0.95)
    assert v.bottleneck is Bottleneck.HOST, v.sentence
    assert "more threads will not help" in v.sentence


def test_runq_waits_mean_saturation() -> None:
    snap = snapshot()
    snap["stages"]["transform"].update(cpu_s=20.0, runq_s=19.0)
    stats = stats_of(snap)
    assert stats.verdict.bottleneck is Bottleneck.HOST, stats.verdict.sentence
    assert stats.stages["transform"].blocked_fraction == pytest.approx(0.39 / 39.39, abs=1e-6)
    assert stats.stages["transform"].split().shares()["runq"] == pytest.approx(19 / 39.39)


def test_blocking_with_a_busy_gil_is_gil_and_with_a_free_gil_is_io() -> None:
    snap = snapshot(gil={"wakeups": 500, "wait_per_acquire_s": 0.005, "runq_s": 0.0})
    snap["stages"]["transform"].update(cpu_s=12.0, switches=4000)
    stats = stats_of(snap)
    tr = stats.stages["transform"]
    assert tr.gil_s == pytest.approx(20.0)  # 4000 acquisitions x 5 ms, under 27.39 blocked
    assert tr.io_wait_s == pytest.approx(27.39 - 20.0)
    assert stats.verdict.bottleneck is Bottleneck.GIL, stats.verdict.sentence
    assert "wait for each other's GIL" in stats.verdict.sentence
    assert stats_of(snap, threads=1).verdict.bottleneck is not Bottleneck.GIL
    free = snapshot()
    free["stages"]["transform"].update(cpu_s=12.0, switches=4000)
    assert stats_of(free).verdict.bottleneck is Bottleneck.IO


def test_gil_action_for_a_dataset_is_worker_type_process() -> None:
    snap = snapshot(gil={"wakeups": 500, "wait_per_acquire_s": 0.005, "runq_s": 0.0})
    snap["stages"]["transform"].update(cpu_s=12.0, switches=4000)
    v = stats_of(snap, kind="dataset").verdict
    assert v.actions[0].text == 'use worker_type="process" with num_workers=4', v.actions
    # Without the GIL wait each of 4 processes spends CPU 13 s + other blocking 7.4 s
    # over 101 batches: a batch every 50.5 ms instead of 100 ms.
    assert v.actions[0].speedup == pytest.approx(0.1 / ((13.0 + 7.4) / 101 / 4))


def test_bands_partially_input_bound_and_compute_bound() -> None:
    partial = stats_of(snapshot(step_wait_s=1.0, wait_s=1.0))
    assert partial.verdict.bound is Bound.PARTIAL
    assert partial.verdict.matches("partially-input-bound")
    assert not partial.verdict.matches("input-bound")
    compute = stats_of(snapshot(step_wait_s=0.4, wait_s=0.4))
    assert compute.verdict.bound is Bound.COMPUTE
    assert stats_of(snapshot(step_wait_s=2.0, wait_s=2.0)).verdict.bound is Bound.INPUT


def test_io_verdict_offers_threads_and_memory_cache_around_a_source() -> None:
    snap = snapshot()
    snap["stages"]["read"].update(busy_s=39.39, cpu_s=1.0)
    snap["stages"]["transform"].update(busy_s=1.01, cpu_s=1.0)
    stats = stats_of(snap, storage="FileSource", dataset_bytes=10 << 20)
    v = stats.verdict
    assert v.bottleneck is Bottleneck.IO, v.sentence
    texts = [a.text for a in v.actions]
    assert texts[0].startswith("raise num_threads from 4 to 8"), texts
    assert any("MemoryCache(source" in t and "10.0 MiB" in t for t in texts), texts
    assert any(t.startswith("pack the files into one LMDB") for t in texts), texts
    curve = dict(stats.whatif)
    assert curve[0.0] == pytest.approx(10 / 0.1)  # 100 ms per batch of 10
    assert curve[1.0] == pytest.approx(10 / 0.05)  # capped by the model


def test_io_verdict_for_a_plain_dataset_never_offers_memory_cache() -> None:
    snap = snapshot()
    snap["stages"]["read"].update(busy_s=39.39, cpu_s=1.0)
    snap["stages"]["transform"].update(busy_s=1.01, cpu_s=1.0)
    stats = stats_of(snap, kind="dataset")
    texts = [a.text for a in stats.verdict.actions]
    assert texts[0].startswith("raise num_workers from 4 to 8"), texts
    assert not any("MemoryCache" in t for t in texts), texts
    assert any("fastfeed pack" in t and "fastfeed.Loader" in t for t in texts), texts
    assert stats.whatif == []  # a Dataset's read is its whole __getitem__: no cache curve


def test_decode_inside_getitem_counts_as_cpu_not_io() -> None:
    # A DataLoader's "read" stage is dataset[i]: here it computes 95% of the time.
    snap = snapshot()
    snap["stages"] = {"read": stage(39.39, 37.5), "collate": stage(1.01, 1.0)}
    stats = stats_of(snap, kind="dataset")
    assert stats.verdict.bottleneck is Bottleneck.CPU, stats.verdict.sentence
    assert stats.stages["read"].split().shares()["cpu"] == pytest.approx(37.5 / 39.39)


def test_copy_dominating_is_copy_bound() -> None:
    snap = snapshot()
    snap["stages"]["copy"] = stage(15.15, 0.1, nbytes=10**9)
    snap["stages"]["transform"].update(busy_s=10.1, cpu_s=10.0)
    stats = analyze(snap, batch_size=10, num_threads=4, device="cuda")
    assert stats.verdict.bottleneck is Bottleneck.COPY, stats.verdict.sentence
    assert "host-to-device copy" in stats.verdict.sentence
    assert stats.device == "cuda"


def test_pack_already_at_400_gets_no_repack_advice() -> None:
    stats = stats_of(
        snapshot(machine_busy=0.95), storage="LMDBSource", is_pack=True, packed_max_side=400
    )
    texts = [a.text for a in stats.verdict.actions]
    assert stats.verdict.bottleneck is Bottleneck.HOST
    assert not any("--max-side" in t or "repack" in t for t in texts), texts
    assert "already packed at max_side 400" in stats.verdict.actions[0].expected
    big = stats_of(
        snapshot(machine_busy=0.95), storage="LMDBSource", is_pack=True, packed_max_side=2048
    )
    assert big.verdict.actions[0].text.startswith("repack with fastfeed pack")
    unresized = stats_of(snapshot(machine_busy=0.95), storage="LMDBSource", is_pack=True)
    assert "--max-side 512" in unresized.verdict.actions[0].text


def test_noisy_neighbour_is_named_with_the_gil() -> None:
    snap = snapshot(
        gil={"wakeups": 500, "wait_per_acquire_s": 0.005, "runq_s": 0.0},
        consumer={"steps": 100, "compute_s": 5.0, "cpu_s": 2.0, "runq_s": 0.5, "switches": 500},
    )
    stats = stats_of(snap, kind="dataset")
    nb = stats.neighbour
    assert nb is not None and nb.cause == "gil"
    # blocked 2.5 s, all of it GIL (500 x 5 ms); undisturbed 5 - 0.5 - 2.5 = 2 s.
    assert nb.slowdown == pytest.approx(1.5)
    assert nb.sentence.startswith("the loader's threads slow your step by 150% (GIL)")
    assert 'worker_type="process"' in nb.sentence
    assert "slow your step by 150% (GIL)" in stats.summary()


def test_process_workers_are_not_named_as_the_gil_neighbour() -> None:
    """With worker processes the loop's GIL waits come from its own process's threads."""
    snap = snapshot(
        gil={"wakeups": 500, "wait_per_acquire_s": 0.005, "runq_s": 0.0},
        consumer={"steps": 100, "compute_s": 5.0, "cpu_s": 2.0, "runq_s": 0.5, "switches": 500},
    )
    ex = {"mode": "processes", "processes": 2, "reason": "given"}
    stats = analyze(
        snap, batch_size=10, num_threads=2, facts=SourceFacts(kind="dataset"), execution=ex
    )
    nb = stats.neighbour
    assert nb is not None and nb.slowdown == pytest.approx(1.5)
    assert nb.sentence == (
        "other threads of this process slow your step by 150% (GIL); the loader's workers "
        "are processes and do not hold it"
    )
    assert 'worker_type="process"' not in stats.summary()


def test_process_workers_without_stage_times_get_thread_advice() -> None:
    snap = snapshot(stages={})
    ex = {"mode": "processes", "processes": 2, "reason": "given"}
    ours = analyze(
        snap, batch_size=10, num_threads=2, facts=SourceFacts(kind="dataset"), execution=ex
    )
    assert ours.verdict.sentence.endswith(
        "the worker processes time their stages where fastfeed does not see them, so what "
        "is slow is not measured"
    )
    assert ours.verdict.actions[0].text.startswith('run a few epochs with worker_type="thread"')
    threads = analyze(snap, batch_size=10, num_threads=2, facts=SourceFacts(kind="dataset"))
    assert "no pipeline stage reported its time" in threads.verdict.sentence


def test_run_queue_wait_with_free_cores_is_the_gil_not_a_core_shortage() -> None:
    # The loop's step: 2 s CPU, 1 s runnable-but-not-running, 0.2 s blocked, 50 GIL
    # acquisitions of 5 ms (capped by the 0.2 s blocked): run queue > GIL estimate.
    consumer = {"steps": 100, "compute_s": 3.2, "cpu_s": 2.0, "runq_s": 1.0, "switches": 50}
    gil = {"wakeups": 500, "wait_per_acquire_s": 0.005, "runq_s": 0.0}
    # 2 cores, this process kept 1 busy, nothing else ran: the wait is GIL hand-offs.
    quiet = snapshot(gil=gil, consumer=consumer, cpu_count=2, process_cpu_s=10.0)
    quiet["machine_busy"] = 0.5
    nb = stats_of(quiet, threads=2, kind="dataset").neighbour
    assert nb is not None and nb.cause == "gil", nb
    assert "(GIL)" in nb.sentence
    # The same loop while other processes kept the second core busy: cores were short.
    busy = snapshot(gil=gil, consumer=consumer, cpu_count=2, process_cpu_s=10.0)
    busy["machine_busy"] = 1.0
    nb = stats_of(busy, threads=2, kind="dataset").neighbour
    assert nb is not None and nb.cause == "cores", nb
    assert "waiting for a core" in nb.sentence
    assert nb.slowdown == pytest.approx((1.0 + 0.2) / (3.2 - 1.0 - 0.2))


def test_a_sleeping_step_is_not_a_noisy_neighbour() -> None:
    snap = snapshot(
        gil={"wakeups": 500, "wait_per_acquire_s": 0.0001, "runq_s": 0.0},
        consumer={"steps": 100, "compute_s": 5.0, "cpu_s": 0.05, "runq_s": 0.01, "switches": 100},
    )
    nb = stats_of(snap).neighbour
    assert nb is not None and nb.slowdown < 0.01 and nb.sentence == ""


def test_loader_alone_and_no_batches() -> None:
    snap = snapshot(steps=0, first_batches=0, step_s=0.0, step_wait_s=0.0, wait_s=0.0)
    alone = stats_of(snap)
    assert alone.batches == 101 and alone.samples == 1010
    assert alone.verdict.sentence.startswith("loader alone")
    empty = analyze({"elapsed_s": 1.0, "cpu_count": 2}, batch_size=4, num_threads=2)
    assert empty.verdict.bound is Bound.UNKNOWN and empty.samples == 0


def test_batch_size_is_taken_not_guessed() -> None:
    snap = snapshot()
    snap["stages"]["read"].update(items=7, count=3)  # counted differently: changes nothing
    stats = analyze(snap, batch_size=10, num_threads=4)
    assert stats.batch_size == 10 and stats.samples == 101 * 10
    assert stats.verdict.actions[0].text == "raise num_workers from 4 to 8"  # watch(): opaque
    watched = analyze(snapshot(stages={}), batch_size=None, num_threads=None)
    assert watched.samples == 0 and watched.batch_size is None


def test_cache_whatif_math_and_core_cap() -> None:
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
    capped = cache_whatif(
        read_storage_s=0.0, read_memory_s=0.0, other_s=0.1, threads=4, batch_size=32, cores=1.0
    )
    assert capped[0][1] == pytest.approx(32 / 0.1)  # 4 threads, one free core


def test_execution_is_reported() -> None:
    ex = {"mode": "processes", "processes": 2, "reason": "GIL-bound transform measured"}
    stats = analyze(snapshot(), batch_size=10, num_threads=4, execution=ex)
    assert stats.to_dict()["execution"] == ex
    assert "Workers ran as processes (2 processes): GIL-bound transform measured" in (
        stats.summary()
    )
    assert isinstance(stats, LoaderStats)
