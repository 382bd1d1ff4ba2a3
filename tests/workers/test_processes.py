"""Loader(processes=K): worker processes running the threaded pipeline into shared memory."""

from __future__ import annotations

import os
import signal
import textwrap
import time

import pytest
import torch

import fastfeed as ff
from fastfeed.errors import LoaderTimeoutError, SampleError, TooManyFailuresError, WorkerError
from fastfeed.testing import (
    Child,
    FaultySource,
    Ledger,
    LedgerDecode,
    LedgerSource,
    ResourceSnapshot,
    run_child,
)


def _batches(loader):
    return [
        (b.data.clone(), None if b.labels is None else b.labels.clone(), b.indices) for b in loader
    ]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2]
        for x, y in zip(a, b, strict=True)
    )


def _children() -> set[int]:
    me = os.getpid()
    out = set()
    for tid in os.listdir(f"/proc/{me}/task"):
        try:
            with open(f"/proc/{me}/task/{tid}/children") as f:
                out.update(int(p) for p in f.read().split())
        except OSError:
            continue
    return out


@pytest.mark.parametrize(("processes", "threads"), [(1, 1), (2, 1), (2, 3)])
def test_batches_are_bit_identical_to_thread_mode(processes, threads):
    src = LedgerSource(700)
    kw = dict(batch_size=32, shuffle=True, seed=5)
    ref = _batches(ff.Loader(src, LedgerDecode(), num_threads=2, **kw))
    with ff.Loader(src, LedgerDecode(), num_threads=threads, processes=processes, **kw) as ld:
        assert ld.processes == processes and ld.num_threads == threads
        assert _same(_batches(ld), ref)
        # persistent workers: the second epoch is the thread mode's second epoch too
        pids = ld._pipeline._pool.pids
        second = _batches(ld)
        assert ld._pipeline._pool.pids == pids
    ref_loader = ff.Loader(src, LedgerDecode(), num_threads=2, **kw)
    list(ref_loader)
    assert _same(second, _batches(ref_loader))


def test_exactly_once_out_of_order_with_skips_and_generic_collate():
    plan = {3, 77, 400, 401, 699}
    src = FaultySource(LedgerSource(700), raise_at=plan)
    with ff.Loader(
        src,
        LedgerDecode(),
        batch_size=16,
        shuffle=True,
        num_threads=2,
        processes=2,
        in_order=False,
        on_error="skip",
    ) as ld:
        ledger = Ledger(range(700))
        for b in ld:
            ledger.add(b)
        ledger.check(skipped=[s.index for s in ld.skipped], injected=plan)
        assert sorted(s.index for s in ld.skipped) == sorted(plan)
        assert {s.stage for s in ld.skipped} == {"read"}
        assert ld.state_dict()["failures"] == len(plan)


def test_generic_collate_and_raw_bytes_travel_through_shared_memory():
    src = LedgerSource(50)

    def to_dict(data):
        row = LedgerDecode()(data)
        return {"x": row, "name": f"r{int(row[0])}", "size": torch.Size([int(row[0]), 2])}

    with ff.Loader(src, to_dict, batch_size=8, num_threads=1, processes=2) as ld:
        batches = list(ld)
    assert [b.indices for b in batches] == [list(range(i, min(i + 8, 50))) for i in range(0, 50, 8)]
    first = batches[0].data
    assert first["x"][:, 0].tolist() == list(range(8))
    assert first["name"] == [f"r{i}" for i in range(8)]
    assert batches[0].labels.tolist() == [i % 10 for i in range(8)]
    with ff.Loader(src, None, batch_size=8, num_threads=1, processes=1) as raw:
        got = next(iter(raw))
    assert [bytes(x) for x in got.data] == [src.read(i).data for i in range(8)]


