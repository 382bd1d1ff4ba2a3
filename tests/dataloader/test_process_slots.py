"""worker_type="process": batches come back through reused shared-memory slots.

Every test compares with torch's DataLoader over the same dataset in the same test. A
batch that came through a slot has storage that is not torch's shared memory
(``is_shared()`` is False); one that went torch's way has ``is_shared()`` True: that is how
these tests tell the two paths apart.
"""

from __future__ import annotations

import collections
import time
from typing import Any

import pytest
import torch
import torch.utils.data as tud

from fastfeed import DataLoader

Pair = collections.namedtuple("Pair", ["left", "right"])


class Marked(torch.Tensor):
    """A tensor subclass (as torchvision's tv_tensors are): travels torch's way."""


class Bad(ValueError):
    """A user's exception with an attribute handlers read."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class Records(tud.Dataset[Any]):
    """Sample i: a (rows, 8) float tensor of value i, and label i."""

    def __init__(self, n: int = 48, rows: int = 4) -> None:
        self.n, self.rows = n, rows

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((self.rows, 8), float(i)), i


def _loaders(ds: Any, **kw: Any) -> tuple[DataLoader, tud.DataLoader[Any]]:
    kw.setdefault("batch_size", 4)
    kw.setdefault("num_workers", 2)
    ours = DataLoader(ds, worker_type="process", multiprocessing_context="fork", **kw)
    theirs = tud.DataLoader(ds, multiprocessing_context="fork", **kw)
    return ours, theirs


def _plain(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return (
            type(batch).__name__,
            batch.dtype,
            tuple(batch.shape),
            batch.stride(),
            batch.tolist(),
        )
    if isinstance(batch, dict):
        return (type(batch).__name__, {k: _plain(v) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return (type(batch).__name__, [_plain(x) for x in batch])
    return batch


def test_default_collate_batches_come_through_slots_and_equal_torchs() -> None:
    ours, theirs = _loaders(Records())
    for _ in range(2):
        got, shared = [], []
        for b in ours:  # each batch dropped before the next: its slot comes back
            got.append(_plain(b))
            shared.append(b[0].is_shared() or b[1].is_shared())
        want = list(theirs)
        assert got == [_plain(b) for b in want]
        assert shared == [False] * 12  # every batch came through a slot
        assert all(b[0].is_shared() for b in want)


def test_batches_the_loop_keeps_stay_intact() -> None:
    """A slot is reused only when nothing refers to it: kept batches never change."""
    ours, theirs = _loaders(Records(n=96), prefetch_factor=2)
    kept = list(ours)  # 24 batches alive at once: more than the 8 slots
    assert [_plain(b) for b in kept] == [_plain(b) for b in theirs]
    via_slot = [not b[0].is_shared() for b in kept]
    assert 0 < sum(via_slot) <= 8  # the rest went torch's way, none waited
    views = [b[0][1:] for b in ours]  # only views kept, their batches dropped
    assert [v[0, 0, 0].item() for v in views] == [4.0 * k + 1 for k in range(24)]


def test_custom_collate_structures_keep_types_strides_and_values() -> None:
    def collate(samples: list[Any]) -> dict[str, Any]:
        x = torch.stack([s[0] for s in samples])
        return {
            "x": x,
            "xt": x.transpose(1, 2),  # not contiguous: torch's way, strides kept
            "pair": Pair(x.sum(dim=(1, 2)), torch.tensor([s[1] for s in samples])),
            "size": x.shape,
            "names": [f"s{s[1]}" for s in samples],
            "marked": torch.zeros(2).as_subclass(Marked),
            "again": x,  # the same tensor twice
        }

    ours, theirs = _loaders(Records(), collate_fn=collate)
    got, want = list(ours), list(theirs)
    assert [_plain(b) for b in got] == [_plain(b) for b in want]
    first = got[0]
    assert type(first["pair"]) is Pair and type(first["size"]) is torch.Size
    assert type(first["marked"]) is Marked and first["marked"].is_shared()
    assert not first["x"].is_shared() and first["xt"].is_shared()
    assert first["again"].data_ptr() == first["x"].data_ptr()  # one memory, as torch's


def test_batches_larger_than_a_slot_grow_it() -> None:
    """Batches of 64 KB, then of 2 MiB (past the 1 MiB first size) in the same slots."""

    class Growing(tud.Dataset[Any]):
        def __len__(self) -> int:
            return 32

        def __getitem__(self, i: int) -> torch.Tensor:
            rows = 64 if i < 16 else 2048
            return torch.full((rows, 64), float(i))

    ours, theirs = _loaders(Growing())
    for _ in range(2):
        got = list(ours)
        assert [b[:, 0, 0].tolist() for b in got] == [b[:, 0, 0].tolist() for b in theirs]
        assert [tuple(b.shape) for b in got] == [(4, 64, 64)] * 4 + [(4, 2048, 64)] * 4
        assert not any(b.is_shared() for b in got)
        assert all(bool((b == b[:, :1, :1]).all()) for b in got)


def test_empty_tensors_keep_their_shapes() -> None:
    class Empty(tud.Dataset[Any]):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"none": torch.empty(0), "rows": torch.zeros(0, 3, dtype=torch.int16)}

    ours, theirs = _loaders(Empty())
    got = list(ours)
    assert [_plain(b) for b in got] == [_plain(b) for b in theirs]
    assert [tuple(b["rows"].shape) for b in got] == [(4, 0, 3), (4, 0, 3)]


def test_abandoned_epochs_give_their_slots_back_to_persistent_workers() -> None:
    ours, theirs = _loaders(Records(n=96), persistent_workers=True)
    want = [_plain(b) for b in theirs]
    for _ in range(6):  # each epoch leaves batches in flight behind
        it = iter(ours)
        next(it)
        next(it)
        del it
    got, shared = [], []
    for b in ours:
        got.append(_plain(b))
        shared.append(b[0].is_shared())
    assert got == want
    assert shared == [False] * 24  # the abandoned batches' slots were all free again
    ours.close()


def test_two_live_iterators_each_get_every_batch() -> None:
    ours, theirs = _loaders(Records())
    pairs = list(zip(ours, ours, strict=True))
    want = [_plain(b) for b in theirs]
    assert [_plain(a) for a, _ in pairs] == want
    assert [_plain(b) for _, b in pairs] == want


def test_collate_error_reaches_the_loop_and_frees_the_slot() -> None:
    def collate(samples: list[Any]) -> torch.Tensor:
        if samples[0][1] == 8:
            raise Bad(8)
        return torch.stack([s[0] for s in samples])

    ours, _ = _loaders(Records(), collate_fn=collate, persistent_workers=True)
    with pytest.raises(Bad) as info:
        list(ours)
    assert info.value.code == 8 and info.value.args == (8,)
    it = iter(ours)
    assert [next(it)[0, 0, 0].item() for _ in range(2)] == [0.0, 4.0]
    del it
    ours.close()


class Sleepy(tud.Dataset[Any]):
    """2 ms of waiting per sample: the worker's read time is known from below."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(0.002)
        return torch.full((3,), float(i))


