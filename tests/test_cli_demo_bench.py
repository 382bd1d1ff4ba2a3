"""``fastfeed demo`` and ``fastfeed bench`` run and print their tables.

The command strings are the README's (see tests/test_readme.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_examples import run_command

from fastfeed.cli import main
from fastfeed.errors import ConfigError, SourceNotFoundError

CMD_DEMO = "fastfeed demo"
CMD_DEMO_OUT = "fastfeed demo --out demo-data --epochs 1"
CMD_BENCH = "fastfeed bench demo-data/images.lmdb --samples 256 --size 64 --json bench.json"
COMMANDS = [CMD_DEMO, CMD_DEMO_OUT, CMD_BENCH]


def _table_rows(out: str, first_col: tuple[str, ...]) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] in first_col:
            rows[parts[0]] = parts
    return rows


def test_demo_prints_every_stage_and_the_profile() -> None:
    out = run_command(CMD_DEMO)
    assert re.match(r"fastfeed demo in /\S+fastfeed-demo-", out)
    rows = _table_rows(out, ("generate", "files", "pack", "lmdb", "cache", "ram"))
    assert list(rows) == ["generate", "files", "pack", "lmdb", "cache", "ram"], out
    records = {name: row[-4] for name, row in rows.items()}  # records, MB, seconds, MB/s
    assert set(records.values()) == {"320"}, out
    mb = {name: row[-3] for name, row in rows.items()}
    assert len(set(mb.values())) == 1, mb  # every step moved the same bytes
    assert re.findall(r"train epoch (\d)/3: (\d+) samples", out) == [
        ("1", "320"),
        ("2", "320"),
        ("3", "320"),
    ]
    assert "batches: (32, 3, 64, 64) uint8 (N, C, H, W)" in out
    stages = _table_rows(out, ("read", "transform", "collate", "consumer"))
    assert list(stages) == ["read", "transform", "collate", "consumer"], out
    assert re.search(r"^verdict: (compute-bound|partially-input-bound|input-bound): ", out, re.M)
    assert "RAM cache: 100% hits (960 hits, 0 misses" in out
    # The temporary directory is gone afterwards.
    tmp = re.match(r"fastfeed demo in (\S+)", out).group(1)
    assert not Path(tmp).exists()


def test_demo_out_keeps_data_then_bench_compares_loaders(tmp_path: Path) -> None:
    out = run_command(CMD_DEMO_OUT, cwd=tmp_path)
    assert f"data kept in {tmp_path / 'demo-data'}" in out
    assert (tmp_path / "demo-data" / "images.lmdb" / "data.mdb").is_file()
    assert len(list((tmp_path / "demo-data" / "images").rglob("*.jpg"))) == 320

    out = run_command(CMD_BENCH, cwd=tmp_path)
    assert "(LMDBSource): 256 of 320 records" in out
    head = out.splitlines()[1].split()
    assert head == [
        "loader",
        "samples",
        "samples/s",
        "MB/s",
        "ratio",
        "peak",
        "RSS",
        "1st",
        "batch",
    ]
    rows = _table_rows(out, ("fastfeed", "torch"))
    assert list(rows) == ["fastfeed", "torch"]
    assert rows["fastfeed"][1] == rows["torch"][1] == "256"
    assert rows["torch"][4] == "1.00x"
    assert rows["fastfeed"][5:7] == [rows["fastfeed"][5], "MiB"]
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert [r["loader"] for r in doc["results"]] == ["fastfeed", "torch"]
    assert [r["samples"] for r in doc["results"]] == [256, 256]
    assert doc["results"][1]["ratio"] == 1.0
    fast = doc["results"][0]
    assert fast["ratio"] == pytest.approx(
        fast["samples_per_s"] / doc["results"][1]["samples_per_s"]
    )
    assert set(doc["environment"]) >= {"python", "torch", "cpu_count"}
    assert doc["record_bytes"] > 0 and doc["threads"] >= 1


def test_bench_vs_none_runs_fastfeed_only(tmp_path: Path, capsys) -> None:
    from fastfeed.synthetic import make_image_folder

    make_image_folder(tmp_path / "imgs", 2, 5, size=(40, 30))
    code = main(["bench", str(tmp_path / "imgs"), "--vs", "none", "--samples", "6",
                 "--batch-size", "4", "--threads", "1", "--size", "16", "--quiet"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "(FileSource): 6 of 10 records" in out
    rows = _table_rows(out, ("fastfeed", "torch"))
    assert list(rows) == ["fastfeed"] and rows["fastfeed"][1] == "6"
    assert rows["fastfeed"][4] == "-"  # no baseline, no ratio


def test_bench_missing_path_is_a_clean_error(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope"
    assert main(["bench", str(missing), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastfeed bench: error: ") and str(missing) in err
    from fastfeed.commands.bench import bench

    with pytest.raises(SourceNotFoundError):
        bench(str(missing))
    with pytest.raises(ConfigError, match=r"--samples must be >= 1, got 0"):
        bench(str(missing), samples=0)


def test_demo_rejects_fewer_images_than_classes(capsys) -> None:
    assert main(["demo", "--images", "2", "--classes", "4"]) == 1
    assert "need --images >= --classes >= 1, got 2, 4" in capsys.readouterr().err


def test_bench_cold_drops_the_records_before_each_loader(tmp_path: Path, capsys) -> None:
    from fastfeed.synthetic import make_image_folder

    make_image_folder(tmp_path / "imgs", 2, 5, size=(40, 30))
    out_json = tmp_path / "b.json"
    code = main(["bench", str(tmp_path / "imgs"), "--samples", "6", "--batch-size", "4",
                 "--threads", "1", "--size", "16", "--quiet", "--cold",
                 "--json", str(out_json)])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "(page cache dropped before each loader)" in out
    assert "disk reads/s" in out.splitlines()[1]
    doc = json.loads(out_json.read_text())
    assert doc["cold"] is True
    assert [r["loader"] for r in doc["results"]] == ["fastfeed", "torch"]
    for r in doc["results"]:
        assert r["samples"] == 6
        assert 0.0 <= r["cached"] <= 1.0  # what stayed in the page cache after dropping
        assert "disk" in r  # None where no disk read was counted (e.g. overlay, tmpfs)
