"""The impure edge: source facts, the IO-accounting check, the GIL probe's lifecycle."""

from __future__ import annotations

import tempfile
import threading
import time

import pytest
from snapshots import snapshot

from fastfeed.profiling import Recorder, Stage
from fastfeed.sources import MemoryCache
from fastfeed.stats import probe
from fastfeed.stats.analyze import analyze
from fastfeed.stats.probe import SourceFacts, io_accounted, source_facts
from fastfeed.testing import ledger_source


def test_analysis_is_pure_no_temp_file_no_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("the analysis touched the outside world")

    monkeypatch.setattr(tempfile, "mkstemp", boom)
    monkeypatch.setattr(probe, "io_accounting_works", boom)
    snap = snapshot(io={"rchar": 5_000_000, "read_bytes": 0, "syscr": 10})
    stats = analyze(snap, batch_size=10, num_threads=4, io_accounted=True)
    assert stats.io is not None and stats.io.page_cache_hit == 1.0
    unknown = analyze(snap, batch_size=10, num_threads=4)
    assert unknown.io is not None and unknown.io.status == "unknown"


def test_io_accounting_is_only_checked_when_nothing_was_fetched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []
    monkeypatch.setattr(probe, "io_accounting_works", lambda: calls.append(1) or True)
    assert io_accounted(None) is None
    assert io_accounted({"rchar": 10, "read_bytes": 4096}) is None  # fetched: accounted
    assert io_accounted({"rchar": 0, "read_bytes": 0}) is None  # nothing read
    assert calls == []
    assert io_accounted({"rchar": 10, "read_bytes": 0}) is True
    assert calls == [1]


def test_source_facts_of_a_cache_around_a_source() -> None:
    cache = MemoryCache(ledger_source(20), capacity=1 << 20)
    cache.read_many([0, 1, 2])
    facts = source_facts(cache)
    assert facts.kind == "source" and facts.storage == "ListSource"
    assert facts.cache is not None and facts.cache["misses"] == 3
    assert facts.storage_bytes == 24 and not facts.is_pack
    assert source_facts(None) == SourceFacts(kind="opaque")
    assert source_facts([1, 2, 3]).kind == "dataset"


def _probe_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fastfeed-gilprobe-0"]


def _wait_probe_gone(timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _probe_threads() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_one_gil_probe_per_process_runs_while_stages_record_and_exits_when_idle() -> None:
    _wait_probe_gone()
    assert _probe_threads() == []
    rec, other = Recorder(), Recorder()
    rec.consumer_step(0.0, None)
    assert _probe_threads() == []  # a step alone starts no probe
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:  # keep both busy: spans every 10 ms
        t = time.perf_counter()
        rec.add(Stage.READ, t, t, 0.0)
        other.add(Stage.READ, t, t, 0.0)
        time.sleep(0.01)
    assert len(_probe_threads()) == 1  # shared by both recorders
    assert rec.snapshot()["gil"]["wakeups"] >= 5
    other.reset()
    assert other.snapshot()["gil"]["wakeups"] == 0  # counted from the reset
    _wait_probe_gone()
    assert _probe_threads() == []


def test_the_probe_wakes_less_often_after_its_first_wake_ups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fastfeed.profiling import gil

    _wait_probe_gone()
    monkeypatch.setattr(gil, "INTERVAL_S", 0.01)
    monkeypatch.setattr(gil, "WARM_WAKEUPS", 5)
    monkeypatch.setattr(gil, "SLOW_INTERVAL_S", 0.25)
    rec = Recorder()
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline:  # spans every 10 ms keep the probe running
        t = time.perf_counter()
        rec.add(Stage.READ, t, t, 0.0)
        time.sleep(0.01)
    wakeups = rec.snapshot()["gil"]["wakeups"]
    # 5 quick wake-ups (50 ms), then one every 250 ms: about 9 in 1.2 s, where 10 ms
    # sleeps throughout would have made about 120.
    assert 5 <= wakeups <= 20
    _wait_probe_gone()


def test_disabled_recorder_starts_no_probe() -> None:
    _wait_probe_gone()
    rec = Recorder(enabled=False)
    with rec.span(Stage.READ):
        pass
    assert _probe_threads() == []
