"""MemoryCache(shared=True): one copy per machine, filled once, released by the kernel."""

from __future__ import annotations

import json
import os
import pickle
import signal
import textwrap
import time
import uuid
import warnings

import pytest

import fastfeed as ff
from fastfeed.errors import ConfigError
from fastfeed.sources import shared_cache
from fastfeed.sources.memory import MemoryCache
from fastfeed.testing import Child, Ledger, LedgerDecode, LedgerSource, ledger_record, run_child

# The source every process builds: a ledger with an identity (tag keeps tests apart).
PRELUDE = textwrap.dedent(
    """
    import json, os, sys, time
    from fastfeed.testing import LedgerSource, ledger_record
    from fastfeed.sources.memory import MemoryCache
    from fastfeed.sources import shared_cache

    class SharedLedger(LedgerSource):
        def __init__(self, n, tag, **kw):
            super().__init__(n, **kw)
            self.tag = tag
            self.announce = False

        def identity(self):
            return ("SharedLedger", self.n, self.salt, self.pad_bytes, self.tag)

        def _read_one(self, index):
            if self.announce:
                self.announce = False
                print("READING", flush=True)
            return super()._read_one(index)

    def check(recs, indices, pad):
        bad = [i for i, r in zip(indices, recs) if bytes(r.data) != ledger_record(i, 0, pad)
               or r.label != i % 10]
        assert not bad, f"wrong bytes for {bad[:5]}"
    """
)
exec(PRELUDE)  # the same class in this process


def _tag() -> str:
    return uuid.uuid4().hex


def _key(n: int, tag: str, capacity: int, pad: int = 0) -> str:
    ident = ("SharedLedger", n, 0, pad, tag)
    return shared_cache.segment_key(ident, n, capacity)


