"""Lifecycle: breaks, close during a blocked read, held tracebacks, Ctrl-C, exit, interleaving.

Every case ends with the process back at its baseline threads and file descriptors, and
every epoch that runs to the end is checked with a :class:`~fastfeed.testing.Ledger` (each index
exactly once, content intact). Both :class:`fastfeed.Loader` and the torch-compatible
:class:`fastfeed.dataloader.DataLoader` are covered where the case applies to both.
"""

from __future__ import annotations

import gc
import itertools
import signal
import threading
import time
from typing import Any

import pytest
import torch

from fastfeed.dataloader import DataLoader
from fastfeed.loader import Loader
from fastfeed.testing import (
    Child,
    FaultySource,
    Ledger,
    LedgerDataset,
    LedgerDecode,
    LedgerSource,
    ResourceSnapshot,
    run_child,
)

N = 96
BATCH = 8
PREFETCH = 3
BATCHES = N // BATCH
CLOSE_LIMIT_S = 2.5  # close() joins for at most 2 s; the rest is slack for a busy CPU


def _make(impl: str, n: int = N, **kwargs: Any) -> Any:
    if impl == "Loader":
        return Loader(
            LedgerSource(n, **kwargs),
            LedgerDecode(),
            batch_size=BATCH,
            shuffle=True,
            num_threads=2,
            prefetch=PREFETCH,
        )
    # prefetch_factor * num_workers = 4 batches ahead, close to the Loader's 3.
    return DataLoader(LedgerDataset(n, **kwargs), batch_size=BATCH, shuffle=True, num_workers=2)


def _close(loader: Any) -> None:
    loader.close()
    source = getattr(loader, "source", None)
    if source is not None:
        source.close()


def _assert_settles(baseline: ResourceSnapshot) -> None:
    gc.collect()  # an abandoned iterator in a reference cycle is collected here
    excess = ResourceSnapshot.settle(baseline).excess_over(baseline)
    assert not excess, excess


