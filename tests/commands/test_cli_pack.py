"""``fastfeed pack`` and ``fastfeed inspect`` through the CLI entry point and a subprocess."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fastfeed.cli import main
from fastfeed.sources import FileSource, LMDBSource
from fastfeed.testing import make_image_folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "imgs", 3, 4, ((64, 64), (48, 48)))


def test_cli_pack_then_inspect(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "train.lmdb"
    assert main(["pack", str(folder), str(out), "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert f"packed 12 records, 3 classes into {out}" in err
    assert "0 re-encoded, 0 skipped" in err
    with LMDBSource(out) as src, FileSource.from_folder(folder) as files:
        assert src.read_many(list(range(12))) == files.read_many(list(range(12)))
    sizes = sorted(p.stat().st_size for p in folder.rglob("*.jpg"))

    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"{out} (LMDBSource)" in text
    assert "records:     12" in text
    assert "classes:     3 (class_000, class_001, class_002)" in text
    assert "data.mdb" in text
    assert "[0]  key 0000000000  class_000/img_0000.jpg" in text
    assert "label 1 (class_001)" in text

    assert main(["inspect", str(out), "--json", "--samples", "2"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["records"] == 12
    assert info["record_bytes"]["min"] == sizes[0]
    assert info["record_bytes"]["max"] == sizes[-1]
    assert info["record_bytes"]["median"] == (sizes[5] + sizes[6]) / 2
    assert info["total_bytes"] == sum(sizes)
    assert [s["key"] for s in info["samples"]] == ["0000000000", "0000000001"]
    assert info["meta"]["count"] == 12


def test_cli_inspect_folder_and_errors(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["inspect", str(folder), "--samples", "1"]) == 0
    text = capsys.readouterr().out
    assert f"{folder} (FileSource)" in text
    assert "records:     12" in text
    assert "[0]  class_000/img_0000.jpg" in text
    assert "[1]" not in text
    missing = tmp_path / "missing.lmdb"
    assert main(["inspect", str(missing)]) == 1
    assert f"fastfeed inspect: error: input not found: {missing}" in capsys.readouterr().err


def test_cli_pack_refuses_existing_and_overwrites(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "o.lmdb"
    assert main(["pack", str(folder), str(out), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["pack", str(folder), str(out), "--quiet"]) == 1
    assert f"fastfeed pack: error: {out} already exists" in capsys.readouterr().err
    assert main(["pack", str(folder), str(out), "--quiet", "--overwrite", "--max-side", "32"]) == 0
    with LMDBSource(out) as src:
        assert Image.open(io.BytesIO(src.read(0).data)).size == (32, 24)


def test_cli_pack_skip_bad(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = folder / "class_000" / "img_0002.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    out = tmp_path / "o.lmdb"
    assert main(["pack", str(folder), str(out), "--max-side", "32"]) == 1
    assert f"({bad}) failed" in capsys.readouterr().err
    assert not out.exists()
    assert main(["pack", str(folder), str(out), "--max-side", "32", "--skip-bad"]) == 0
    err = capsys.readouterr().err
    assert "packed 11 records" in err
    assert f"skipped 2 ({bad})" in err


def test_python_m_fastfeed_pack(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub.lmdb"
    proc = subprocess.run(
        [sys.executable, "-m", "fastfeed", "pack", str(folder), str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    with LMDBSource(out) as src:
        assert len(src) == 12
        assert src.read(11).data == (folder / "class_002" / "img_0011.jpg").read_bytes()
    again = subprocess.run(
        [sys.executable, "-m", "fastfeed", "pack", str(folder), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 1
    assert f"{out} already exists" in again.stderr


def test_cli_pack_skip_bad_checks_images_without_max_side(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = folder / "class_001" / "img_0005.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated: only a decode finds it
    out = tmp_path / "o.lmdb"
    assert main(["pack", str(folder), str(out), "--quiet"]) == 0  # copied as is
    assert main(["pack", str(folder), str(tmp_path / "v.lmdb"), "--verify", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"record 5 ({bad}) failed" in err[0]
    assert main(["pack", str(folder), str(tmp_path / "s.lmdb"), "--skip-bad"]) == 0
    err = capsys.readouterr().err
    assert "packed 11 records" in err and f"skipped 5 ({bad})" in err
    assert not (tmp_path / "v.lmdb").exists()
