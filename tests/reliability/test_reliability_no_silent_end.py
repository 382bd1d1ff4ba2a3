"""No epoch ends silently short, no systemic failure passes as a bad sample.

Each case here once ended an epoch early without an error, or skipped a failure of the
whole source or configuration one sample at a time: a second ``iter()``, ``close()`` from
another thread, a ``next()`` after an error, a deleted folder, a misconfigured transform,
an epoch of nothing but failures, an idle worker process killed between epochs; and the
sample count ``stats()`` reports with skipped samples.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from fastfeed.errors import (
    ConfigError,
    CorruptSourceError,
    FastFeedError,
    SampleError,
    SourceNotFoundError,
    TooManyFailuresError,
)
from fastfeed.image import Compose, Resize, ToFloat
from fastfeed.loader import Loader
from fastfeed.sources.base import Record, Source
from fastfeed.sources.files import FileSource
from fastfeed.testing import FaultySource, Ledger, LedgerDecode, LedgerSource

N = 40
BATCH = 4


def _loader(source: Any = None, **kw: Any) -> Loader:
    kw.setdefault("num_threads", 2)
    kw.setdefault("processes", 0)
    return Loader(
        source or LedgerSource(N), kw.pop("transform", LedgerDecode()), batch_size=BATCH, **kw
    )


class _FailAlways:
    def __call__(self, data: Any) -> torch.Tensor:
        raise ValueError("this transform always fails")


class _ConfigErrorAt:
    """Raises ConfigError for one index (a transform that found itself misconfigured)."""

    def __call__(self, data: Any) -> torch.Tensor:
        index = int(LedgerDecode()(data)[0])
        if index == 5:
            raise ConfigError("size must be positive")
        return torch.tensor([index])


@pytest.mark.parametrize("num_threads", [0, 2])
def test_a_second_iter_makes_the_first_iterator_raise_not_end(num_threads: int) -> None:
    loader = _loader(num_threads=num_threads)
    first = iter(loader)
    next(first)
    second = iter(loader)
    with pytest.raises(FastFeedError, match=r"stopped because iter\(loader\) started a new"):
        next(first)
    assert len(list(second)) == N // BATCH  # the new one is a whole epoch
    loader.close()


@pytest.mark.parametrize("num_threads", [0, 2])
def test_next_after_an_error_raises_and_state_dict_resumes_the_rest(num_threads: int) -> None:
    source = FaultySource(LedgerSource(N), raise_at=[9])
    loader = _loader(source, num_threads=num_threads)
    it = iter(loader)
    got = [next(it), next(it)]  # indices 0..7
    with pytest.raises(SampleError):
        next(it)
    with pytest.raises(FastFeedError, match=r"already stopped at an error \(SampleError"):
        next(it)
    state = loader.state_dict()
    assert state["position"] == 2
    source.raise_at = set()  # the fault was transient
    loader.load_state_dict(state)
    ledger = Ledger(range(N))
    for batch in got + list(loader):
        ledger.add(batch)
    ledger.check()  # every sample exactly once across the error
    loader.close()


def test_close_from_another_thread_wakes_a_waiting_loop_with_an_error() -> None:
    source = FaultySource(LedgerSource(N), stall_at=[6], max_stall_s=30.0)
    loader = _loader(source, num_threads=2, prefetch=2)
    outcome: list[BaseException | str] = []

    def consume() -> None:
        try:
            for _ in loader:
                pass
            outcome.append("ended normally")
        except BaseException as exc:
            outcome.append(exc)

    consumer = threading.Thread(target=consume)
    consumer.start()
    assert source.stalled.wait(10)
    loader.close()  # the worker stays stuck in the read; the consumer must not
    consumer.join(10)
    alive = consumer.is_alive()
    source.release()
    consumer.join(10)
    assert not alive
    assert len(outcome) == 1 and isinstance(outcome[0], FastFeedError)
    assert "the Loader was closed (Loader.close())" in str(outcome[0])


def test_a_deleted_folder_is_not_skipped_sample_by_sample(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for k in range(12):
        (root / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"c{k % 2}" / f"{k:03d}.jpg").write_bytes(bytes([k]) * 16)
    source = FileSource.from_folder(root)
    loader = Loader(source, batch_size=4, num_threads=0, on_error="skip")
    assert len(list(loader)) == 3
    shutil.rmtree(root)
    with pytest.raises(SampleError) as info:
        list(loader)
    assert isinstance(info.value.__cause__, SourceNotFoundError)
    assert f"the source's folder {root} no longer exists" in str(info.value)
    loader.close()
    source.close()


def test_a_misconfigured_transform_fails_when_built_or_is_never_skipped() -> None:
    with pytest.raises(ConfigError, match="mean has 3 values for 1 channels"):
        Compose([Resize(8), ToFloat((0.5, 0.5, 0.5), (0.2, 0.2, 0.2))], mode="L")
    loader = _loader(transform=_ConfigErrorAt(), on_error="skip", num_threads=0)
    with pytest.raises(SampleError, match="size must be positive") as info:
        list(loader)
    assert info.value.index == 5 and isinstance(info.value.__cause__, ConfigError)
    loader.close()


@pytest.mark.parametrize("num_threads", [0, 2])
def test_an_epoch_of_nothing_but_failures_raises(num_threads: int) -> None:
    loader = _loader(transform=_FailAlways(), on_error="skip", num_threads=num_threads)
    with pytest.raises(TooManyFailuresError, match=r"every sample of epoch 0 failed \(40 skipped"):
        list(loader)
    assert "this transform always fails" in str(loader.skipped[0].message)
    loader.close()
    allowed = _loader(transform=_FailAlways(), on_error="skip", max_failures=1.0)
    assert list(allowed) == []  # an explicit max_failures opts out
    assert len(allowed.skipped) == N
    allowed.close()


def test_stats_count_delivered_samples_not_skipped_ones() -> None:
    source = FaultySource(LedgerSource(N), raise_at=[3, 13, 23, 33, 34])
    loader = _loader(source, on_error="skip", num_threads=2)
    delivered = sum(len(b.indices) for b in loader)
    stats = loader.stats()
    assert delivered == N - 5
    assert stats.samples == delivered and stats.skipped == 5
    assert stats.batches == N // BATCH
    loader.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork start method")
def test_an_idle_worker_process_killed_between_epochs_is_replaced_with_a_warning() -> None:
    loader = _loader(num_threads=1, processes=2, start_method="fork")
    assert len(list(loader)) == N // BATCH
    pid = loader._pipeline._pool.pids[0]  # type: ignore[union-attr]
    os.kill(pid, signal.SIGKILL)
    loader._pipeline._pool.workers[0].process.join(10)  # type: ignore[union-attr]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ledger = Ledger(range(N))
        for batch in loader:
            ledger.add(batch)
    ledger.check()
    messages = [str(w.message) for w in caught]
    assert any(
        m.startswith("starting new worker processes: worker process fastfeed-worker-0")
        and "killed by SIGKILL" in m
        for m in messages
    ), messages
    loader.close()


class _Numbers(Source):
    """Ten 8-byte records; subclasses misbehave the way a user's own source might."""

    def __len__(self) -> int:
        return 10

    def describe(self, index: int) -> str:
        return f"numbers[{index}]"

    def _read_one(self, index: int) -> Record:
        return Record(index.to_bytes(8, "little"), 0)


