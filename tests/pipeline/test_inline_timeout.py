"""Loader(num_threads=0, timeout=...) honours the timeout; without one it stays inline."""

from __future__ import annotations

import threading

import pytest

from fastfeed.errors import LoaderTimeoutError
from fastfeed.loader import Loader
from fastfeed.testing import BlockingSource, ledger_source


def test_inline_loader_times_out_on_a_stuck_read() -> None:
    source = BlockingSource(8, block_at=[5], max_block_s=20.0)
    loader = Loader(source, batch_size=2, num_threads=0, timeout=0.5, collate_fn=list)
    got = []
    try:
        with pytest.raises(LoaderTimeoutError, match=r"timeout=0\.5 s") as info:
            for batch in loader:
                got.append(batch)
        assert len(got) == 2  # batches [0, 1] and [2, 3] arrived; [4, 5] is stuck
        assert info.value.in_flight == [4, 5]
    finally:
        source.release()
        loader.close()


def test_inline_loader_without_timeout_runs_on_the_callers_thread() -> None:
    seen: set[str] = set()

    def tf(data: bytes) -> bytes:
        seen.add(threading.current_thread().name)
        return data

    loader = Loader(ledger_source(6), tf, batch_size=2, num_threads=0, collate_fn=list)
    assert sum(len(b) for b in loader) == 6
    loader.close()
    assert seen == {threading.current_thread().name}


def test_inline_loader_with_timeout_delivers_every_batch_in_order() -> None:
    loader = Loader(ledger_source(10), batch_size=3, num_threads=0, timeout=5, collate_fn=list)
    try:
        got = [int.from_bytes(x, "little") for data, _labels in loader for x in data]
    finally:
        loader.close()
    assert got == list(range(10))