def test_exact_resume_mid_epoch_across_modes():
    src = LedgerSource(500)
    kw = dict(batch_size=20, shuffle=True, seed=9)
    ld = ff.Loader(src, LedgerDecode(), num_threads=2, processes=2, **kw)
    it = iter(ld)
    head = [next(it).indices for _ in range(7)]
    state = ld.state_dict()
    ld.close()
    resumed = ff.Loader(src, LedgerDecode(), num_threads=1, processes=0, **kw)
    resumed.load_state_dict(state)
    tail = [b.indices for b in resumed]
    full = [b.indices for b in ff.Loader(src, LedgerDecode(), num_threads=1, **kw)]
    assert head + tail == full
    again = ff.Loader(src, LedgerDecode(), num_threads=1, processes=1, **kw)
    again.load_state_dict(state)
    assert [b.indices for b in again] == tail
    again.close()


def test_raise_mode_names_the_sample_and_stage_from_a_worker():
    src = FaultySource(LedgerSource(100), raise_at={42})
    ld = ff.Loader(src, LedgerDecode(), batch_size=10, num_threads=2, processes=2)
    with pytest.raises(SampleError) as info:
        list(ld)
    ld.close()
    err = info.value
    assert err.index == 42 and err.stage == "read" and "ledger[42]" in str(err)
    assert "InjectedError" in str(err)


def test_max_failures_applies_in_process_mode():
    src = FaultySource(LedgerSource(200), raise_at=set(range(0, 200, 7)))
    ld = ff.Loader(
        src,
        LedgerDecode(),
        batch_size=10,
        processes=2,
        num_threads=1,
        on_error="skip",
        max_failures=5,
    )
    with pytest.raises(TooManyFailuresError, match="max_failures=5"):
        list(ld)
    ld.close()


