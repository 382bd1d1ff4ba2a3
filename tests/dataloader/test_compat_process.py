"""fastfeed.DataLoader(worker_type="process"): torch's worker processes, fastfeed's errors.

Datasets live at module level so spawn workers can import them. Spawn starts a fresh
interpreter per worker (seconds each), so it gets one persistent case.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.utils.data as tud

import fastfeed.dataloader as compat
from fastfeed.dataloader import DataLoader
from fastfeed.errors import ConfigError, LoaderTimeoutError

N = 30


class WhoLoaded(tud.Dataset):
    """Sample i is (i, worker id as fastfeed.dataloader.get_worker_info() reports it)."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        info = compat.get_worker_info()
        return torch.tensor([i, i * 2]), -1 if info is None else info.id


class FailsAt7(tud.Dataset):
    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> int:
        if i == 7:
            raise KeyError("missing-key")
        return i


class SlowFirst(tud.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        if i == 0:
            time.sleep(0.8)
        return i


class SelfSharding(tud.IterableDataset):
    def __iter__(self) -> Iterator[int]:
        info = tud.get_worker_info()
        start, step = (0, 1) if info is None else (info.id, info.num_workers)
        return iter(range(start, N, step))


def _indices(batches: list[Any]) -> list[list[int]]:
    return [b[0][:, 0].tolist() for b in batches]


def _shuffled(cls: type, **kw: Any) -> tuple[Any, list[list[Any]]]:
    loader = cls(
        WhoLoaded(), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(11), **kw
    )
    return loader, [list(loader) for _ in range(2)]


def test_fork_processes_give_the_same_batches_as_threads_and_torch() -> None:
    _, threads = _shuffled(DataLoader, num_workers=2)
    loader, procs = _shuffled(
        DataLoader, num_workers=2, worker_type="process", multiprocessing_context="fork"
    )
    _, torch_ref = _shuffled(tud.DataLoader)
    for epoch in range(2):
        assert _indices(procs[epoch]) == _indices(threads[epoch]) == _indices(torch_ref[epoch])
    # Worker ids come from torch's worker processes (round-robin over 2 workers).
    assert [b[1].tolist() for b in procs[0]][:2] == [[0] * 4, [1] * 4]
    assert {wid for b in threads[0] for wid in b[1].tolist()} <= {0, 1}
    assert {wid for b in torch_ref[0] for wid in b[1].tolist()} == {-1}
    assert loader.recorder.snapshot()["steps"] == 2 * (len(loader) - 1)


def test_process_workers_run_when_fastfeed_is_made_torchs_default_dataloader(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `torch.utils.data.DataLoader = fastfeed.DataLoader` (how a script, or PyTorch's own
    # test file, swaps it in everywhere) made starting torch's worker iterator call itself.
    monkeypatch.setattr(tud, "DataLoader", DataLoader)
    loader = DataLoader(
        WhoLoaded(),
        batch_size=8,
        num_workers=1,
        worker_type="process",
        multiprocessing_context="fork",
    )
    batches = list(loader)
    assert [b[0][:, 0].tolist() for b in batches] == [
        list(range(k, min(k + 8, N))) for k in range(0, N, 8)
    ]
    assert {wid for b in batches for wid in b[1].tolist()} == {0}  # a worker process's id


def test_spawn_persistent_processes_give_the_same_batches_as_threads() -> None:
    # Persistent on both sides: torch's persistent iterator draws the base seed only once,
    # so the second epoch's order differs from a non-persistent loader's.
    threads_loader, threads = _shuffled(DataLoader, num_workers=2, persistent_workers=True)
    threads_loader.close()
    loader, procs = _shuffled(
        DataLoader,
        num_workers=2,
        worker_type="process",
        multiprocessing_context="spawn",
        persistent_workers=True,
    )
    try:
        for epoch in range(2):
            assert _indices(procs[epoch]) == _indices(threads[epoch])
        assert {wid for b in procs[1] for wid in b[1].tolist()} == {0, 1}
    finally:
        loader.close()
    assert loader._iterator is None


def test_process_iterable_dataset_keeps_torch_semantics() -> None:
    """Each worker process runs its own replica, which shards itself: everything once."""
    ours = DataLoader(
        SelfSharding(),
        batch_size=4,
        num_workers=2,
        worker_type="process",
        multiprocessing_context="fork",
    )
    theirs = tud.DataLoader(
        SelfSharding(), batch_size=4, num_workers=2, multiprocessing_context="fork"
    )
    got = [b.tolist() for b in ours]
    assert got == [b.tolist() for b in theirs]
    assert sorted(i for b in got for i in b) == list(range(N))


def test_process_worker_error_is_the_original_exception_with_notes() -> None:
    loader = DataLoader(
        FailsAt7(),
        batch_size=3,
        num_workers=2,
        worker_type="process",
        multiprocessing_context="fork",
    )
    it = iter(loader)
    assert next(it).tolist() == [0, 1, 2]
    assert next(it).tolist() == [3, 4, 5]
    with pytest.raises(KeyError) as info:
        next(it)
    err = info.value
    assert type(err) is KeyError and err.args == ("missing-key",)  # not torch's re-made one
    notes = "\n".join(err.__notes__)
    assert "raised in DataLoader worker process" in notes
    assert 'raise KeyError("missing-key")' in notes  # the worker's traceback
    assert "batch #2 of the epoch" in notes
    # The worker names the sample (torch's read loop was at index 7) and its batch.
    worker_note = r"fastfeed: sample 7 failed in DataLoader worker process \d \(batch \[6, 7, 8\]\)"
    assert re.search(worker_note, notes)
    assert next(it).tolist() == [9, 10, 11]
    del info, err
    loader.close()


def test_process_timeout_is_a_loader_timeout_error() -> None:
    loader = DataLoader(
        SlowFirst(),
        batch_size=1,
        num_workers=1,
        timeout=0.2,
        worker_type="process",
        multiprocessing_context="fork",
    )
    it = iter(loader)
    with pytest.raises(LoaderTimeoutError) as info:
        next(it)
    assert isinstance(info.value, LoaderTimeoutError) and isinstance(info.value, RuntimeError)
    assert "timed out after 0.2 seconds" in str(info.value)
    del it, info
    loader.close()


def test_process_mode_validates_like_torch() -> None:
    with pytest.raises(ValueError, match="multiprocessing_context") as theirs:
        tud.DataLoader(WhoLoaded(), num_workers=2, multiprocessing_context="no-such-method")
    with pytest.raises(ValueError, match="multiprocessing_context") as ours:
        DataLoader(
            WhoLoaded(),
            num_workers=2,
            multiprocessing_context="no-such-method",
            worker_type="process",
        )
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(ConfigError, match="worker_type"):
        DataLoader(WhoLoaded(), num_workers=2, worker_type="Process")