def _memfd_holders(key: str) -> list[int]:
    """Processes holding a descriptor on the segment's memfd (any user-visible pid)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if f"memfd:fastfeed-cache-{key}" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                    out.append(int(pid))
                    break
            except OSError:
                continue
    return out


def _assert_gone(key: str) -> None:
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if key not in shared_cache.list_segments() and not _memfd_holders(key):
            break
        time.sleep(0.05)
    assert key not in shared_cache.list_segments()
    assert _memfd_holders(key) == []
    assert [f for f in os.listdir("/dev/shm") if "fastfeed" in f] == []


def _stats_line(result_stdout: str) -> dict:
    line = [x for x in result_stdout.splitlines() if x.startswith("STATS ")][-1]
    return json.loads(line[6:])


# -- in one process ------------------------------------------------------------------------


def test_single_process_counts_hits_misses_and_fills_exactly():
    tag = _tag()
    src = SharedLedger(50, tag, pad_bytes=100)  # noqa: F821 - from PRELUDE
    rec_bytes = 116
    cache = MemoryCache(src, 20 * rec_bytes, shared=True)
    try:
        key = _key(50, tag, 20 * rec_bytes, 100)
        assert key in shared_cache.list_segments()
        recs = cache.read_many(list(range(50)))
        check(recs, range(50), 100)  # noqa: F821
        again = cache.read_many(list(range(50)))
        check(again, range(50), 100)  # noqa: F821
        st = cache.cache_stats()
        assert st["shared"] is True and cache.machine_wide is True
        assert st["entries"] == 20 and st["bytes_cached"] == 20 * rec_bytes
        assert (st["hits"], st["misses"]) == (20, 80)
        proc = st["process"]
        assert proc["fills"] == 20 and proc["storage_reads"] == 80
        assert proc["read_through"] == 30  # records 20..49 on the second pass
        assert src.counters.reads == 80  # the ground truth: the source's own counter
        m = st["machine"]
        assert m["filled_records"] == 20 and m["skipped_records"] == 30
        assert m["fill_fraction"] == pytest.approx(0.4)
        assert m["used_bytes"] <= m["capacity_bytes"] == 20 * rec_bytes
        assert m["processes"] == 1
        assert cache.cached(19) and not cache.cached(20)
        assert cache.cached_indices() == list(range(20))
        # Hits are views of the segment: they keep it mapped (and its descriptor, which
        # Python's mmap duplicates) until dropped.
        del recs, again
    finally:
        cache.detach()
    _assert_gone(key)


def test_one_attachment_per_process_and_pickle_reattaches():
    tag = _tag()
    a = MemoryCache(SharedLedger(10, tag), 10_000, shared=True)  # noqa: F821
    b = MemoryCache(SharedLedger(10, tag), 10_000, shared=True)  # noqa: F821
    try:
        assert a._store is b._store
        c = pickle.loads(pickle.dumps(a))
        assert c._store is None
        assert c.read(3).data == ledger_record(3)
        assert c._store is a._store
        assert a.cached(3)
    finally:
        a.detach()
        b.detach()


def test_hits_are_read_only_views_or_bytes_copies():
    tag = _tag()
    view = MemoryCache(SharedLedger(4, tag), 10_000, shared=True)  # noqa: F821
    copy = MemoryCache(SharedLedger(4, tag), 10_000, shared=True, zero_copy=False)  # noqa: F821
    try:
        assert type(view.read(1).data) is bytes  # the miss: straight from storage
        hit = view.read(1).data
        assert isinstance(hit, memoryview) and hit.readonly and hit == ledger_record(1)
        with pytest.raises(TypeError):
            hit[0] = 0  # nobody scribbles on the machine's copy
        got = copy.read(1).data
        assert type(got) is bytes and got == ledger_record(1)
        assert pickle.loads(pickle.dumps(got)) == ledger_record(1)
    finally:
        view.detach()
        copy.detach()


def test_errors_are_clear():
    with pytest.raises(ConfigError, match="LedgerSource has no identity"):
        MemoryCache(LedgerSource(10), 1000, shared=True)
    with pytest.raises(ConfigError, match="policy='static' only"):
        MemoryCache(SharedLedger(10, _tag()), 1000, policy="lru", shared=True)  # noqa: F821
    with pytest.raises(ConfigError, match=r"needs 1000\.0 TiB of shared memory, more than"):
        MemoryCache(SharedLedger(10, _tag()), "1000TiB", shared=True)  # noqa: F821
    cache = MemoryCache(SharedLedger(10, _tag()), 1000, shared=True)  # noqa: F821
    try:
        with pytest.raises(ConfigError, match="cannot clear a shared MemoryCache"):
            cache.clear()
    finally:
        cache.detach()


def test_file_source_identity_changes_with_the_data(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.bin"
        p.write_bytes(b"x" * (i + 1))
        paths.append(str(p))
    a = ff.FileSource(paths).identity()
    assert ff.FileSource(paths).identity() == a
    (tmp_path / "1.bin").write_bytes(b"yyyyy")
    assert ff.FileSource(paths).identity() != a


# -- across processes -----------------------------------------------------------------------


def test_fill_is_split_so_each_record_is_read_once_per_machine(tmp_path):
    tag, n = _tag(), 300
    code = PRELUDE + textwrap.dedent(
        f"""
        import threading
        src = SharedLedger({n}, {tag!r}, pad_bytes=2000, delay_s=0.001)
        cache = MemoryCache(src, 10**7, shared=True)
        order = list(range({n}))
        if int(os.environ["WHO"]) % 2:
            order.reverse()
        print("ATTACHED", flush=True)
        while not os.path.exists(os.environ["GO"]):  # all attached: start together
            time.sleep(0.005)
        for lo in range(0, {n}, 16):
            part = order[lo:lo + 16]
            check(cache.read_many(part), part, 2000)
        print("STATS " + json.dumps(dict(reads=src.counters.reads, **cache.cache_stats())))
        """
    )
    kids = [Child(code, env={"WHO": str(w), "GO": str(tmp_path / "go")}) for w in range(3)]
    try:
        for k in kids:
            k.wait_for("ATTACHED")
        (tmp_path / "go").touch()
        results = [k.finish() for k in kids]
    finally:
        for k in kids:
            k.kill()
    for r in results:
        assert r.returncode == 0, r.stderr
    stats = [_stats_line(r.stdout) for r in results]
    # Ground truth: each record left storage exactly once on this machine.
    assert sum(s["reads"] for s in stats) == n
    assert sum(s["process"]["fills"] for s in stats) == n
    assert sum(s["hits"] + s["misses"] for s in stats) == 3 * n
    assert stats[0]["machine"]["filled_records"] == n
    _assert_gone(_key(n, tag, 10**7, 2000))


def test_sigkill_mid_fill_leaves_the_cache_consistent_and_nothing_behind():
    tag, n = _tag(), 200
    key = _key(n, tag, 10**6, 64)
    filler = Child(
        PRELUDE
        + textwrap.dedent(
            f"""
            class Stalling(SharedLedger):
                def _read_one(self, index):
                    if index == 50:  # mid-way through its third claim (records 40..59)
                        print("STALLED", flush=True)
                        time.sleep(120)
                    return super()._read_one(index)

            cache = MemoryCache(Stalling({n}, {tag!r}, pad_bytes=64), 10**6, shared=True)
            for lo in range(0, {n}, 20):
                cache.read_many(list(range(lo, lo + 20)))
            """
        )
    )
    watcher = None
    try:
        filler.wait_for("STALLED")
        reader = Child(
            PRELUDE
            + textwrap.dedent(
                f"""
                src = SharedLedger({n}, {tag!r}, pad_bytes=64)
                cache = MemoryCache(src, 10**6, shared=True)
                check(cache.read_many(list(range({n}))), range({n}), 64)
                check(cache.read_many(list(range({n}))), range({n}), 64)
                print("STATS " + json.dumps(dict(reads=src.counters.reads, **cache.cache_stats())))
                """
            )
        )
        # Watch the machine's counters until the reader waits on the filler's 20 claims.
        watcher = MemoryCache(SharedLedger(n, tag, pad_bytes=64), 10**6, shared=True)  # noqa: F821
        deadline = time.monotonic() + 30.0
        while watcher.cache_stats()["machine"]["waits"] < 20:
            assert time.monotonic() < deadline, watcher.cache_stats()
            time.sleep(0.02)
        watcher.detach()
        filler.send_signal(signal.SIGKILL)
        res = reader.finish()
        assert res.returncode == 0, res.stderr
    finally:
        if watcher is not None:
            watcher.detach()
        filler.kill()
    assert filler.proc.returncode == -signal.SIGKILL
    st = _stats_line(res.stdout)
    proc, m = st["process"], st["machine"]
    assert proc["hits"] == 40 + n  # the filler's two published chunks, then everything
    assert proc["waits"] == 20 and proc["reclaims"] == 20  # the dead filler's claims
    assert st["reads"] == n - 40  # each record still left storage once on this machine
    assert proc["fills"] == n - 40 and m["filled_records"] == n
    assert m["fills"] == n  # the filler's counters outlive it
    _assert_gone(key)


def test_a_restarted_process_reattaches_and_the_last_one_out_frees_it(tmp_path):
    tag, n = _tag(), 120
    key = _key(n, tag, 10**6)
    go = tmp_path / "go"
    holder = Child(
        PRELUDE
        + textwrap.dedent(
            f"""
            src = SharedLedger({n}, {tag!r})
            cache = MemoryCache(src, 10**6, shared=True)
            cache.preload(progress=False)
            print("FILLED", flush=True)
            while not os.path.exists({str(go)!r}):
                time.sleep(0.02)
            """
        )
    )
    rank = PRELUDE + textwrap.dedent(
        f"""
        src = SharedLedger({n}, {tag!r})
        cache = MemoryCache(src, 10**6, shared=True)
        before = cache.cache_stats()["machine"]["fill_fraction"]
        check(cache.read_many(list(range({n}))), range({n}), 0)
        st = cache.cache_stats()
        print("STATS " + json.dumps(dict(reads=src.counters.reads, before=before, **st)))
        """
    )
    try:
        holder.wait_for("FILLED")
        for _ in range(2):  # a rank, then the same rank restarted
            st = _stats_line(run_child(rank).stdout)
            assert st["before"] == 1.0 and st["reads"] == 0 and st["hits"] == n
        go.touch()
        assert holder.finish().returncode == 0
    finally:
        holder.kill()
    _assert_gone(key)
    st = _stats_line(run_child(rank).stdout)  # a fresh copy: the old one was freed
    assert st["before"] == 0.0 and st["reads"] == n
    _assert_gone(key)


def test_machine_wide_capacity_and_a_fixed_hit_rate(tmp_path):
    tag, n, rec = _tag(), 400, 16 + 1000
    capacity = 160 * rec  # 40 % of the data
    code = PRELUDE + textwrap.dedent(
        f"""
        src = SharedLedger({n}, {tag!r}, pad_bytes=1000)
        cache = MemoryCache(src, {capacity}, shared=True)
        cut = int(os.environ["WHO"]) * 37
        order = list(range({n}))[cut:] + list(range({n}))[:cut]
        for lo in range(0, {n}, 10):
            check(cache.read_many(order[lo:lo + 10]), order[lo:lo + 10], 1000)
        print("FILLED", flush=True)
        while not os.path.exists({str(tmp_path / "go")!r}):
            time.sleep(0.02)
        cache.reset_stats()
        check(cache.read_many(order), order, 1000)
        print("STATS " + json.dumps(cache.cache_stats()))
        """
    )
    kids = [Child(code, env={"WHO": str(w)}) for w in range(3)]
    try:
        for k in kids:
            k.wait_for("FILLED")
        (tmp_path / "go").touch()
        results = [k.finish() for k in kids]
    finally:
        for k in kids:
            k.kill()
    stats = [_stats_line(r.stdout) for r in results]
    m = stats[-1]["machine"]
    assert m["used_bytes"] <= capacity and m["filled_bytes"] <= capacity
    assert m["filled_records"] + m["skipped_records"] == n
    assert m["filled_records"] == 160  # the space is used: 160 records fit exactly
    for s in stats:  # static: every later pass hits exactly the cached records
        assert s["hits"] == m["filled_records"] and s["misses"] == n - m["filled_records"]
    _assert_gone(_key(n, tag, capacity, 1000))


def test_readers_never_see_a_partial_record(tmp_path):
    # 256 KiB records: a reader that saw one before its copy finished would get zero
    # pages at its end (fresh memfd pages are zero).
    tag, n, pad = _tag(), 96, 256 * 1024
    code = PRELUDE + textwrap.dedent(
        f"""
        import random, threading
        src = SharedLedger({n}, {tag!r}, pad_bytes={pad})
        cache = MemoryCache(src, 10**8, shared=True)
        print("ATTACHED", flush=True)
        while not os.path.exists(os.environ["GO"]):  # all attached: start together
            time.sleep(0.005)
        errors = []
        def run(seed):
            order = list(range({n}))
            random.Random(seed).shuffle(order)
            for lo in range(0, {n}, 4):
                part = order[lo:lo + 4]
                try:
                    check(cache.read_many(part), part, {pad})
                except AssertionError as exc:
                    errors.append(str(exc))
        threads = [threading.Thread(target=run, args=(int(os.environ["WHO"]) * 10 + t,))
                   for t in range(2)]
        for t in threads: t.start()
        for t in threads: t.join()
        assert not errors, errors[:3]
        print("STATS " + json.dumps(dict(reads=src.counters.reads, **cache.cache_stats())))
        """
    )
    kids = [Child(code, env={"WHO": str(w), "GO": str(tmp_path / "go")}) for w in range(3)]
    try:
        for k in kids:
            k.wait_for("ATTACHED")
        (tmp_path / "go").touch()
        results = [k.finish() for k in kids]
    finally:
        for k in kids:
            k.kill()
    for r in results:
        assert r.returncode == 0, r.stderr
    stats = [_stats_line(r.stdout) for r in results]
    assert sum(s["reads"] for s in stats) == n
    assert sum(s["process"]["fills"] for s in stats) == n
    _assert_gone(_key(n, tag, 10**8, pad))


def test_spawned_workers_attach_to_the_training_process_copy():
    tag, n = _tag(), 120
    cache = MemoryCache(SharedLedger(n, tag), 10**6, shared=True)  # noqa: F821
    cache.preload(progress=False)  # filled here: spawned workers must find this copy
    key = _key(n, tag, 10**6)
    loader = ff.Loader(
        cache, LedgerDecode(), batch_size=20, num_threads=1, processes=2, start_method="spawn"
    )
    try:
        ledger = Ledger(range(n))
        for batch in loader:
            ledger.add(batch)
        ledger.check()
        m = cache.cache_stats()["machine"]
        assert m["storage_reads"] == n  # the preload's only: the workers read none
        assert m["hits"] == n
    finally:
        loader.close()
        cache.detach()
    _assert_gone(key)


def test_loader_worker_processes_share_one_copy_exactly_once():
    tag, n = _tag(), 500
    src = SharedLedger(n, tag, pad_bytes=200)  # noqa: F821
    cache = MemoryCache(src, 10**7, shared=True)
    key = _key(n, tag, 10**7, 200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "K copies of the cache" warning
        loader = ff.Loader(
            cache, LedgerDecode(), batch_size=25, shuffle=True, seed=3, num_threads=2, processes=2
        )
    try:
        ledger = Ledger(range(n))
        for epoch in range(2):
            ledger.reset()
            for batch in loader:
                ledger.add(batch)
            ledger.check()
            m = cache.cache_stats()["machine"]
            assert m["storage_reads"] == n  # epoch 1 read each record once; epoch 2 none
            assert m["filled_records"] == n
            assert m["hits"] == epoch * n
        assert src.counters.reads == 0  # the training process read nothing itself
    finally:
        loader.close()
        cache.detach()
    _assert_gone(key)


def test_two_ranks_with_worker_processes_read_each_record_once(tmp_path):
    # Ranks as torchrun starts them: separate interpreters, each with its rank, each a
    # Loader with 2 worker processes over the same shared cache.
    tag, n = _tag(), 400
    code = PRELUDE + textwrap.dedent(
        f"""
        import fastfeed as ff
        from fastfeed.testing import Ledger, LedgerDecode
        rank = int(os.environ["RANK"])
        src = SharedLedger({n}, {tag!r}, pad_bytes=500)
        cache = MemoryCache(src, 10**7, shared=True)
        loader = ff.Loader(cache, LedgerDecode(), batch_size=20, shuffle=True, seed=9,
                           num_threads=2, processes=2, rank=rank, world_size=2)
        print("ATTACHED", flush=True)
        while not os.path.exists(os.environ["GO"]):
            time.sleep(0.005)
        seen = []
        for epoch in range(2):
            ledger = Ledger(range({n}))
            idx = []
            for batch in loader:
                ledger.add(batch)
                idx.extend(batch.indices)
            assert not [p for p in ledger.problems() if "delivered more than once" in p]
            seen.append(sorted(idx))
        loader.close()
        print("EPOCHS-DONE", flush=True)
        while not os.path.exists(os.environ["GO"] + "2"):  # both ranks done: count
            time.sleep(0.005)
        print("STATS " + json.dumps(dict(seen=seen, **cache.cache_stats())))
        """
    )
    go = str(tmp_path / "go")
    kids = [Child(code, env={"RANK": str(r), "GO": go}) for r in range(2)]
    try:
        for k in kids:
            k.wait_for("ATTACHED")
        (tmp_path / "go").touch()
        for k in kids:
            k.wait_for("EPOCHS-DONE", timeout_s=60)
        (tmp_path / "go2").touch()
        results = [k.finish() for k in kids]
    finally:
        for k in kids:
            k.kill()
    for r in results:
        assert r.returncode == 0, r.stderr
    stats = [_stats_line(r.stdout) for r in results]
    for epoch in range(2):  # the ranks' shards cover the dataset exactly once
        assert sorted(stats[0]["seen"][epoch] + stats[1]["seen"][epoch]) == list(range(n))
    m = stats[-1]["machine"]
    assert m["storage_reads"] == n  # once per machine, not once per rank or worker
    assert m["fills"] == n and m["filled_records"] == n
    assert m["hits"] + m["misses"] == 2 * n
    # Without a training step to keep them in step, one rank's second epoch may wait for
    # records the other is still filling (misses that read nothing): most are hits.
    assert m["hits"] >= n // 2
    _assert_gone(_key(n, tag, 10**7, 500))


def test_out_of_memory_reads_through_and_names_the_size(monkeypatch):
    tag = _tag()
    cache = MemoryCache(SharedLedger(8, tag, pad_bytes=1000), 10**6, shared=True)  # noqa: F821

    def no_memory(fd, offset, length):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(os, "posix_fallocate", no_memory)
    try:
        with pytest.warns(UserWarning, match=r"could not reserve 7\.9 KiB of shared memory"):
            recs = cache.read_many(list(range(8)))
        assert [bytes(r.data) for r in recs] == [ledger_record(i, 0, 1000) for i in range(8)]
        m = cache.cache_stats()["machine"]
        assert m["filled_records"] == 0 and m["skipped_records"] == 8
        assert m["unreserved_bytes"] == 8 * 1016
        again = cache.read_many(list(range(8)))  # read through from then on, correct
        assert [bytes(r.data) for r in again] == [ledger_record(i, 0, 1000) for i in range(8)]
        assert cache.cache_stats()["process"]["read_through"] == 8
    finally:
        cache.detach()