def test_worker_stage_times_reach_the_loaders_stats() -> None:
    ours = DataLoader(
        Sleepy(),
        batch_size=4,
        num_workers=2,
        persistent_workers=True,
        multiprocessing_context="fork",
    )
    assert ours.worker_type == "process"
    for _ in range(2):
        assert [b[:, 0].tolist() for b in ours] == [
            [4.0 * k + j for j in range(4)] for k in range(4)
        ]
    stats = ours.stats()
    read, collate = stats.stages["read"], stats.stages["collate"]
    assert (read.count, read.items, collate.count, collate.items) == (8, 32, 8, 32)
    assert read.busy_s >= 8 * 4 * 0.002  # each batch slept 8 ms in its worker
    assert collate.busy_s < read.busy_s
    assert read.cpu_s is not None and read.cpu_s < 0.5 * read.busy_s  # sleeping, not CPU
    assert "worker time" in stats.summary() and "on 2 processes" in stats.summary()
    ours.close()
    quiet = DataLoader(Sleepy(), batch_size=4, num_workers=2, worker_type="process", profile=False)
    assert len(list(quiet)) == 4
    assert "read" not in quiet.stats().stages


def test_slots_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTFEED_PROCESS_SLOTS", "0")
    ours, theirs = _loaders(Records())
    got = list(ours)
    assert [_plain(b) for b in got] == [_plain(b) for b in theirs]
    assert all(b[0].is_shared() for b in got)


def test_spawned_workers_use_slots_too() -> None:
    ours = DataLoader(
        Records(n=16),
        batch_size=4,
        num_workers=2,
        worker_type="process",
        multiprocessing_context="spawn",
    )
    got = list(ours)
    assert [b[1].tolist() for b in got] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9, 10, 11],
        [12, 13, 14, 15],
    ]
    assert not any(b[0].is_shared() for b in got)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pinned_batches_are_copied_out_of_their_slots() -> None:
    ours, theirs = _loaders(Records(), pin_memory=True)
    got = []
    for b in ours:
        assert b[0].is_pinned() and b[1].is_pinned()
        got.append(_plain(b))
    assert got == [_plain(b) for b in theirs]
