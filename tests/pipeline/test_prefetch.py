"""Prefetcher: order, bounded depth, exceptions at position, timeouts, shutdown."""

from __future__ import annotations

import gc
import random
import threading
import time
from dataclasses import dataclass

import pytest

from fastfeed.errors import ConfigError, LoaderTimeoutError
from fastfeed.pipeline.prefetch import Prefetcher
from fastfeed.pipeline.tap import Tap
from fastfeed.profiling import Recorder


@dataclass(frozen=True)
class Task:
    n: int

    @property
    def indices(self) -> list[int]:
        return [10 * self.n, 10 * self.n + 1]


def _fastfeed_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("fastfeed-")]


@pytest.mark.parametrize("threads", [0, 1, 4])
def test_in_order_despite_random_delays(threads: int) -> None:
    rng = random.Random(1)
    delays = [rng.uniform(0, 0.003) for _ in range(60)]

    def fn(t: Task) -> int:
        time.sleep(delays[t.n])
        return t.n * t.n

    with Prefetcher((Task(i) for i in range(60)), fn, num_threads=threads, depth=8) as p:
        out = [(t.n, r) for t, r in p]
    assert out == [(i, i * i) for i in range(60)]


def test_out_of_order_yields_everything_once_and_completion_first() -> None:
    release = threading.Event()

    def fn(t: Task) -> int:
        if t.n == 0:
            release.wait(5)  # task 0 finishes last
        return t.n

    p = Prefetcher((Task(i) for i in range(6)), fn, num_threads=3, depth=6, in_order=False)
    first = [next(p)[1] for _ in range(5)]
    release.set()
    rest = [r for _, r in p]
    p.close()
    assert 0 not in first
    assert sorted(first + rest) == list(range(6)) and rest == [0]


def test_depth_bounds_work_ahead_of_the_consumer() -> None:
    lock = threading.Lock()
    started = [0]
    running = [0]
    max_running = [0]
    max_ahead = [0]
    consumed = [0]

    def fn(t: Task) -> int:
        with lock:
            started[0] += 1
            running[0] += 1
            max_running[0] = max(max_running[0], running[0])
            max_ahead[0] = max(max_ahead[0], started[0] - consumed[0])
        time.sleep(0.001)
        with lock:
            running[0] -= 1
        return t.n

    with Prefetcher((Task(i) for i in range(80)), fn, num_threads=6, depth=3) as p:
        for _t, _r in p:
            with lock:
                consumed[0] += 1
            time.sleep(0.002)  # a slow consumer: workers must wait, not run ahead
    assert consumed[0] == 80
    assert max_running[0] <= 3
    # Tasks started but not yet consumed never exceed the depth; +1 because the slot of
    # the task being handed over is freed just before the consumer counts it.
    assert max_ahead[0] <= 3 + 1
    assert max_ahead[0] >= 2  # the pipeline did work ahead


@pytest.mark.parametrize("threads", [0, 2])
def test_exception_is_raised_at_its_position_and_prefetcher_continues(threads: int) -> None:
    def fn(t: Task) -> int:
        if t.n == 5:
            raise KeyError("bad five")
        return t.n

    p = Prefetcher((Task(i) for i in range(9)), fn, num_threads=threads, depth=4)
    got = [next(p)[1] for _ in range(5)]
    with pytest.raises(KeyError, match="bad five"):
        next(p)
    rest = [r for _, r in p]
    p.close()
    assert got == [0, 1, 2, 3, 4] and rest == [6, 7, 8]


@pytest.mark.parametrize("threads", [0, 2])
def test_task_iterator_error_arrives_at_its_position(threads: int) -> None:
    def tasks():
        yield Task(0)
        yield Task(1)
        raise RuntimeError("sampler broke")

    p = Prefetcher(tasks(), lambda t: t.n, num_threads=threads, depth=2)
    assert [next(p)[1] for _ in range(2)] == [0, 1]
    with pytest.raises(RuntimeError, match="sampler broke"):
        next(p)
    with pytest.raises(StopIteration):
        next(p)
    p.close()


def test_timeout_names_the_tasks_in_flight() -> None:
    gate = threading.Event()

    def fn(t: Task) -> int:
        if t.n == 2:
            gate.wait(10)
        return t.n

    p = Prefetcher(
        (Task(i) for i in range(4)),
        fn,
        num_threads=2,
        depth=2,
        timeout_s=0.3,
        describe=lambda t: f"task#{t.n}",
    )
    try:
        assert [next(p)[1] for _ in range(2)] == [0, 1]
        t0 = time.monotonic()
        with pytest.raises(LoaderTimeoutError) as info:
            next(p)
        assert 0.25 <= time.monotonic() - t0 < 2.0
        assert "timeout=0.3 s" in str(info.value) and "task#2" in str(info.value)
        assert 20 in info.value.in_flight and 21 in info.value.in_flight
    finally:
        gate.set()
        p.close()


def test_close_is_idempotent_and_stops_iteration() -> None:
    p = Prefetcher((Task(i) for i in range(100)), lambda t: t.n, num_threads=3, depth=4)
    assert next(p)[1] == 0
    names = [t.name for t in p.threads]
    assert len(names) == 3 and all(n.startswith("fastfeed-worker-") for n in names)
    t0 = time.monotonic()
    p.close()
    p.close()
    assert time.monotonic() - t0 < 2.0
    assert p.threads == []
    with pytest.raises(StopIteration):
        next(p)


def test_garbage_collection_stops_threads() -> None:
    before = set(_fastfeed_threads())
    p = Prefetcher(
        (Task(i) for i in range(1000)), lambda t: t.n, num_threads=3, depth=2, role="gctest"
    )
    next(p)
    assert len([n for n in _fastfeed_threads() if n.startswith("fastfeed-gctest-")]) == 3
    del p
    gc.collect()
    deadline = time.monotonic() + 2.0
    while set(_fastfeed_threads()) - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert set(_fastfeed_threads()) - before == set()


def test_thread_init_and_recorder() -> None:
    seen: list[str] = []
    rec = Recorder()
    p = Prefetcher(
        (Task(i) for i in range(10)),
        lambda t: t.n,
        num_threads=2,
        depth=2,
        thread_init=lambda: seen.append(threading.current_thread().name),
        recorder=rec,
        role="init",
    )
    assert [r for _, r in Tap(p, rec)] == list(range(10))
    p.close()
    assert sorted(seen) == sorted(f"fastfeed-init-{n.split('-')[-1]}" for n in seen)
    assert len(seen) == 2
    snap = rec.snapshot()
    assert snap["queues"]["batches"]["capacity"] == 2
    assert snap["steps"] == 9  # 10 hand-offs, the first has no step time


def test_invalid_arguments() -> None:
    with pytest.raises(ConfigError, match="depth"):
        Prefetcher([], lambda t: t, num_threads=1, depth=0)
    with pytest.raises(ConfigError, match="num_threads"):
        Prefetcher([], lambda t: t, num_threads=-1, depth=1)
