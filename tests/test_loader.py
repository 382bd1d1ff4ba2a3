"""fastfeed.Loader: exactly-once delivery, determinism, resume, errors, lifecycle."""

from __future__ import annotations

import gc
import json
import random
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from fastfeed.errors import (
    ConfigError,
    DecodeError,
    FastFeedError,
    LoaderTimeoutError,
    SampleError,
    TooManyFailuresError,
)
from fastfeed.loader import Batch, Loader, SkippedSample
from fastfeed.rng import sample_rng
from fastfeed.testing import BlockingSource, ListSource, ledger_source

REPO = Path(__file__).resolve().parents[1]


def decode(data: bytes) -> int:
    """The ledger record's index."""
    return int.from_bytes(data, "little")


class IndexTensor:
    """Fixed-shape transform: the record's index and a per-sample random draw."""

    def sample_spec(self) -> tuple[tuple[int, ...], torch.dtype]:
        return (2,), torch.int64

    def __call__(self, data: bytes, out: torch.Tensor | None = None) -> torch.Tensor:
        value = torch.tensor([decode(data), int(sample_rng().integers(0, 1 << 40))])
        if out is None:
            return value
        out.copy_(value)
        return out


def jittery(max_delay_s: float, seed: int = 0):
    """A generic transform that sleeps a random (per index, fixed) time."""
    delays = {}
    lock = threading.Lock()

    def tf(data: bytes) -> int:
        i = decode(data)
        with lock:
            if i not in delays:
                delays[i] = random.Random(seed * 1_000_003 + i).uniform(0, max_delay_s)
        time.sleep(delays[i])
        return i

    return tf


def _fastfeed_threads() -> set[threading.Thread]:
    # The process-wide GIL probe is not the loader's: it exits 0.5 s after recording stops.
    return {
        t
        for t in threading.enumerate()
        if t.name.startswith("fastfeed-") and t.name != "fastfeed-gilprobe-0"
    }


