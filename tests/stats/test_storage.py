"""IOPS-bound and bandwidth-bound storage: the disk counters, their reading, the advice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from snapshots import snapshot, stats_of

from fastfeed import _diskstats
from fastfeed.stats import Bottleneck
from fastfeed.stats.storage import BLOCK_READ_BYTES, storage_summary

MiB = 1 << 20


def delta(**over: Any) -> dict[str, Any]:
    """400 reads/s of 78 KB for 10 s under a 400 IO/s, 100 MiB/s quota (the issue's disk)."""
    d: dict[str, Any] = {
        "device": "254:0",
        "name": "vda",
        "seconds": 10.0,
        "reads": 4000,
        "read_bytes": 312_000_000,
        "reads_per_s": 400.0,
        "mb_per_s": 31.2,
        "bytes_per_read": 78_000.0,
        "busy": 0.03,
        "limit_reads_per_s": 400.0,
        "limit_mb_per_s": 104.8576,
    }
    d.update(over)
    return d


def test_at_the_operation_quota_with_bandwidth_to_spare_is_iops_bound() -> None:
    s = storage_summary(delta())
    assert s is not None
    assert (s.iops_bound, s.bandwidth_bound) == (True, False)
    assert s.reason == "400 reads/s is 100% of the quota of 400 reads/s, 31.2 of 105 MB/s"
    assert s.block_mb_per_s == pytest.approx(104.8576)  # min(400 x 1 MiB, the byte quota)
    assert s.line() == (
        "disk vda: 400 reads/s of 78 KB (31.2 MB/s), quota 400 reads/s and 105 MB/s: IOPS-bound"
    )


def test_reading_at_the_byte_quota_is_bandwidth_bound() -> None:
    s = storage_summary(delta(reads_per_s=150.0, mb_per_s=90.0, bytes_per_read=600_000.0))
    assert s is not None
    assert (s.iops_bound, s.bandwidth_bound) == (False, True)
    assert s.reason == "90.0 MB/s is 86% of the quota of 105 MB/s"


def test_without_a_quota_a_busy_disk_decides_by_read_size() -> None:
    free = {"limit_reads_per_s": None, "limit_mb_per_s": None}
    hdd = storage_summary(delta(busy=0.97, reads_per_s=140.0, **free))
    assert hdd is not None and hdd.iops_bound and not hdd.bandwidth_bound
    assert hdd.block_mb_per_s is None  # bandwidth unknown: no rate is predicted
    assert hdd.reason == "the disk was busy 97% of the time with reads of 78 KB"
    streaming = storage_summary(delta(busy=0.95, bytes_per_read=1_000_000.0, **free))
    assert streaming is not None and streaming.bandwidth_bound and not streaming.iops_bound
    idle_ssd = storage_summary(delta(busy=0.40, reads_per_s=5800.0, **free))
    assert idle_ssd is not None and not idle_ssd.iops_bound and not idle_ssd.bandwidth_bound


def test_too_few_reads_or_no_counters_say_nothing() -> None:
    assert storage_summary(None) is None
    assert storage_summary(delta(reads=19)) is None


def _io_bound(**storage: Any) -> dict[str, Any]:
    snap = snapshot(storage=delta(**storage))
    snap["stages"]["read"].update(busy_s=39.39, cpu_s=1.0)  # 390 ms of IO wait per batch
    snap["stages"]["transform"].update(busy_s=1.01, cpu_s=1.0)
    return snap


def test_iops_bound_files_get_pack_and_block_order_with_a_prediction() -> None:
    stats = stats_of(_io_bound(), storage="FileSource")
    v = stats.verdict
    assert v.bottleneck is Bottleneck.IO
    assert "the disk is IOPS-bound (400 reads/s is 100% of the quota" in v.sentence
    assert "more threads will not help" in v.sentence
    assert len(v.actions) == 1
    a = v.actions[0]
    assert a.text.startswith("pack the files into one LMDB (fastfeed pack SRC out.lmdb)")
    assert 'shuffle="block"' in a.text
    # 31.2 MB/s x 10 s over 101 batches = 3.09 MB per batch; at 104.9 MB/s that is
    # 29.5 ms, under the 50 ms model step: the step caps the gain at 100 / 50 ms.
    assert a.speedup == pytest.approx(2.0)
    assert "predicted 2.0x" in a.expected and "1 MiB per operation" in a.expected
    assert stats.storage is not None and stats.storage.iops_bound
    assert stats.to_dict()["storage"]["reads_per_s"] == 400.0


def test_iops_bound_prediction_is_capped_by_the_byte_quota() -> None:
    snap = _io_bound()
    snap.update(step_s=1.0, step_wait_s=0.99, wait_s=0.99)  # a 0.1 ms model step
    stats = stats_of(snap, storage="FileSource")
    a = stats.verdict.actions[0]
    per_batch = 31.2e6 * 10.0 / 101  # storage bytes per batch
    new = per_batch / (104.8576e6)  # seconds per batch at the byte quota
    now = 0.4 / 4  # 400 ms of worker time per batch on 4 threads
    assert a.speedup == pytest.approx(now / new, rel=1e-3)


def test_iops_bound_pack_gets_block_order_and_block_order_gets_no_repeat() -> None:
    random_order = stats_of(_io_bound(), storage="LMDBSource", is_pack=True, packed_max_side=400)
    assert random_order.verdict.actions[0].text == (
        'read it in runs with Loader(source, shuffle="block")'
    )
    snap = _io_bound()
    from fastfeed.stats.analyze import analyze
    from fastfeed.stats.probe import SourceFacts

    block = analyze(
        snap,
        batch_size=10,
        num_threads=4,
        facts=SourceFacts(kind="source", storage="LMDBSource", is_pack=True),
        execution={"mode": "threads", "order": "block"},
    )
    assert block.verdict.actions[0].text.startswith("the loader already reads runs")


def test_bandwidth_bound_disk_gets_no_more_threads() -> None:
    snap = _io_bound(reads_per_s=150.0, mb_per_s=95.0, bytes_per_read=630_000.0)
    stats = stats_of(snap, storage="FileSource")
    v = stats.verdict
    assert v.bottleneck is Bottleneck.IO
    assert "the disk reads at its bandwidth (95.0 MB/s is 91% of the quota" in v.sentence
    assert not any(a.text.startswith("raise num_threads") for a in v.actions), v.actions


def test_unknown_storage_keeps_the_thread_advice() -> None:
    snap = snapshot()
    snap["stages"]["read"].update(busy_s=39.39, cpu_s=1.0)
    stats = stats_of(snap, storage="FileSource")
    assert stats.storage is None
    assert stats.verdict.actions[0].text.startswith("raise num_threads from 4 to 8")


# -- the counters -----------------------------------------------------------------------


def _fake_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cgroup: str) -> Path:
    (tmp_path / "block" / "sda").mkdir(parents=True)
    (tmp_path / "block" / "vdb").mkdir(parents=True)
    (tmp_path / "block" / "loop0").mkdir(parents=True)
    monkeypatch.setattr(_diskstats, "_SYS_BLOCK", str(tmp_path / "block"))
    monkeypatch.setattr(_diskstats, "_DISKSTATS", str(tmp_path / "diskstats"))
    monkeypatch.setattr(_diskstats, "_CGROUP_ROOT", str(tmp_path / "cg"))
    (tmp_path / "cgroup").write_text(cgroup)
    monkeypatch.setattr(_diskstats, "_PROC_CGROUP", str(tmp_path / "cgroup"))
    return tmp_path