class _LenFails(_Numbers):
    def __len__(self) -> int:
        raise OSError(5, "disk gone")


class _ShortReadMany(_Numbers):
    def _read_many(self, indices: Any) -> list[Record]:
        return [self._read_one(i) for i in indices][:-1]


class _BadLabel(_Numbers):
    def _read_one(self, index: int) -> Record:
        return Record(index.to_bytes(8, "little"), None if index == 5 else 0)


def _as_tensor(data: Any) -> torch.Tensor:
    return torch.tensor([int.from_bytes(bytes(data), "little")])


def test_a_source_whose_len_fails_keeps_its_error_with_a_note() -> None:
    with pytest.raises(OSError, match="disk gone") as info:
        Loader(_LenFails(), _as_tensor, batch_size=4, processes=0)
    assert info.value.errno == 5  # the user's own exception object
    assert info.value.__notes__ == [
        "fastfeed: len() of the source _LenFails failed while building the Loader"
    ]


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_read_many_returning_too_few_records_is_a_source_error(on_error: str) -> None:
    loader = Loader(_ShortReadMany(), _as_tensor, batch_size=4, processes=0, on_error=on_error)
    with pytest.raises(CorruptSourceError, match=r"returned 3 records for 4 indices \(\[0, 1"):
        list(loader)
    loader.close()


@pytest.mark.parametrize("num_threads", [0, 2])
def test_a_record_without_a_label_among_labelled_ones_names_its_index(num_threads: int) -> None:
    loader = Loader(_BadLabel(), _as_tensor, batch_size=4, num_threads=num_threads, processes=0)
    with pytest.raises(SampleError, match=r"sample 5 \(numbers\[5\]\) failed in stage 'read'"):
        list(loader)
    loader.close()


def test_a_transform_spawned_workers_cannot_receive_is_a_config_error() -> None:
    loader = _loader(
        transform=lambda data: LedgerDecode()(data),  # a lambda does not pickle
        num_threads=1,
        processes=2,
        start_method="spawn",
    )
    with pytest.raises(ConfigError, match=r"cannot be sent to 'spawn' worker processes: .*lambda"):
        iter(loader)
    loader.close()