def test_timeout_names_the_batches_in_flight():
    src = FaultySource(LedgerSource(64), stall_at={12}, stall_s=20.0)
    ld = ff.Loader(src, LedgerDecode(), batch_size=4, num_threads=1, processes=1, timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(LoaderTimeoutError) as info:
        list(ld)
    assert time.monotonic() - t0 < 5
    assert "batch 3 indices [12, 13, 14, 15]" in str(info.value)
    assert 12 in info.value.in_flight
    ld.close()


def test_a_worker_killed_mid_epoch_raises_a_typed_error_within_2_s():
    src = LedgerSource(4000, delay_s=0.002)
    ld = ff.Loader(src, LedgerDecode(), batch_size=8, num_threads=1, processes=2)
    it = iter(ld)
    next(it)
    victim = ld._pipeline._pool.workers[1].process.pid
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as info:
        for _ in it:
            pass
    assert time.monotonic() - t0 < 2.0
    err = info.value
    assert err.worker == 1 and err.pid == victim and err.exitcode == -signal.SIGKILL
    assert "fastfeed-worker-1" in str(err) and "SIGKILL" in str(err)
    assert isinstance(err, RuntimeError)
    # a new epoch starts a fresh pool
    assert len(list(ld)) == 500
    ld.close()


def test_close_stops_workers_and_frees_descriptors_after_many_create_break_cycles():
    src = LedgerSource(400)
    list(ff.Loader(src, LedgerDecode(), batch_size=8, num_threads=1, processes=1))  # warm
    before = ResourceSnapshot()
    kids_before = _children()
    for k in range(200 if os.environ.get("FASTFEED_SOAK") else 40):
        ld = ff.Loader(src, LedgerDecode(), batch_size=8, num_threads=1, processes=1)
        for n, _ in enumerate(ld):
            if n == k % 5:
                break
        if k % 2:
            ld.close()
        else:
            del ld  # garbage collection stops the workers too
    import gc

    gc.collect()
    after = ResourceSnapshot.settle(before, timeout_s=5.0)
    assert after.excess_over(before) == ""
    deadline = time.monotonic() + 5
    while _children() - kids_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _children() - kids_before == set()


def test_training_process_sigkilled_leaves_no_workers_and_no_shared_memory():
    shm_before = set(os.listdir("/dev/shm"))
    child = Child(
        textwrap.dedent(
            """
            import os, fastfeed as ff
            from fastfeed.testing import LedgerSource, LedgerDecode
            ld = ff.Loader(LedgerSource(100000, delay_s=0.001), LedgerDecode(), batch_size=8,
                           num_threads=1, processes=2)
            it = iter(ld)
            next(it)
            print("PIDS " + " ".join(map(str, ld._pipeline._pool.pids)) + " END", flush=True)
            import time; time.sleep(60)
            """
        ),
        timeout_s=60,
    )
    try:
        child.wait_for(" END")
        out = bytes(child._out).decode()
        pids = [int(p) for p in out.split("PIDS", 1)[1].split("END")[0].split()]
        assert len(pids) == 2
        child.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 3
        alive = pids
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = [p for p in pids if os.path.exists(f"/proc/{p}") and not _zombie(p)]
        assert alive == []
    finally:
        child.kill()
    # multiprocessing's named semaphores (sem.mp-*) of other processes on the machine
    # appear and vanish at any time; fastfeed creates nothing in /dev/shm at all.
    left = {n for n in set(os.listdir("/dev/shm")) - shm_before if not n.startswith("sem.")}
    assert left == set()


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_spawn_start_method_gives_the_same_batches():
    res = run_child(
        textwrap.dedent(
            """
            import torch, fastfeed as ff
            from fastfeed.testing import LedgerSource, LedgerDecode
            if __name__ == "__main__":
                src = LedgerSource(300)
                kw = dict(batch_size=16, shuffle=True, seed=3)
                ref = [b.data.clone() for b in ff.Loader(src, LedgerDecode(), num_threads=1, **kw)]
                with ff.Loader(src, LedgerDecode(), num_threads=2, processes=2,
                               start_method="spawn", **kw) as ld:
                    got = [b.data.clone() for b in ld]
                same = len(ref) == len(got) and all(torch.equal(a, b) for a, b in zip(ref, got))
                print("SAME", same)
            """
        ),
        timeout_s=120,
    )
    assert "SAME True" in res.stdout, res.stderr


def test_ctrl_c_in_the_training_loop_stops_the_workers():
    child = Child(
        textwrap.dedent(
            """
            import signal, fastfeed as ff
            signal.signal(signal.SIGINT, signal.default_int_handler)
            from fastfeed.testing import LedgerSource, LedgerDecode
            ld = ff.Loader(LedgerSource(100000, delay_s=0.001), LedgerDecode(), batch_size=8,
                           num_threads=1, processes=2)
            try:
                for n, b in enumerate(ld):
                    if n == 2:
                        print("RUNNING", flush=True)
            except KeyboardInterrupt:
                print("INTERRUPTED", flush=True)
            """
        ),
        timeout_s=60,
    )
    try:
        child.wait_for("RUNNING")
        child.send_signal(signal.SIGINT)
        res = child.finish(timeout_s=10)
    finally:
        child.kill()
    assert "INTERRUPTED" in res.stdout and res.returncode == 0, res.stderr
    assert res.duration_s < 30


def test_memory_cache_in_worker_processes_warns_about_copies():
    cache = ff.MemoryCache(LedgerSource(10), capacity=1 << 20)
    with pytest.warns(UserWarning, match="each worker process fills its own copy"):
        ld = ff.Loader(cache, LedgerDecode(), processes=2, num_threads=1)
    ld.close()


def test_stats_say_which_mode_ran_and_why():
    with ff.Loader(
        LedgerSource(40), LedgerDecode(), batch_size=8, processes=2, num_threads=1
    ) as ld:
        list(ld)
        ex = ld.stats().execution
    assert ex == {
        "mode": "processes",
        "processes": 2,
        "threads": 1,
        "in_flight": 4,
        "reason": "processes=2 given",
        "order": "sequential",
    }
    stages = ld.stats().to_dict()["stages"]
    assert stages["read"]["items"] == 40  # worker spans reach the training process


def test_auto_chooses_threads_for_cpu_training_and_processes_for_cuda():
    from fastfeed.pipeline.assemble import choose_processes

    assert choose_processes("auto", None, cores=16)[0] == 0
    cuda = torch.device("cuda", 0)
    assert choose_processes("auto", cuda, cores=2) == (0, "auto: only 2 cores: in-process threads")
    assert choose_processes("auto", cuda, cores=16)[0] == 4
    assert choose_processes("auto", cuda, cores=8)[0] == 2
    assert choose_processes(3, None) == (3, "processes=3 given")


def test_held_batches_never_change_while_slots_are_reused():
    src = LedgerSource(800)
    with ff.Loader(src, LedgerDecode(), batch_size=16, num_threads=1, processes=2) as ld:
        kept = []
        for n, b in enumerate(ld):
            if n % 5 == 0:
                kept.append((b.indices, b.data))
        stats = ld._pipeline.ring_stats()
    for indices, data in kept:
        assert data[:, 0].tolist() == indices
    assert stats["reuses"] > 0


def test_auto_keeps_threads_when_the_work_does_not_pickle(monkeypatch):
    import fastfeed.pipeline.assemble as asm

    monkeypatch.setattr(asm, "choose_processes", lambda requested, device: (2, "auto: test"))
    ld = ff.Loader(LedgerSource(16), lambda data: LedgerDecode()(data), batch_size=4)
    assert ld.processes == 0
    assert ld.stats().execution["reason"].startswith("auto: the loader's work does not pickle")
    assert len(list(ld)) == 4
    picklable = ff.Loader(LedgerSource(16), LedgerDecode(), batch_size=4, num_threads=1)
    assert picklable.processes == 2
    assert [b.indices for b in picklable] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9, 10, 11],
        [12, 13, 14, 15],
    ]
    picklable.close()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_interpreter_exit_mid_epoch_stops_the_workers(method):
    res = run_child(
        textwrap.dedent(
            f"""
            import fastfeed as ff
            from fastfeed.testing import LedgerSource, LedgerDecode
            if __name__ == "__main__":
                ld = ff.Loader(LedgerSource(100000, delay_s=0.001), LedgerDecode(),
                               batch_size=8, num_threads=2, processes=2,
                               start_method={method!r})
                it = iter(ld)
                next(it)
                print("PIDS " + " ".join(map(str, ld._pipeline._pool.pids)) + " END")
            """
        ),
        timeout_s=60,
    )
    assert res.returncode == 0, res.stderr
    pids = [int(p) for p in res.stdout.split("PIDS", 1)[1].split("END")[0].split()]
    deadline = time.monotonic() + 3
    while any(os.path.exists(f"/proc/{p}") and not _zombie(p) for p in pids):
        assert time.monotonic() < deadline, "workers outlived the training process"
        time.sleep(0.05)


