"""``fastfeed profile`` end to end on a tiny image folder, file list and LMDB."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastfeed.cli import main
from fastfeed.testing import make_image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(
        tmp_path_factory.mktemp("prof") / "imgs", 2, 12, size_range=((64, 96), (64, 96))
    )


def _args(path: Path | str, *more: str) -> list[str]:
    return ["profile", str(path), "--samples", "24", "--batch-size", "8", "--threads", "2", *more]


def test_profile_writes_trace_plot_json_and_prints_table(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace, plot, out = tmp_path / "t.json", tmp_path / "p.png", tmp_path / "s.json"
    rc = main(
        _args(
            folder,
            "--transform",
            "rrc224",
            "--step-ms",
            "2",
            "--trace",
            str(trace),
            "--plot",
            str(plot),
            "--json",
            str(out),
        )
    )
    assert rc == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0].split()[:4] == ["stage", "rate/s", "p50", "p99"]
    assert "verdict: " in captured.out
    assert "RAM cache what-if (samples/s): 0% -> " in captured.out
    for n in range(1, 6):
        assert f"phase {n}/5" in captured.err
    events = json.loads(trace.read_text())["traceEvents"]
    assert {"read", "transform", "collate"} <= {e["name"] for e in events if e["ph"] == "X"}
    assert any(e["ph"] == "M" and e["name"] == "thread_name" for e in events)
    assert any(e["ph"] == "C" and e["name"] == "queue batches" for e in events)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stats = json.loads(out.read_text())
    assert stats["extra"]["phases"]["samples"] == 24
    assert stats["extra"]["phases"]["batch_size"] == 8
    assert stats["extra"]["phases"]["step"] == "2 ms sleep"
    assert len(stats["whatif"]) == 11
    assert stats["stages"]["read"]["items"] == 24
    assert stats["verdict"]["bound"] in {
        "compute-bound",
        "partially-input-bound",
        "input-bound",
    }


def test_assert_not_sets_exit_code(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A 300 ms model step over a few tiny images: compute bound.
    rc = main(
        _args(folder, "--transform", "none", "--step-ms", "150", "--assert-not", "compute-bound")
    )
    err = capsys.readouterr().err
    assert rc == 3
    assert "assertion failed: verdict is compute-bound: compute-bound: only" in err
    rc = main(
        _args(folder, "--transform", "none", "--step-ms", "150", "--assert-not", "input-bound")
    )
    assert rc == 0


def test_no_step_profiles_the_loader_alone_from_a_file_list(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(str(p) for p in sorted(folder.rglob("*.jpg"))) + "\n")
    rc = main(_args(lst, "--transform", "decode", "--assert-not", "input-bound"))
    captured = capsys.readouterr()
    assert rc == 3  # a loop that does nothing but take batches always waits for them
    assert "verdict: loader alone (no training steps measured): " in captured.out
    assert "assertion failed: verdict is input-bound" in captured.err
    assert "phase 5/5 skipped" in captured.err


def test_script_contract_step_and_setup(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "calls.txt"
    script = tmp_path / "train.py"
    script.write_text(
        "import time\n"
        f"LOG = {str(log)!r}\n"
        "def setup():\n"
        "    open(LOG, 'a').write('setup\\n')\n"
        "def step(batch):\n"
        "    data, labels = batch\n"
        "    open(LOG, 'a').write(f'step {len(labels)}\\n')\n"
    )
    rc = main(_args(folder, "--transform", "rrc224", "--script", str(script)))
    assert rc == 0
    assert log.read_text().splitlines() == ["setup", "step 8", "step 8", "step 8"]
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    assert main(_args(folder, "--script", str(bad))) == 1
    assert "must define a function step(batch)" in capsys.readouterr().err


def test_bad_arguments_are_named(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_args(folder, "--assert-not", "slow")) == 1
    assert "--assert-not 'slow': choose from compute-bound" in capsys.readouterr().err
    assert main(_args(folder / "nope")) == 1
    assert "nope" in capsys.readouterr().err


def test_profile_an_lmdb(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "train.lmdb"
    assert main(["pack", str(folder), str(db)]) == 0
    capsys.readouterr()
    rc = main(_args(db, "--transform", "decode", "--step-ms", "1"))
    captured = capsys.readouterr()
    assert rc == 0
    assert "24 records" in captured.err or "records; profiling 24" in captured.err
    assert "verdict: " in captured.out


def test_profile_cold_reads_the_loader_phases_cold(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "s.json"
    rc = main(_args(folder, "--cold", "--step-ms", "1", "--json", str(out)))
    captured = capsys.readouterr()
    assert rc == 0
    assert "phase 4/5 full loader, 2 threads, no model step (page cache dropped first)" in (
        captured.err
    )
    assert "(1 ms sleep) (page cache dropped first)" in captured.err
    assert "phases 4-5 read cold (page cache dropped first)" in captured.out
    phases = json.loads(out.read_text())["extra"]["phases"]
    assert phases["loader_cold"] is True
    assert "read_cold_disk" in phases  # the disk's figures, None where not counted
