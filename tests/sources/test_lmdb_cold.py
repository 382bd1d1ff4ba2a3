"""LMDBSource's cold-read path: value offsets from the B-tree, concurrent preads, runs."""

from __future__ import annotations

import ctypes
import os
import random
import threading
from pathlib import Path

import lmdb
import pytest

from fastfeed.errors import RecordReadError
from fastfeed.packing import pack
from fastfeed.sources import LMDBSource, MemoryCache
from fastfeed.sources import _lmdb_io as lmdb_io
from fastfeed.sources import lmdb as lmdb_mod
from fastfeed.testing import ListSource

pytestmark = pytest.mark.skipif(
    lmdb_io._mincore is None, reason="the cold-read path needs Linux (mincore, /proc)"
)


def _payloads(n: int, lo: int, hi: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randint(lo, hi)) for _ in range(n)]


def _nothing_resident(addr: int, length: int, vec: ctypes.Array) -> int:
    ctypes.memset(vec, 0, ctypes.sizeof(vec))
    return 0


class _PreadCounter:
    """Wraps os.pread in the cold-read module to count calls and bytes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.sizes: list[int] = []
        self._lock = threading.Lock()
        real = os.pread

        def pread(fd: int, n: int, off: int) -> bytes:
            with self._lock:
                self.calls += 1
                self.sizes.append(n)
            return real(fd, n, off)

        monkeypatch.setattr(lmdb_io.os, "pread", pread)


@pytest.mark.parametrize(
    ("lo", "hi"),
    [(90_000, 110_000), (2_500, 3_500), (200, 800), (0, 6_000)],
    ids=["100KB", "3KB", "in-leaf", "mixed"],
)
def test_record_index_locates_every_value(tmp_path: Path, lo: int, hi: int) -> None:
    payloads = _payloads(600 if hi > 10_000 else 3000, max(lo, 1), hi)
    pack(ListSource(payloads), tmp_path / "db", progress=False)
    fd = os.open(tmp_path / "db" / "data.mdb", os.O_RDONLY)
    try:
        with lmdb.open(str(tmp_path / "db"), readonly=True, lock=False) as env:
            psize, txnid = env.stat()["psize"], env.info()["last_txnid"]
        ix = lmdb_io.RecordIndex(fd, psize, len(payloads))
        assert ix.txnid == txnid
        for i, data in enumerate(payloads):
            off, size = ix.locate(i)
            assert size == len(data)
            assert os.pread(fd, size, off) == data
        meta = ix.find(lmdb_mod.META_KEY)
        assert meta is not None and os.pread(fd, meta[1], meta[0]).startswith(b"{")
        assert ix.find(b"nope") is None
    finally:
        os.close(fd)


@pytest.mark.parametrize("hi", [110_000, 3_500, 800])
def test_cold_batches_are_read_with_pread_and_match(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hi: int
) -> None:
    payloads = _payloads(400, hi // 2, hi)
    labels = [i % 7 for i in range(len(payloads))]
    pack(ListSource(payloads, labels), tmp_path / "db", progress=False)
    monkeypatch.setattr(lmdb_io, "_mincore", _nothing_resident)  # every page "cold"
    counter = _PreadCounter(monkeypatch)
    order = list(range(len(payloads)))
    random.Random(3).shuffle(order)
    with LMDBSource(tmp_path / "db") as src:
        for k in range(0, len(order), 64):
            batch = order[k : k + 64]
            recs = src.read_many(batch)
            assert [r.data for r in recs] == [payloads[i] for i in batch]
            assert [r.label for r in recs] == [labels[i] for i in batch]
        assert src.run_reads == 0  # a full shuffle reads records, not runs
        threads = {t.name for t in threading.enumerate() if t.name.startswith("fastfeed-lmdb")}
        assert threads and all(t.startswith("fastfeed-lmdb-read-") for t in threads)
    # One pread per value of the 400 (plus B-tree pages), never a page fault per value.
    value_reads = [n for n in counter.sizes if n in {len(p) for p in payloads}]
    assert len(value_reads) >= len(payloads) - 5
    alive = [t for t in threading.enumerate() if t.name.startswith("fastfeed-lmdb-read-")]
    for t in alive:
        t.join(5)
    assert not any(t.is_alive() for t in alive)  # close() ended the read pool


def test_runs_are_read_whole_in_large_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payloads = _payloads(1200, 2_500, 3_500)
    pack(ListSource(payloads), tmp_path / "db", progress=False)
    monkeypatch.setattr(lmdb_io, "_mincore", _nothing_resident)
    counter = _PreadCounter(monkeypatch)
    with LMDBSource(tmp_path / "db", run_bytes=256 * 1024, read_runs=True) as src:
        r = src.run_records
        # 256 KiB of the file's bytes per record (a ~3 KB value takes a 4 KiB page).
        assert r == round(256 * 1024 / src.mean_record_bytes)
        assert 55 <= r <= 90
        batch = list(range(r, 2 * r))  # exactly run 1
        random.Random(0).shuffle(batch)
        recs = src.read_many(batch)
        assert [x.data for x in recs] == [payloads[i] for i in batch]
        assert src.run_reads == 1 and src.unordered_runs == 0
    big = [n for n in counter.sizes if n > 64 * 1024]
    assert len(big) == 1 and 0.9 * 256 * 1024 < big[0] <= 1 << 20  # the run, in one piece


def test_warm_batches_make_no_syscall_per_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payloads = _payloads(2000, 2_500, 3_500)
    pack(ListSource(payloads), tmp_path / "db", progress=False)
    with LMDBSource(tmp_path / "db") as src:
        src.read_many(list(range(2000)))  # now in the page cache
        counter = _PreadCounter(monkeypatch)
        mincalls: list[int] = []
        real = lmdb_io._mincore
        monkeypatch.setattr(
            lmdb_io, "_mincore", lambda a, n, v: mincalls.append(1) or real(a, n, v)
        )
        for k in range(0, 2000, 256):
            recs = src.read_many(list(range(k, min(2000, k + 256))))
            assert recs[0].data == payloads[k]
    assert counter.calls == 0
    # At most 8 probes for each of the 8 calls, and fewer as warm calls skip probing.
    assert len(mincalls) <= 8 * 4


def test_large_records_are_probed_on_every_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cold batch of 80 KB records taken for warm is faulted in a page at a time: after
    # warm calls, the very next cold call must still be found cold and read with pread.
    payloads = _payloads(40, 20_000, 30_000)
    pack(ListSource(payloads), tmp_path / "db", progress=False)
    with LMDBSource(tmp_path / "db") as src:
        for _ in range(4):
            src.read_many(list(range(40)))  # warm: the calls after it would skip probes
        monkeypatch.setattr(lmdb_io, "_mincore", _nothing_resident)  # the cache dropped
        counter = _PreadCounter(monkeypatch)
        recs = src.read_many([5, 17, 30])
        assert [r.data for r in recs] == [payloads[5], payloads[17], payloads[30]]
        assert counter.calls == 3  # one exact pread per record


def test_small_records_skip_probes_after_a_warm_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payloads = _payloads(400, 2_500, 3_500)
    pack(ListSource(payloads), tmp_path / "db", progress=False)
    with LMDBSource(tmp_path / "db") as src:
        src.read_many(list(range(400)))
        src.read_many(list(range(400)))  # warm verdict: the next call skips its probes
        monkeypatch.setattr(lmdb_io, "_mincore", _nothing_resident)
        counter = _PreadCounter(monkeypatch)
        assert src.read_many([7])[0].data == payloads[7]
        assert counter.calls == 0  # copied from the map, no probe, no pread


def test_missing_record_on_the_cold_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "gap.lmdb"
    with lmdb.open(str(path), map_size=1 << 24) as env, env.begin(write=True) as txn:
        txn.put(lmdb_mod.META_KEY, b'{"format_version": 1, "count": 3, "classes": null}')
        txn.put(lmdb_mod.record_key(0), b"x" * 50_000)
        txn.put(lmdb_mod.record_key(2), b"y" * 50_000)
    monkeypatch.setattr(lmdb_io, "_mincore", _nothing_resident)
    with LMDBSource(path) as src:
        assert src.read_many([2, 0])[0].data == b"y" * 50_000
        with pytest.raises(RecordReadError, match=r"key 0000000001 is missing"):
            src.read_many([0, 1, 2])


def _batched_db(path: Path, payloads: list[bytes]) -> None:
    # One transaction per 64 records, as pack writes: freed pages get reused.
    with lmdb.open(str(path), map_size=1 << 28, lock=False) as env:
        for s in range(0, len(payloads), 64):
            with env.begin(write=True) as txn:
                for i in range(s, min(len(payloads), s + 64)):
                    txn.put(lmdb_mod.record_key(i), payloads[i])
        meta = b'{"format_version": 1, "count": %d, "classes": null}' % len(payloads)
        with env.begin(write=True) as txn:
            txn.put(lmdb_mod.META_KEY, meta)


def test_ensure_key_order_compacts_an_out_of_order_file(tmp_path: Path) -> None:
    payloads = _payloads(4000, 2_500, 5_000)
    path = tmp_path / "db"
    _batched_db(path, payloads)
    assert not lmdb_mod.values_in_key_order(path)
    assert lmdb_mod.ensure_key_order(path) is True
    assert lmdb_mod.values_in_key_order(path)
    assert lmdb_mod.ensure_key_order(path) is False
    assert sorted(os.listdir(path)) == ["data.mdb"]
    with lmdb.open(str(path), readonly=True, lock=False) as env, env.begin() as txn:
        assert all(txn.get(lmdb_mod.record_key(i)) == p for i, p in enumerate(payloads))


def test_pack_writes_values_in_key_order(tmp_path: Path) -> None:
    payloads = _payloads(4000, 2_500, 5_000)
    pack(ListSource(payloads), tmp_path / "db", progress=False)
    assert lmdb_mod.values_in_key_order(tmp_path / "db")
    with LMDBSource(tmp_path / "db") as src:
        assert src.read_many([0, 3999])[1].data == payloads[3999]


def test_memory_cache_over_a_cold_lmdb_with_run_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payloads = _payloads(600, 2_500, 3_500)
    pack(ListSource(payloads), tmp_path / "db", progress=False)
    monkeypatch.setattr(lmdb_io, "_mincore", _nothing_resident)
    inner = LMDBSource(tmp_path / "db", run_bytes=128 * 1024, read_runs=True)
    cache = MemoryCache(inner, capacity=sum(map(len, payloads)) // 2)
    with cache:
        for _ in range(2):
            for k in range(0, 600, 64):
                batch = list(range(k, min(600, k + 64)))[::-1]
                assert [r.data for r in cache.read_many(batch)] == [payloads[i] for i in batch]
        stats = cache.cache_stats()
        assert stats["hits"] > 0 and stats["entries"] > 0
        assert inner.run_reads > 0


def test_release_mapped_pages_keeps_reads_working(tmp_path: Path) -> None:
    payloads = _payloads(30, 20_000, 30_000)
    pack(ListSource(payloads), tmp_path / "db", progress=False)
    src = LMDBSource(tmp_path / "db")
    try:
        src.read_many(list(range(30)))
        assert src.release_mapped_pages() is True
        assert [r.data for r in src.read_many(list(range(30)))] == payloads
    finally:
        src.close()
    assert src.release_mapped_pages() is False  # closed: nothing mapped