IMPLS = ["Loader", "DataLoader"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("k", [0, 1, 3, PREFETCH + 1])
def test_break_after_k_batches(impl: str, k: int) -> None:
    baseline = ResourceSnapshot()
    loader = _make(impl)
    try:
        first = Ledger(range(N))
        it = iter(loader)
        batch = None
        for batch in itertools.islice(it, k):
            first.add(batch)
        assert first.batches == k
        state = loader.state_dict() if impl == "Loader" else None
        del it, batch  # break: the only references to the iterator go away
        _assert_settles(baseline)

        if impl == "Loader":
            # The rest of the interrupted epoch, resumed: together exactly once.
            loader.load_state_dict(state)
            for batch in loader:
                first.add(batch)
            first.check()
            assert first.batches == BATCHES

        # Re-iterate after the break: a whole fresh epoch, exact.
        again = Ledger(range(N))
        for batch in loader:
            again.add(batch)
        again.check()
        assert again.batches == BATCHES
    finally:
        _close(loader)
    _assert_settles(baseline)


def _blocking(impl: str, block_at: int) -> tuple[Any, threading.Event, threading.Event]:
    """A loader whose read of ``block_at`` blocks; returns (loader, stalled, release)."""
    if impl == "Loader":
        src = FaultySource(LedgerSource(N), stall_at=[block_at], max_stall_s=20.0)
        loader = Loader(src, LedgerDecode(), batch_size=BATCH, num_threads=2, prefetch=2)
        return loader, src.stalled, src._released

    stalled, release = threading.Event(), threading.Event()

    class Blocking(LedgerDataset):
        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            if index == block_at:
                stalled.set()
                release.wait(20.0)
            return super().__getitem__(index)

    loader = DataLoader(Blocking(N), batch_size=BATCH, num_workers=2, prefetch_factor=1)
    return loader, stalled, release


@pytest.mark.parametrize("impl", IMPLS)
def test_close_while_source_blocks_inside_a_read(impl: str) -> None:
    block_at = 3 * BATCH + 2  # in batch 3: batches 0..2 arrive first
    loader, stalled, release = _blocking(impl, block_at)
    baseline = ResourceSnapshot()
    try:
        it = iter(loader)
        ledger = Ledger(range(3 * BATCH))
        for _ in range(3):
            ledger.add(next(it))
        ledger.check()
        assert stalled.wait(10.0), "the read of the blocking index never started"
        t0 = time.monotonic()
        loader.close()
        elapsed = time.monotonic() - t0
        assert elapsed < CLOSE_LIMIT_S, f"close() took {elapsed:.2f} s with a read blocked"
    finally:
        release.set()  # the stuck read returns; its thread exits
        _close(loader)
    del it
    _assert_settles(baseline)


@pytest.mark.parametrize("impl", IMPLS)
def test_iterator_after_close_ends_or_says_closed(impl: str) -> None:
    loader = _make(impl)
    try:
        it = iter(loader)
        Ledger(range(N)).add(next(it))
        loader.close()
        try:
            next(it)  # must end, or fail saying why; never block, never blame something else
        except StopIteration:
            pass
        except Exception as exc:
            assert "closed" in str(exc).lower(), f"{type(exc).__name__}: {exc}"
        else:
            raise AssertionError("a closed loader's iterator delivered another batch")
    finally:
        _close(loader)


def _train_until_error(loader: Any, fail_at: int) -> None:
    batches = iter(loader)  # a local: the traceback's frame keeps the iterator alive
    for step, _batch in enumerate(batches):
        if step == fail_at:
            raise RuntimeError(f"loss is NaN at step {step}")


@pytest.mark.parametrize("impl", IMPLS)
def test_exception_in_training_loop_while_traceback_holds_the_iterator(impl: str) -> None:
    baseline = ResourceSnapshot()
    loader = _make(impl)
    try:
        try:
            _train_until_error(loader, fail_at=2)
        except RuntimeError as exc:
            held = exc  # e.g. a notebook keeping sys.last_traceback
        assert "NaN at step 2" in str(held)
        # While the traceback still holds the old iterator, a new epoch must work and
        # be exact. The Loader's new epoch stops the old iteration's threads; the
        # DataLoader keeps the old iterator live, as torch does (several live iterators),
        # until it is dropped.
        ledger = Ledger(range(N))
        for batch in loader:
            ledger.add(batch)
        ledger.check()
        if impl == "DataLoader":
            del held
            gc.collect()
        _assert_settles(baseline)
        # The same with close(): the held iterator is stopped, nothing lingers.
        try:
            _train_until_error(loader, fail_at=1)
        except RuntimeError as exc:
            held = exc
        _close(loader)
        _assert_settles(baseline)
        del held
    finally:
        _close(loader)
    _assert_settles(baseline)


@pytest.mark.parametrize("impl", IMPLS)
def test_two_loaders_interleaved_over_one_source(impl: str) -> None:
    baseline = ResourceSnapshot()
    shared = LedgerSource(N)
    first = Loader(shared, LedgerDecode(), batch_size=BATCH, shuffle=True, seed=1, num_threads=2)
    if impl == "Loader":
        second: Any = Loader(
            shared, LedgerDecode(), batch_size=5, shuffle=True, seed=2, num_threads=2
        )
    else:
        second = DataLoader(LedgerDataset(N), batch_size=5, shuffle=True, num_workers=2)
    try:
        for _epoch in range(2):
            led_a, led_b = Ledger(range(N)), Ledger(range(N))
            for a, b in itertools.zip_longest(first, second):
                if a is not None:
                    led_a.add(a)
                if b is not None:
                    led_b.add(b)
            led_a.check()
            led_b.check()
            assert (led_a.batches, led_b.batches) == (BATCHES, -(-N // 5))
    finally:
        first.close()
        second.close()
        shared.close()
    _assert_settles(baseline)


# -- child processes --------------------------------------------------------------------

_SIGINT_CHILD = """
import signal
import time
from fastfeed.testing import LedgerDataset, LedgerDecode, LedgerSource

# What an interactive terminal gives a training script. A child of a background job
# (e.g. a CI runner's `cmd &`) inherits SIGINT ignored, and Ctrl-C would never arrive.
signal.signal(signal.SIGINT, signal.default_int_handler)
from fastfeed.dataloader import DataLoader
from fastfeed.loader import Loader

if IMPL == "Loader":
    loader = Loader(LedgerSource(100000, delay_s=0.02), LedgerDecode(), batch_size=16,
                    num_threads=2)
else:
    loader = DataLoader(LedgerDataset(100000, delay_s=0.02), batch_size=16, num_workers=2)
for step, batch in enumerate(loader):
    if step == 0:
        print("READY", flush=True)
print("EPOCH-ENDED")
"""


@pytest.mark.parametrize("impl", IMPLS)
def test_ctrl_c_in_a_child_exits_promptly(impl: str) -> None:
    child = Child(f"IMPL = {impl!r}\n" + _SIGINT_CHILD, timeout_s=40)
    try:
        child.wait_for("READY", timeout_s=30)
        t0 = time.monotonic()
        child.send_signal(signal.SIGINT)
        res = child.finish(timeout_s=10)
        after_signal_s = time.monotonic() - t0
    finally:
        child.kill()
    assert "KeyboardInterrupt" in res.stderr, res.stderr[-2000:]
    assert "EPOCH-ENDED" not in res.stdout
    assert res.returncode in (-signal.SIGINT, 130), (res.returncode, res.stderr[-2000:])
    assert after_signal_s < 5.0, f"exit took {after_signal_s:.1f} s after SIGINT"


_EXIT_CHILD = """
import multiprocessing as mp
from fastfeed import testing

if __name__ == "__main__":
    # Live loaders in this process first, so the fork below copies a process with threads.
    testing.hold_live_loaders()
    proc = mp.get_context(METHOD).Process(target=testing.hold_live_loaders)
    proc.start()
    proc.join(60)
    print("CHILD-EXITCODE", proc.exitcode, flush=True)
    from fastfeed.dataloader import DataLoader
    workers = DataLoader(testing.LedgerDataset(4096), batch_size=8, num_workers=1,
                         worker_type="process", multiprocessing_context=METHOD)
    it = iter(workers)
    next(it)
    print("PARENT-LIVE", flush=True)
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_interpreter_exit_with_live_loaders(method: str) -> None:
    res = run_child(f"METHOD = {method!r}\n" + _EXIT_CHILD, timeout_s=60)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "LIVE-LOADERS" in res.stdout  # the parent's own
    assert "CHILD-EXITCODE 0" in res.stdout, res.stdout + res.stderr[-3000:]
    assert res.stdout.count("LIVE-LOADERS") == 2  # and the child's
    assert "PARENT-LIVE" in res.stdout
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
