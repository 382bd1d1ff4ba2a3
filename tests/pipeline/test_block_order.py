"""Block order (``shuffle="block"``): runs, windows, ranks, resume, sources."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fastfeed.errors import ConfigError
from fastfeed.loader import Loader
from fastfeed.packing import pack
from fastfeed.pipeline.sampling import (
    EpochSampler,
    block_records_for,
    default_window_blocks,
    prepare_block_order,
)
from fastfeed.sources import LMDBSource, MemoryCache
from fastfeed.testing import ListSource, ledger_source


def _block(n: int, **kw: object) -> EpochSampler:
    kw.setdefault("batch_size", 16)
    kw.setdefault("block_records", 10)
    kw.setdefault("window_blocks", 3)
    return EpochSampler(n, shuffle="block", **kw)  # type: ignore[arg-type]


def test_block_order_is_a_permutation_of_windows_of_whole_runs() -> None:
    s = _block(1003, seed=5)
    order = s.global_order(0)
    assert sorted(order.tolist()) == list(range(1003))
    runs = order // 10
    size = [min(10, 1003 - 10 * r) for r in range(101)]
    windows: list[set[int]] = []
    current: set[int] = set()
    count = 0
    for r in runs.tolist():  # cut the order where a window's runs are complete
        current.add(r)
        count += 1
        assert len(current) <= 3  # a window draws from 3 runs
        if len(current) == 3 and count == sum(size[x] for x in current):
            windows.append(current)
            current, count = set(), 0
    assert count == sum(size[x] for x in current)  # the last window, whole runs too
    assert len(windows) == 101 // 3
    # Shuffled within windows: not in index order, and the runs are permuted.
    assert order[:30].tolist() != sorted(order[:30].tolist())
    assert runs[::30].tolist() != sorted(runs[::30].tolist())


def test_block_order_is_seeded_by_seed_and_epoch() -> None:
    a = _block(500, seed=1)
    assert np.array_equal(a.global_order(3), _block(500, seed=1).global_order(3))
    assert not np.array_equal(a.global_order(3), a.global_order(4))
    assert not np.array_equal(a.global_order(3), _block(500, seed=2).global_order(3))


@pytest.mark.parametrize("even", ["pad", "drop"])
def test_block_order_shards_ranks_by_contiguous_runs(even: str) -> None:
    n, world = 1001, 3
    shares = [
        _block(n, seed=9, rank=r, world_size=world, even_batches=even).rank_order(0)
        for r in range(world)
    ]
    assert len({len(x) for x in shares}) == 1
    flat = np.concatenate(shares).tolist()
    if even == "drop":
        assert len(flat) == n // world * world and len(set(flat)) == len(flat)
    else:
        assert set(flat) == set(range(n)) and len(flat) == -(-n // world) * world
    for share in shares:  # a rank reads whole runs, except one split at each end at most
        counts = np.bincount(share // 10, minlength=101)
        partial = [c for c in counts if 0 < c < 10]
        assert len(partial) <= 3  # the two ends and the dataset's short last run


def test_block_config_is_validated_and_part_of_the_state() -> None:
    with pytest.raises(ConfigError, match="shuffle must be True, False or 'block'"):
        EpochSampler(10, batch_size=2, shuffle="blocks")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="block_records must be an int >= 1"):
        EpochSampler(10, batch_size=2, shuffle="block", block_records=0)
    with pytest.raises(ConfigError, match="shuffle must be True, False or 'block', got 'blocks'"):
        Loader(ledger_source(10), batch_size=2, shuffle="blocks")  # type: ignore[arg-type]
    desc = _block(100).describe()
    assert desc["shuffle"] == "block"
    assert desc["block_records"] == 10 and desc["window_blocks"] == 3
    assert "block_records" not in EpochSampler(10, batch_size=2, shuffle=True).describe()
    assert default_window_blocks(64) == 8 and default_window_blocks(4) == 1
    assert default_window_blocks(1024) == 16


def test_loader_block_order_resumes_exactly() -> None:
    src = ledger_source(300)

    def loader() -> Loader:
        return Loader(src, batch_size=8, shuffle="block", seed=4, num_threads=2)

    full = [list(np.frombuffer(b"".join(b[0]), "<i8")) for b in loader()]
    assert sorted(i for b in full for i in b) == list(range(300))
    first = loader()
    it = iter(first)
    head = [list(np.frombuffer(b"".join(next(it)[0]), "<i8")) for _ in range(11)]
    state = first.state_dict()
    first.close()
    assert state["shuffle"] == "block" and state["block_records"] == 64
    again = loader()
    again.load_state_dict(state)
    tail = [list(np.frombuffer(b"".join(b[0]), "<i8")) for b in again]
    assert head + tail == full
    other = Loader(src, batch_size=8, shuffle=True, seed=4, num_threads=0)
    with pytest.raises(ConfigError, match="shuffle: saved 'block', now True"):
        other.load_state_dict(state)


def test_loader_block_order_over_a_packed_lmdb_switches_on_run_reads(tmp_path: Path) -> None:
    payloads = [bytes([i % 256]) * (3000 + i) for i in range(700)]
    pack(ListSource(payloads, [i % 4 for i in range(700)]), tmp_path / "db", progress=False)
    src = LMDBSource(tmp_path / "db", run_bytes=256 * 1024)
    cache = MemoryCache(src, capacity=1 << 20)
    assert not src.read_runs
    assert prepare_block_order(cache) == src.run_records == block_records_for(src)
    assert src.read_runs
    loader = Loader(cache, batch_size=32, shuffle="block", num_threads=2)
    assert loader.sampler.block_records == src.run_records
    got: list[bytes] = []
    for data, labels in loader:
        got.extend(data)
        assert labels.tolist() == [len(d) % 4 for d in data]  # (3000 + i) % 4 == i % 4
    assert sorted(got) == sorted(payloads)
    assert cache.cache_stats()["entries"] > 0
    src.close()


def test_block_records_for_sources_without_runs() -> None:
    assert block_records_for(ledger_source(10)) == 64
    assert block_records_for(MemoryCache(ledger_source(10), capacity=100)) == 64