def test_a_codec_segfault_in_a_worker_is_a_worker_error_naming_the_signal():
    decode = LedgerDecode()

    class Crashy:
        def sample_spec(self):
            return decode.sample_spec()

        def __call__(self, data, out=None):
            row = decode(data, out)
            if int(row[0]) == 77:
                os.kill(os.getpid(), signal.SIGSEGV)  # what a crashing C decoder does
            return row

    ld = ff.Loader(
        LedgerSource(200),
        Crashy(),
        batch_size=8,
        num_threads=1,
        processes=2,
        start_method="fork",
    )
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="SIGSEGV") as info:
        list(ld)
    assert time.monotonic() - t0 < 10
    assert 77 in info.value.in_flight and "indices [72, 73, 74, 75, 76, 77" in str(info.value)
    ld.close()


def test_distributed_shards_are_the_same_in_process_mode():
    src = LedgerSource(103)
    kw = dict(batch_size=8, shuffle=True, seed=2, world_size=2)
    for rank in (0, 1):
        ref = [b.indices for b in ff.Loader(src, LedgerDecode(), rank=rank, num_threads=1, **kw)]
        with ff.Loader(src, LedgerDecode(), rank=rank, num_threads=1, processes=2, **kw) as ld:
            assert [b.indices for b in ld] == ref


def test_raw_records_that_are_memoryviews_travel_as_bytes():
    class Views(LedgerSource):
        def _read_one(self, index):
            rec = super()._read_one(index)
            return type(rec)(memoryview(bytes(rec.data)), rec.label)

    src = Views(20)
    with ff.Loader(src, None, batch_size=5, num_threads=1, processes=1, start_method="fork") as ld:
        got = [bytes(x) for b in ld for x in b.data]
    assert got == [LedgerSource(20).read(i).data for i in range(20)]