def _diskstats_text(sda: tuple[int, int, int], vdb: tuple[int, int, int]) -> str:
    """(reads, sectors, io_ticks ms) of sda, sda1 (a partition) and vdb."""
    line = "{maj} {mi} {name} {r} 0 {sec} 7 0 0 0 0 0 {ticks} 0 0 0 0 0 0 0\n"
    return (
        line.format(maj=8, mi=0, name="sda", r=sda[0], sec=sda[1], ticks=sda[2])
        + line.format(maj=8, mi=1, name="sda1", r=sda[0], sec=sda[1], ticks=sda[2])
        + line.format(maj=252, mi=16, name="vdb", r=vdb[0], sec=vdb[1], ticks=vdb[2])
        + line.format(maj=7, mi=0, name="loop0", r=9999, sec=99999999, ticks=0)
    )


def test_delta_takes_the_busiest_whole_disk_and_the_v1_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _fake_system(tmp_path, monkeypatch, "7:blkio:/job/step\n4:memory:/x\n")
    (root / "diskstats").write_text(_diskstats_text((100, 800, 10), (10, 80, 0)))
    start = _diskstats.disk_snapshot()
    (root / "diskstats").write_text(_diskstats_text((900, 800 + 160_000, 1010), (20, 160, 5)))
    end = _diskstats.disk_snapshot()
    assert start is not None and end is not None
    assert set(end.devices) == {"8:0", "252:16"}  # no partition, no loop device
    v1 = root / "cg" / "blkio"
    (v1 / "job" / "step").mkdir(parents=True)
    (v1 / "job" / "blkio.throttle.read_iops_device").write_text("8:0 400\n")
    (v1 / "job" / "step" / "blkio.throttle.read_iops_device").write_text("8:0 500\n")
    (v1 / "job" / "step" / "blkio.throttle.read_bps_device").write_text("8:0 104857600\n")
    object.__setattr__(end, "time_s", start.time_s + 2.0)
    d = _diskstats.storage_delta(start, end)
    assert d is not None
    assert (d["device"], d["name"], d["reads"], d["read_bytes"]) == ("8:0", "sda", 800, 81_920_000)
    assert d["reads_per_s"] == pytest.approx(400.0)
    assert d["mb_per_s"] == pytest.approx(40.96)
    assert d["bytes_per_read"] == pytest.approx(102_400.0)
    assert d["busy"] == pytest.approx(0.5)
    assert d["limit_reads_per_s"] == 400.0  # the tighter of the two cgroups
    assert d["limit_mb_per_s"] == pytest.approx(104.8576)


