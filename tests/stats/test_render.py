"""What people and programs read: summary, table, JSON, trace, plot."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import pytest
from snapshots import snapshot, stats_of

from fastfeed.pipeline.prefetch import Prefetcher
from fastfeed.pipeline.tap import Tap
from fastfeed.profiling import Recorder, Stage
from fastfeed.stats import LoaderStats, Verdict
from fastfeed.stats.render import LEGEND
from fastfeed.testing import ledger_source


@dataclass
class _Task:
    indices: list[int]


def _run(source: Any, batches: int = 3, batch_size: int = 8) -> LoaderStats:
    rec = Recorder()

    def work(task: _Task) -> list[Any]:
        with rec.span(Stage.READ, items=len(task.indices)):
            recs = source.read_many(task.indices)
        with rec.span(Stage.TRANSFORM, items=len(recs)):
            return [r.data for r in recs]

    tasks = [_Task(list(range(i * batch_size, (i + 1) * batch_size))) for i in range(batches)]
    with Prefetcher(tasks, work, num_threads=1, depth=2, recorder=rec) as pf:
        for _ in Tap(pf, rec):
            pass
    return LoaderStats.collect(rec, batch_size=batch_size, num_threads=1, source=source)


def test_summary_is_at_most_three_lines_with_details_on_request() -> None:
    snap = snapshot(
        gil={"wakeups": 500, "wait_per_acquire_s": 0.005, "runq_s": 0.0},
        consumer={"steps": 100, "compute_s": 5.0, "cpu_s": 2.0, "runq_s": 0.5, "switches": 500},
    )
    stats = stats_of(snap, kind="dataset")
    lines = stats.summary().splitlines()
    assert len(lines) == 3, lines
    assert lines[0] == stats.verdict.sentence + "."
    assert lines[1] == f"Next: {stats.verdict.actions[0]}."
    assert lines[2].startswith("The loader's threads slow your step by 150% (GIL)")
    detailed = stats.summary(details=True).splitlines()
    assert detailed[:3] == lines and len(detailed) > 6
    assert any(x.startswith("Stage transform: 390.0 ms per span on 4 thread(s)") for x in detailed)
    assert any("one GIL acquisition cost 5.0 ms" in x for x in detailed), detailed
    assert str(stats) == stats.summary()


def test_table_has_a_legend_and_queue_waits_in_words() -> None:
    snap = snapshot(
        queues={
            "batches": {
                "put_wait_s": 0.25,
                "get_wait_s": 4.0,
                "mean_depth": 0.5,
                "capacity": 8,
                "occupancy": 0.0625,
            }
        }
    )
    stats = stats_of(snap)
    table = stats.table()
    head = table.splitlines()[0].split()
    assert head[:6] == ["stage", "rate/s", "p50", "p99", "busy", "CPU/wall"]
    assert head[6:] == ["core", "GIL", "IO", "MB/s", "fail"]
    assert LEGEND in table and "CPU/wall = computing share" in LEGEND
    assert (
        "the training loop waited 4000.0 ms for batches; workers waited 250.0 ms for room "
        "(on average 0.5 of 8 batches ready)"
    ) in table
    assert "put-wait" not in table and "get-wait" not in table
    row = next(x for x in table.splitlines() if x.startswith("transform"))
    assert row.split()[7:11] == ["0.99", "0%", "0%", "1%"], row


def test_memory_cache_stats_and_json_round_trip(tmp_path) -> None:
    from fastfeed.sources import MemoryCache

    cache = MemoryCache(ledger_source(40), capacity=1 << 20)
    stats = _run(cache)
    assert stats.cache is not None
    assert stats.cache.misses == 24 and stats.cache.hits == 0
    assert stats.source is not None and stats.source["reads"] == 24
    d = json.loads(stats.to_json())
    assert d["verdict"]["bound"] == stats.verdict.bound.value
    assert d["cache"]["misses"] == 24 and d["batch_size"] == 8 and d["samples"] == 24
    assert set(d["stages"]) == {"read", "transform"}
    assert set(d["workers"]) == {"cpu_s", "runq_s", "gil_s", "io_s"}
    assert d["world_size"] == 1 and d["ranks"] == [] and d["execution"] is None
    stats.save_json(tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text())["steps"] == 2


def test_skipped_and_verdict_str() -> None:
    from collections import namedtuple

    from fastfeed.stats.analyze import analyze

    entry = namedtuple("entry", "index where")
    stats = analyze(snapshot(), batch_size=10, num_threads=4, skipped=[7, entry(3, "a.jpg"), 9])
    assert stats.skipped == 3 and stats.skipped_indices == [7, 3, 9]
    assert "3 samples skipped (first: [7, 3, 9])" in stats.summary(details=True)
    assert str(stats.verdict) == stats.verdict.sentence
    assert isinstance(stats.verdict, Verdict)


def test_trace_says_what_it_covers(tmp_path) -> None:
    stats = _run(ledger_source(40))
    stats.save_trace(tmp_path / "t.json")
    meta = json.loads((tmp_path / "t.json").read_text())["otherData"]
    assert (
        meta["covers"]
        == f"the latest {len(stats._events)} events since the recorder started or was reset"
    )
    stats.extra["phases"] = {"step": "none"}
    stats.save_trace(tmp_path / "t.json")
    meta = json.loads((tmp_path / "t.json").read_text())["otherData"]
    assert meta["covers"].startswith("phase 4/5 (the full loader, no model step) only")


def test_plot_has_no_empty_panels(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from fastfeed.stats.plot import panels

    alone = stats_of(snapshot(steps=0, first_batches=0, step_s=0.0, step_wait_s=0.0))
    names = panels(alone)
    assert names == ["stages", "whatif"], names  # no steps measured: no empty step panel
    alone.plot(tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 1000
    stepped = stats_of(snapshot())
    stepped._step_log = [(time.perf_counter(), 0.05, 0.1)] * 10
    assert panels(stepped)[:2] == ["stages", "steps"]
    watched = stats_of(snapshot(stages={}), kind="opaque")
    assert "stages" not in panels(watched) and "whatif" not in panels(watched)
