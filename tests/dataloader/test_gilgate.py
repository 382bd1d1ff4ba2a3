"""The GIL gate of thread workers: decisions from measurements, no change but timing."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
import torch.utils.data as tud

from fastfeed import DataLoader
from fastfeed._torch_compat import gilgate
from fastfeed._torch_compat.gilgate import GilGate


class _Clocks:
    """Fake wall and CPU clocks a test advances by hand."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def work(self, wall_s: float, cpu_s: float) -> Any:
        def fn(task: Any) -> Any:
            self.wall += wall_s
            self.cpu += cpu_s
            return task

        return fn


def _gate(threads: int = 2) -> tuple[GilGate, _Clocks]:
    clocks = _Clocks()
    gate = GilGate(
        threads, window=4, warm_up=0, clock=lambda: clocks.wall, cpu_clock=lambda: clocks.cpu
    )
    return gate, clocks


def _run(gate: GilGate, fn: Any, n: int) -> None:
    for i in range(n):
        assert gate.run(fn, i) == i


def test_one_core_busy_then_serial_as_fast_goes_serial() -> None:
    gate, clocks = _gate()
    # Two threads, GIL-bound: 30 ms per batch of which each thread computes 15 ms
    # (sequential fake calls stand for the overlapping ones: 0.5 cores per batch-time).
    _run(gate, clocks.work(0.030, 0.030), 4)  # parallel window: 1.0 core busy
    assert gate.serial and "probe" in gate._state
    _run(gate, clocks.work(0.030, 0.030), 4)  # serial window: as fast
    assert gate.serial
    d = gate.describe()
    assert d["serial"] and d["reason"].startswith("serial:") and "1.00 cores" in d["reason"]


def test_nearly_as_fast_for_much_less_cpu_goes_serial() -> None:
    gate, clocks = _gate()
    _run(gate, clocks.work(0.030, 0.030), 4)  # GIL contention: 30 ms CPU per batch
    _run(gate, clocks.work(0.032, 0.022), 4)  # 0.94x the rate, 0.73x the CPU
    assert gate.serial and "0.73x the CPU" in gate.describe()["reason"]


def test_first_window_is_a_warm_up() -> None:
    clocks = _Clocks()
    gate = GilGate(2, window=4, clock=lambda: clocks.wall, cpu_clock=lambda: clocks.cpu)
    _run(gate, clocks.work(0.030, 0.030), 4)
    assert gate._state == "probe-parallel"  # measured again: start-up is not the workload
    _run(gate, clocks.work(0.030, 0.030), 4)
    assert gate._state == "probe-serial"


def test_more_than_one_core_busy_stays_parallel_without_a_serial_probe() -> None:
    gate, clocks = _gate()
    _run(gate, clocks.work(0.030, 0.057), 4)  # 1.9 cores: parallelism pays
    assert not gate.serial
    assert "more than one core" in gate.describe()["reason"]


def test_waiting_workers_lose_the_serial_probe_halfway() -> None:
    gate, clocks = _gate()
    _run(gate, clocks.work(0.030, 0.003), 4)  # 0.1 cores: IO, a full queue, or GIL-bound
    assert gate.serial  # a serial probe tells them apart
    wait = clocks.work(0.060, 0.003)  # IO-bound: one at a time takes twice as long
    _run(gate, wait, 2)
    assert gate.serial  # 2 of 4 batches in 120 ms: could still reach 95% of 33/s
    gate.run(wait, 0)
    assert not gate.serial and gate.describe()["reason"].startswith("parallel:")


def test_a_slower_serial_probe_goes_back_to_parallel_and_backs_off() -> None:
    gate, clocks = _gate()
    _run(gate, clocks.work(0.030, 0.030), 4)
    assert gate.serial
    gate.run(clocks.work(0.150, 0.030), 0)  # one serial batch already too slow to win
    assert not gate.serial
    assert gate.describe()["reason"].startswith("parallel:")
    assert gate._backoff_s == 2 * gilgate._REPROBE_S


def test_an_idle_gap_restarts_the_window() -> None:
    gate, clocks = _gate()
    _run(gate, clocks.work(0.030, 0.030), 3)
    clocks.wall += 5.0  # between epochs: would read as 0.02 cores busy
    _run(gate, clocks.work(0.030, 0.057), 3)
    assert gate._state == "probe-parallel"  # 3 batches since the gap: window not full
    _run(gate, clocks.work(0.030, 0.057), 1)
    assert not gate.serial and "1.90 cores" in gate.describe()["reason"]


def test_choice_is_measured_again_later() -> None:
    gate, clocks = _gate()
    _run(gate, clocks.work(0.030, 0.057), 4)
    assert not gate.serial and gate._state == "parallel"
    clocks.wall += gilgate._REPROBE_S + 1
    gate.run(clocks.work(0.030, 0.057), 0)
    assert gate._state == "probe-parallel"


def test_batches_that_wait_for_each_other_never_deadlock(monkeypatch: Any) -> None:
    monkeypatch.setattr(gilgate, "_BYPASS_S", 0.2)
    gate = GilGate(2)
    gate._set("serial")  # as if measured GIL-bound
    barrier = threading.Barrier(2, timeout=10)
    out: list[int] = []

    def fn(i: int) -> int:
        barrier.wait()  # each batch needs the other one running at the same time
        return i

    threads = [threading.Thread(target=lambda i=i: out.append(gate.run(fn, i))) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(out) == [0, 1]
    assert not gate.serial and "depend on each other" in gate.describe()["reason"]
    assert gate._open_for_good


class _Squares(tud.Dataset[tuple[torch.Tensor, int]]):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        info = tud.get_worker_info()
        worker = -1 if info is None else info.id
        return torch.tensor([i * i, worker]), i


def test_serial_batches_are_torchs_batches_on_the_worker_threads() -> None:
    ds = _Squares()
    kw: dict[str, Any] = {"batch_size": 4, "shuffle": True}
    expected = list(tud.DataLoader(ds, generator=torch.Generator().manual_seed(3), **kw))
    loader = DataLoader(
        ds, num_workers=2, worker_type="thread", generator=torch.Generator().manual_seed(3), **kw
    )
    assert loader._gate is not None
    loader._gate._set("serial")  # as if measured GIL-bound
    loader._gate._next_probe = float("inf")
    got = list(loader)
    assert len(got) == len(expected)
    for (x, y), (ex, ey) in zip(got, expected, strict=True):
        assert torch.equal(x[:, 0], ex[:, 0]) and torch.equal(y, ey)
        assert set(x[:, 1].tolist()) <= {0, 1}  # each batch ran on a worker thread
    execution = loader.stats().execution
    assert execution is not None and execution["one_batch_at_a_time"] is True
    assert "batches at a time" in execution["reason"]
    loader.close()


@pytest.mark.parametrize("num_workers", [0, 1])
def test_no_gate_below_two_workers(num_workers: int) -> None:
    loader = DataLoader(_Squares(), batch_size=4, num_workers=num_workers, worker_type="thread")
    assert loader._gate is None
    execution = loader.stats().execution
    assert execution is not None and execution["one_batch_at_a_time"] is False