def test_v2_io_max_and_no_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _fake_system(tmp_path, monkeypatch, "0::/user.slice/job\n")
    (root / "cg" / "user.slice" / "job").mkdir(parents=True)
    (root / "cg" / "user.slice" / "job" / "io.max").write_text(
        "8:0 rbps=max wbps=max riops=150 wiops=max\n252:16 rbps=5000000 riops=max\n"
    )
    assert _diskstats.io_limits("8:0") == (150.0, None)
    assert _diskstats.io_limits("252:16") == (None, 5_000_000.0)
    assert _diskstats.io_limits("9:9") == (None, None)
    (root / "diskstats").write_text(_diskstats_text((1, 8, 0), (1, 8, 0)))
    s = _diskstats.disk_snapshot()
    assert _diskstats.storage_delta(s, s) is None  # nothing read
    assert _diskstats.storage_delta(None, s) is None


def test_block_read_bytes_is_the_run_piece() -> None:
    from fastfeed.sources._lmdb_cold import RUN_PIECE_BYTES

    assert BLOCK_READ_BYTES == RUN_PIECE_BYTES == MiB


def test_cache_whatif_on_a_bound_disk_does_not_scale_with_threads() -> None:
    from fastfeed.stats import cache_whatif

    args = {
        "read_storage_s": 0.16,  # one batch of 64 at 400 reads/s
        "read_memory_s": 0.01,
        "other_s": 0.0,
        "threads": 4,
        "batch_size": 64,
        "fractions": (0.0, 0.5, 1.0),
    }
    free = cache_whatif(**args)
    bound = cache_whatif(**args, disk_s=0.16)
    assert free[0][1] == pytest.approx(64 / 0.04)  # 4 threads hide the latency
    assert bound[0][1] == pytest.approx(64 / 0.16)  # the disk's rate, whatever the threads
    assert bound[1][1] == pytest.approx(64 / 0.08)  # half the reads leave the disk
    assert bound[2][1] == free[2][1] == pytest.approx(64 / 0.0025)


def test_own_cgroup_counts_are_preferred_to_the_machine_wide_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _fake_system(tmp_path, monkeypatch, "7:blkio:/slow\n0::/\n")
    cg = root / "cg" / "blkio" / "slow"
    cg.mkdir(parents=True)

    def counters(reads: int, nbytes: int) -> None:
        (cg / "blkio.throttle.io_serviced").write_text(
            f"8:0 Read {reads}\n8:0 Write 5\n252:16 Read 1\nTotal {reads + 6}\n"
        )
        (cg / "blkio.throttle.io_service_bytes").write_text(f"8:0 Read {nbytes}\n8:0 Write 9\n")

    (root / "diskstats").write_text(_diskstats_text((100, 800, 10), (10, 80, 0)))
    counters(10, 40_960)
    start = _diskstats.disk_snapshot()
    # The machine read 2,000 times; this cgroup 400 times, 100 KB each.
    (root / "diskstats").write_text(_diskstats_text((2100, 800 + 400_000, 1010), (10, 80, 0)))
    counters(410, 40_960 + 40_960_000)
    end = _diskstats.disk_snapshot()
    assert start is not None and end is not None
    assert end.cgroup == {"8:0": (410, 41_000_960), "252:16": (1, 0)}
    d = _diskstats.storage_delta(start, end)
    assert d is not None
    assert (d["scope"], d["reads"], d["read_bytes"]) == ("cgroup", 400, 40_960_000)


def test_the_root_cgroup_is_machine_wide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _fake_system(tmp_path, monkeypatch, "7:blkio:/\n0::/\n")
    (root / "cg" / "blkio").mkdir(parents=True)
    (root / "cg" / "blkio" / "blkio.throttle.io_serviced").write_text("8:0 Read 5\n")
    (root / "diskstats").write_text(_diskstats_text((100, 800, 10), (10, 80, 0)))
    snap = _diskstats.disk_snapshot()
    assert snap is not None and snap.cgroup == {}