def _wait_no_new_threads(before: set[threading.Thread], timeout_s: float = 2.0) -> set[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        extra = _fastfeed_threads() - before
        if not extra:
            return set()
        time.sleep(0.01)
    return {t.name for t in _fastfeed_threads() - before}


# -- exactly once -------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 1000, 10007])
@pytest.mark.parametrize("in_order", [True, False])
@pytest.mark.parametrize("drop_last", [False, True])
def test_exactly_once_ledger(n: int, in_order: bool, drop_last: bool) -> None:
    bs = 64 if n > 1000 else 8
    src = ledger_source(n)
    # Random per-sample delays only on the smaller sets, to keep the test fast.
    tf = jittery(0.0005 if n <= 1000 else 0.00005, seed=n)
    loader = Loader(
        src,
        tf,
        batch_size=bs,
        shuffle=True,
        seed=11,
        num_threads=8,
        in_order=in_order,
        drop_last=drop_last,
        collate_fn=list,
    )
    order = loader.sampler.global_order(0).tolist()
    delivered: list[int] = []
    sizes = []
    for data, labels in loader:
        assert labels.tolist() == [i % 10 for i in data]
        delivered.extend(data)
        sizes.append(len(data))
    expected = order[: (n // bs) * bs] if drop_last else order
    assert len(delivered) == len(expected)
    assert Counter(delivered) == Counter(expected)
    assert len(set(delivered)) == len(delivered)
    if in_order:
        assert delivered == expected
    assert len(sizes) == len(loader)
    # Every batch is full except the epoch's tail (anywhere in completion order).
    assert sorted(sizes, reverse=True)[:-1] == [bs] * (len(sizes) - 1)


def test_batch_object_and_labels() -> None:
    loader = Loader(ledger_source(10), batch_size=4, num_threads=2)
    batches = list(loader)
    b = batches[1]
    assert isinstance(b, Batch) and isinstance(b, tuple) and len(b) == 2
    data, labels = b
    # No transform: data is the list of raw record bytes.
    assert data == [i.to_bytes(8, "little") for i in (4, 5, 6, 7)]
    assert labels.dtype == torch.int64 and labels.tolist() == [4, 5, 6, 7]
    assert b.indices == [4, 5, 6, 7] and b.data is data and b.labels is labels
    assert len(loader) == 3 and [len(x.indices) for x in batches] == [4, 4, 2]


def test_no_labels_gives_none() -> None:
    src = ListSource([b"a", b"b", b"c"])
    (data, labels), (data2, labels2) = list(Loader(src, batch_size=2, num_threads=1))
    assert data == [b"a", b"b"] and labels is None and data2 == [b"c"] and labels2 is None


def test_fixed_shape_transform_writes_rows() -> None:
    loader = Loader(ledger_source(10), IndexTensor(), batch_size=4, num_threads=2, seed=3)
    out = list(loader)
    assert [tuple(x.shape) for x, _ in out] == [(4, 2), (4, 2), (2, 2)]
    assert torch.cat([x[:, 0] for x, _ in out]).tolist() == list(range(10))
    assert out[0][0].dtype == torch.int64


def test_batch_transform_vectorised() -> None:
    def frombuffer(records: list[bytes]) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(b"".join(records), dtype="<i8").copy())

    loader = Loader(ledger_source(1000), batch_size=256, num_threads=2, batch_transform=frombuffer)
    got = torch.cat([x for x, _ in loader]).tolist()
    assert got == list(range(1000))
    snap = loader.recorder.snapshot()
    assert snap["stages"]["read"]["items"] == 1000
    assert snap["stages"]["read"]["bytes"] == 8000
    assert snap["stages"]["transform"]["count"] == 4
    assert snap["stages"]["collate"]["count"] == 4


def test_profile_false_records_nothing() -> None:
    loader = Loader(ledger_source(20), batch_size=4, num_threads=2, profile=False)
    assert len(list(loader)) == 5
    assert loader.recorder.snapshot()["stages"] == {}


def test_read_ahead_hints_cover_every_batch() -> None:
    class HintSource(ListSource):
        def __init__(self, n: int) -> None:
            super().__init__([i.to_bytes(8, "little") for i in range(n)])
            self.hinted: list[int] = []
            self.lock = threading.Lock()

        def hint(self, indices) -> None:
            with self.lock:
                self.hinted.extend(indices)

    src = HintSource(100)
    loader = Loader(src, batch_size=10, num_threads=2, prefetch=3, shuffle=True)
    first = [b.indices for b in loader]
    # Every batch but the first is hinted before it is read, exactly once.
    assert sorted(src.hinted) == sorted(i for b in first[1:] for i in b)
    src.hinted.clear()
    assert len(list(Loader(src, batch_size=10, num_threads=2, read_ahead=False))) == 10
    assert src.hinted == []


def test_a_task_hints_after_its_own_reads() -> None:
    # On a disk that counts operations, hinted reads queued before a batch's own reads
    # delay that batch: the first batch must be read before anything is hinted.
    class Calls(ListSource):
        def __init__(self, n: int) -> None:
            super().__init__([i.to_bytes(8, "little") for i in range(n)])
            self.calls: list[tuple[str, list[int]]] = []

        def read_many(self, indices):
            self.calls.append(("read", list(indices)))
            return super().read_many(indices)

        def hint(self, indices) -> None:
            self.calls.append(("hint", list(indices)))

    src = Calls(40)
    batches = [b.indices for b in Loader(src, batch_size=10, num_threads=0, prefetch=2)]
    assert [k for k, _ in src.calls] == ["read", "hint", "read", "hint", "read", "read"]
    assert src.calls[0] == ("read", batches[0])
    assert src.calls[1] == ("hint", batches[1] + batches[2])
    assert src.calls[3] == ("hint", batches[3])


# -- determinism --------------------------------------------------------------------------


@pytest.mark.parametrize("in_order", [True, False])
def test_same_output_for_any_thread_count(in_order: bool) -> None:
    def run(threads: int) -> dict[int, int]:
        loader = Loader(
            ledger_source(300),
            IndexTensor(),
            batch_size=16,
            shuffle=True,
            seed=5,
            num_threads=threads,
            in_order=in_order,
        )
        loader.set_epoch(2)
        rows = {}
        order = []
        for x, _ in loader:
            for i, r in x.tolist():
                rows[i] = r
                order.append(i)
        if in_order:
            assert order == loader.sampler.global_order(2).tolist()
        return rows

    ref = run(0)
    assert len(ref) == 300 and len(set(ref.values())) == 300
    assert run(1) == ref
    assert run(4) == ref


def test_epochs_reshuffle_and_set_epoch_pins() -> None:
    loader = Loader(ledger_source(50), batch_size=50, shuffle=True, num_threads=2, seed=1)
    e0 = next(iter(loader)).indices
    e1 = next(iter(loader)).indices  # a new iteration moves to the next epoch
    assert loader.epoch == 1
    assert e0 == loader.sampler.global_order(0).tolist()
    assert e1 == loader.sampler.global_order(1).tolist() and e1 != e0
    loader.set_epoch(0)
    assert next(iter(loader)).indices == e0
    loader.set_epoch(0)
    assert next(iter(loader)).indices == e0


def test_starting_a_new_iteration_stops_the_previous_one() -> None:
    before = _fastfeed_threads()
    loader = Loader(ledger_source(100), batch_size=2, num_threads=3)
    it1 = iter(loader)
    next(it1)
    it2 = iter(loader)
    second = [b.indices for b in it2]
    assert second[0] == [0, 1] and len(second) == 50  # the new epoch runs in full
    with pytest.raises(FastFeedError, match=r"stopped because iter\(loader\) started a new"):
        next(it1)  # the first iteration was stopped, and says so instead of ending early
    del it1, it2
    assert _wait_no_new_threads(before) == set()


def test_torch_threads_per_worker_and_global_restored() -> None:
    main_threads = torch.get_num_threads()
    seen: list[int] = []
    lock = threading.Lock()

    def tf(data: bytes) -> int:
        with lock:
            seen.append(torch.get_num_threads())
        return decode(data)

    list(Loader(ledger_source(40), tf, batch_size=4, num_threads=3, collate_fn=list))
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == main_threads
    fresh: list[int] = []
    t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    t.start()
    t.join()
    # A thread started afterwards still gets the process-wide default, not 1.
    assert fresh == [main_threads]
    if main_threads > 1:
        seen.clear()
        list(
            Loader(
                ledger_source(8),
                tf,
                batch_size=4,
                num_threads=2,
                collate_fn=list,
                torch_threads=None,
            )
        )
        assert set(seen) == {main_threads}


# -- resume -------------------------------------------------------------------------------


def _slow_every_third(data: bytes) -> int:
    i = decode(data)
    # Batches finish out of order: some samples are much slower than others.
    if (i // 4) % 3 == 0:
        time.sleep(0.004)
    return i


def _make(threads: int, in_order: bool, **kw) -> Loader:
    return Loader(
        ledger_source(50),
        _slow_every_third,
        batch_size=4,
        shuffle=True,
        seed=9,
        num_threads=threads,
        in_order=in_order,
        collate_fn=list,
        **kw,
    )


@pytest.mark.parametrize("threads", [0, 4])
@pytest.mark.parametrize("in_order", [True, False])
@pytest.mark.parametrize("stop_after", [0, 1, 5, 12, 13])
def test_resume_yields_exactly_the_rest(threads: int, in_order: bool, stop_after: int) -> None:
    ref_loader = _make(threads, True)
    ref_loader.set_epoch(3)
    reference = [tuple(d) for d, _ in ref_loader]
    assert len(reference) == 13  # 50 samples / 4: the last batch holds 2 ("inside" it: 12)

    loader = _make(threads, in_order)
    loader.set_epoch(3)
    it = iter(loader)
    consumed = [tuple(next(it)[0]) for _ in range(stop_after)]
    state = json.loads(json.dumps(loader.state_dict()))
    del it  # the process "dies" here

    resumed = _make(threads, in_order)
    resumed.load_state_dict(state)
    rest = [tuple(d) for d, _ in resumed]
    if stop_after == 13:
        # After the end: the resumed loader goes on with the next epoch, as the
        # uninterrupted one would.
        assert state["position"] == 13
        nxt = _make(threads, True)
        nxt.set_epoch(4)
        assert Counter(rest) == Counter(tuple(d) for d, _ in nxt)
        return
    if in_order:
        assert consumed == reference[:stop_after]
        assert rest == reference[stop_after:]
    else:
        assert Counter(consumed + rest) == Counter(reference)
        assert len(consumed) + len(rest) == 13
    assert resumed.state_dict()["position"] == 13


def test_resume_out_of_order_records_batches_ahead() -> None:
    first = set(_make(4, False).sampler.batches(0)[0].tolist())
    release = threading.Event()

    def slow_first_batch(data: bytes) -> int:
        i = decode(data)
        if i in first:  # batch 0 finishes only after 4 later batches were taken
            release.wait(30)
        return i

    loader = Loader(
        ledger_source(50),
        slow_first_batch,
        batch_size=4,
        shuffle=True,
        seed=9,
        num_threads=4,
        in_order=False,
        collate_fn=list,
    )
    it = iter(loader)
    got = [next(it)[0] for _ in range(4)]
    state = loader.state_dict()
    release.set()
    del it
    order = loader.sampler.batches(0)
    numbers = [next(k for k, b in enumerate(order) if b.tolist() == g) for g in got]
    assert 0 not in numbers
    # Batch 0 is still being built: the 4 delivered batches are all ahead of position 0.
    assert state["position"] == 0
    assert sorted(state["ahead"]) == sorted(numbers)
    assert sorted(list(range(state["position"])) + state["ahead"]) == sorted(numbers)
    resumed = _make(4, False)
    resumed.load_state_dict(state)
    rest = [d for d, _ in resumed]
    assert sorted(i for b in got + rest for i in b) == list(range(50))


def test_set_epoch_after_load_keeps_the_resume_point() -> None:
    loader = _make(2, True)
    loader.set_epoch(1)
    it = iter(loader)
    first = [next(it)[0] for _ in range(3)]
    state = loader.state_dict()
    del it
    resumed = _make(2, True)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # the usual training-loop call: must not restart the epoch
    rest = [d for d, _ in resumed]
    assert len(rest) == 10 and sorted(i for b in first + rest for i in b) == list(range(50))
    resumed.set_epoch(1)  # epoch 1 was finished: asking for it again restarts it
    assert len(list(resumed)) == 13


def test_state_counts_only_batches_handed_over() -> None:
    loader = _make(4, True)
    it = iter(loader)
    next(it)
    time.sleep(0.1)  # workers have prefetched several batches meanwhile
    assert loader.state_dict()["position"] == 1
    next(it)
    assert loader.state_dict()["position"] == 2
    del it


def test_load_state_rejects_other_configuration() -> None:
    state = _make(0, True).state_dict()
    other = Loader(ledger_source(50), batch_size=5, shuffle=True)
    with pytest.raises(ConfigError, match="batch_size: saved 4, now 5"):
        other.load_state_dict(state)


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [0, 3])
def test_transform_error_names_index_path_and_stage(threads: int) -> None:
    def tf(data: bytes) -> int:
        i = decode(data)
        if i == 37:
            raise ValueError("boom at 37")
        return i

    loader = Loader(ledger_source(100), tf, batch_size=8, num_threads=threads, collate_fn=list)
    seen = []
    with pytest.raises(SampleError) as info:
        for data, _ in loader:
            seen.extend(data)
    err = info.value
    assert (err.index, err.where, err.stage) == (37, "list[37]", "transform")
    assert isinstance(err.__cause__, ValueError) and "boom at 37" in str(err)
    assert "sample 37 (list[37])" in str(err) and "'transform'" in str(err)
    assert seen == list(range(32))  # batches before the failing one arrived, in order
    assert loader.state_dict()["position"] == 4


def test_read_error_is_located_by_per_index_retry() -> None:
    loader = Loader(ledger_source(100, fail_at=[37]), batch_size=8, num_threads=2)
    with pytest.raises(SampleError) as info:
        list(loader)
    assert (info.value.index, info.value.where, info.value.stage) == (37, "list[37]", "read")
    assert "injected failure reading list[37]" in str(info.value)


def test_decode_error_stage() -> None:
    def tf(data: bytes) -> int:
        if decode(data) == 3:
            raise DecodeError("not a JPEG")
        return decode(data)

    with pytest.raises(SampleError) as info:
        list(Loader(ledger_source(10), tf, batch_size=4, num_threads=1, collate_fn=list))
    assert info.value.stage == "decode" and info.value.index == 3


def test_fixed_shape_error_in_raise_mode() -> None:
    class Bad(IndexTensor):
        def __call__(self, data, out=None):
            if decode(data) == 6:
                raise ValueError("row 6")
            return super().__call__(data, out)

    with pytest.raises(SampleError) as info:
        list(Loader(ledger_source(10), Bad(), batch_size=4, num_threads=2))
    assert info.value.index == 6 and info.value.stage == "transform"


def test_collate_error_without_single_culprit() -> None:
    def ragged(data: bytes) -> torch.Tensor:
        return torch.zeros(decode(data) % 3 + 1)

    with pytest.raises(SampleError) as info:
        list(Loader(ledger_source(6), ragged, batch_size=3, num_threads=1))
    assert info.value.stage == "collate" and info.value.index is None
    assert "batch 0 (indices [0, 1, 2]" in str(info.value)


@pytest.mark.parametrize("threads", [0, 4])
def test_skip_mode_counts_exactly_and_never_substitutes(threads: int) -> None:
    bad_read = {3, 500}
    bad_tf = {37, 38, 999}

    def tf(data: bytes) -> torch.Tensor:
        i = decode(data)
        if i in bad_tf:
            raise DecodeError(f"corrupt {i}")
        return torch.tensor(i)

    loader = Loader(
        ledger_source(1000, fail_at=sorted(bad_read)),
        tf,
        batch_size=8,
        num_threads=threads,
        on_error="skip",
        max_failures=5,
    )
    batches = list(loader)
    got = [i for x, _ in batches for i in x.tolist()]
    assert got == [i for i in range(1000) if i not in bad_read | bad_tf]
    assert all(b.indices == b[0].tolist() for b in batches)
    assert all(b[1].tolist() == [i % 10 for i in b.indices] for b in batches)
    # Batches shrink by exactly their skipped samples.
    assert [len(b.indices) for b in batches][:5] == [7, 8, 8, 8, 6]
    assert sorted(s.index for s in loader.skipped) == sorted(bad_read | bad_tf)
    by_index = {s.index: s for s in loader.skipped}
    assert by_index[3] == SkippedSample(
        3, "list[3]", "read", "RecordReadError: injected failure reading list[3]"
    )
    assert by_index[37].stage == "decode" and by_index[37].where == "list[37]"
    assert loader.state_dict()["failures"] == 5


def test_skip_mode_fixed_shape_rows_and_all_failed_batch() -> None:
    class Bad(IndexTensor):
        def __call__(self, data, out=None):
            if decode(data) in (1, 4, 5, 6, 7):
                raise ValueError("bad")
            return super().__call__(data, out)

    loader = Loader(ledger_source(12), Bad(), batch_size=4, num_threads=2, on_error="skip")
    out = list(loader)
    # Batch 1 (indices 4..7) failed entirely: it is not yielded, no empty batch appears.
    assert [b.indices for b in out] == [[0, 2, 3], [8, 9, 10, 11]]
    assert [x[:, 0].tolist() for x, _ in out] == [[0, 2, 3], [8, 9, 10, 11]]
    assert loader.state_dict()["position"] == 3 and loader.state_dict()["failures"] == 5


def test_skip_mode_batch_transform_finds_culprit() -> None:
    def frombuffer(records: list[bytes]) -> torch.Tensor:
        if any(decode(r) == 13 for r in records):
            raise DecodeError("bad 13")
        return torch.from_numpy(np.frombuffer(b"".join(records), dtype="<i8").copy())

    loader = Loader(
        ledger_source(20), batch_size=8, num_threads=2, batch_transform=frombuffer, on_error="skip"
    )
    got = [i for x, _ in loader for i in x.tolist()]
    assert got == [i for i in range(20) if i != 13]
    assert [(s.index, s.stage) for s in loader.skipped] == [(13, "decode")]


@pytest.mark.parametrize("limit", [2, 0.002])
def test_too_many_failures(limit: int | float) -> None:
    loader = Loader(
        ledger_source(1000, fail_at=[10, 20, 30]),
        batch_size=8,
        num_threads=2,
        on_error="skip",
        max_failures=limit,
    )
    with pytest.raises(TooManyFailuresError) as info:
        list(loader)
    msg = str(info.value)
    assert "3 samples failed in epoch 0" in msg and "(2)" in msg and "list[30]" in msg
    assert [s.index for s in loader.skipped] == [10, 20, 30]


def test_timeout_names_in_flight_indices() -> None:
    src = BlockingSource(40, block_at=[21], max_block_s=10)
    loader = Loader(src, batch_size=4, num_threads=2, timeout=0.4)
    try:
        it = iter(loader)
        got = [next(it).indices for _ in range(5)]
        assert got[-1] == [16, 17, 18, 19]
        t0 = time.monotonic()
        with pytest.raises(LoaderTimeoutError) as info:
            next(it)
        assert time.monotonic() - t0 < 2.0
        assert 21 in info.value.in_flight
        assert "batch 5 indices [20, 21, 22, 23]" in str(info.value)
    finally:
        src.release()
        loader.close()


# -- lifecycle ----------------------------------------------------------------------------


def test_create_break_cycles_leave_no_threads() -> None:
    before = _fastfeed_threads()
    src = ledger_source(1000)
    for k in range(200):
        loader = Loader(src, batch_size=4, num_threads=2, shuffle=True)
        for _ in loader:
            break
        if k % 50 == 0:
            assert len(_fastfeed_threads() - before) <= 2
    assert _wait_no_new_threads(before) == set()


def test_deleting_the_iterator_and_training_loop_errors_stop_threads() -> None:
    before = _fastfeed_threads()
    loader = Loader(ledger_source(1000), batch_size=4, num_threads=3)
    it = iter(loader)
    next(it)
    assert len(_fastfeed_threads() - before) == 3
    del it
    assert _wait_no_new_threads(before) == set()

    def train() -> None:
        for _ in loader:
            raise RuntimeError("loss is NaN")

    with pytest.raises(RuntimeError, match="NaN"):
        train()
    assert _wait_no_new_threads(before) == set()


def test_close_while_a_read_blocks_returns_quickly() -> None:
    src = BlockingSource(100, block_at=[9], max_block_s=20)
    loader = Loader(src, batch_size=4, num_threads=2)
    it = iter(loader)
    assert next(it).indices == [0, 1, 2, 3]
    time.sleep(0.1)  # a worker is now stuck inside the read of index 9
    t0 = time.monotonic()
    loader.close()
    loader.close()  # idempotent
    assert time.monotonic() - t0 < 2.5
    src.release()  # lets the stuck daemon thread finish for the leak check
    with pytest.raises(FastFeedError, match=r"the Loader was closed \(Loader.close\(\)\)"):
        next(it)  # never a silent end of the epoch
    with pytest.raises(FastFeedError, match="closed"):
        iter(loader)


def test_context_manager_closes() -> None:
    before = _fastfeed_threads()
    with Loader(ledger_source(100), batch_size=4, num_threads=2) as loader:
        it = iter(loader)
        next(it)
    assert _wait_no_new_threads(before) == set()
    with pytest.raises(FastFeedError, match="the Loader was closed"):
        next(it)


_CHILD = textwrap.dedent(
    """
    import multiprocessing as mp
    from fastfeed.testing import ledger_source
    from fastfeed.loader import Loader

    def child():
        loader = Loader(ledger_source(10000), batch_size=8, num_threads=3, shuffle=True)
        it = iter(loader)
        next(it)
        return  # loader and iterator still alive mid-epoch

    if __name__ == "__main__":
        p = mp.get_context({method!r}).Process(target=child)
        p.start()
        p.join(20)
        print("exitcode", p.exitcode)
        # And this process itself exits holding a loader mid-epoch.
        keep = Loader(ledger_source(10000), batch_size=8, num_threads=3)
        it = iter(keep)
        next(it)
    """
)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_child_process_exits_cleanly_mid_epoch(method: str, tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(method=method))
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "exitcode 0" in out.stdout
    assert time.monotonic() - t0 < 30


# -- configuration ------------------------------------------------------------------------


def test_invalid_arguments() -> None:
    src = ledger_source(10)
    with pytest.raises(ConfigError, match="batch_size"):
        Loader(src, batch_size=0)
    with pytest.raises(ConfigError, match="on_error"):
        Loader(src, on_error="ignore")
    with pytest.raises(ConfigError, match="max_failures only applies"):
        Loader(src, max_failures=3)
    with pytest.raises(ConfigError, match="fraction"):
        Loader(src, on_error="skip", max_failures=1.5)
    with pytest.raises(ConfigError, match="invalid device"):
        Loader(src, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            Loader(src, device="cuda")
    with pytest.raises(ConfigError, match="Source"):
        Loader([b"x"])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="batch_transform cannot"):
        Loader(src, IndexTensor(), batch_transform=list)
    with pytest.raises(ConfigError, match="num_threads"):
        Loader(src, num_threads=-1)
    with pytest.raises(ConfigError, match="even_batches"):
        Loader(src, even_batches="none")
    assert Loader(src, device="cpu").device == torch.device("cpu")


def test_defaults() -> None:
    loader = Loader(ledger_source(10))
    assert loader.num_threads >= 1 and loader.prefetch == max(2, 2 * loader.num_threads)
    assert loader.source is not None and loader.skipped == [] and loader.recorder.enabled
    assert len(loader) == 10 and (loader.rank, loader.world_size) == (0, 1)
    gc.collect()


def test_stats_reports_stages_and_a_verdict() -> None:
    from fastfeed.stats import LoaderStats

    with Loader(
        ledger_source(640),
        batch_size=64,
        num_threads=2,
        batch_transform=lambda ds: np.frombuffer(b"".join(ds), dtype=np.int64),
    ) as loader:
        seen = []
        for data, _labels in loader:
            seen.extend(data.tolist())
            time.sleep(0.002)  # a "model step"
        stats = loader.stats()
    assert sorted(seen) == list(range(640))
    assert isinstance(stats, LoaderStats)
    d = json.loads(stats.to_json())
    assert d["stages"]["read"]["items"] == 640
    assert d["stages"]["transform"]["count"] == 10
    assert 0.0 <= stats.stall_fraction <= 1.0
    assert stats.verdict.sentence in stats.summary()


def test_device_cpu_runs_the_stager_and_finishes_batches() -> None:
    from fastfeed.image import Compose, RandomHorizontalFlip, Resize
    from fastfeed.testing import encode_jpeg, random_image

    rng = np.random.default_rng(0)
    payloads = [encode_jpeg(random_image(rng, 40, 30)) for _ in range(12)]
    src = ListSource(payloads, list(range(12)))
    transform = Compose([Resize((16, 16)), RandomHorizontalFlip()])
    mean, std = (120.0, 110.0, 100.0), (60.0, 50.0, 40.0)
    with Loader(src, transform=transform, batch_size=5, num_threads=2) as plain:
        host = [(b.data.clone(), b.labels.clone()) for b in plain]
    with Loader(
        src,
        transform=transform,
        batch_size=5,
        num_threads=2,
        device="cpu",
        mean=mean,
        std=std,
        channels_last=True,
    ) as staged:
        out = list(staged)
        stats = staged.stats()
    assert [len(b.indices) for b in out] == [5, 5, 2]
    for (x, y), b in zip(host, out, strict=True):
        ref = (
            x.double() - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
        ) / torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
        assert b.data.dtype == torch.float32
        assert b.data.is_contiguous(memory_format=torch.channels_last)
        assert np.allclose(b.data.double().numpy(), ref.numpy(), atol=1e-5)
        assert torch.equal(b.labels, y)
    # The stager, not the prefetcher, reports the training loop's waits: one per batch.
    assert stats.to_dict()["stages"]["copy"]["count"] == 3


def test_finishing_options_need_a_device() -> None:
    with pytest.raises(ConfigError, match="give device="):
        Loader(ledger_source(4), mean=(0.5,), std=(0.2,))


@pytest.mark.cuda
def test_cuda_loader_batches_equal_cpu_reference_while_the_gpu_is_busy() -> None:
    from fastfeed.image import Compose, RandomHorizontalFlip, RandomResizedCrop
    from fastfeed.testing import encode_jpeg, random_image

    rng = np.random.default_rng(1)
    payloads = [encode_jpeg(random_image(rng, 64, 48)) for _ in range(40)]
    src = ListSource(payloads, list(range(40)))
    transform = Compose([RandomResizedCrop(32), RandomHorizontalFlip()])
    kwargs = dict(transform=transform, batch_size=8, shuffle=True, num_threads=2)
    with Loader(src, **kwargs) as cpu_loader:
        ref = {}
        for epoch in range(3):
            cpu_loader.set_epoch(epoch)
            ref[epoch] = [(b.data.clone(), b.labels.clone()) for b in cpu_loader]
    held = []
    with Loader(src, device="cuda", **kwargs) as gpu_loader:
        assert gpu_loader.pin_memory
        for epoch in range(3):
            gpu_loader.set_epoch(epoch)
            for k, (x, y) in enumerate(gpu_loader):
                torch.cuda._sleep(2_000_000)  # a slow "model" on the compute stream
                assert x.is_cuda and y.is_cuda
                assert torch.equal(x.cpu(), ref[epoch][k][0])
                assert torch.equal(y.cpu(), ref[epoch][k][1])
                held.append((epoch, k, x))
    torch.cuda.synchronize()
    for epoch, k, x in held:  # kept references never change under later batches
        assert torch.equal(x.cpu(), ref[epoch][k][0])
