"""Every CLI failure is one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest

from fastfeed.testing import make_image_folder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    img = make_image_folder(d / "imgs", 2, 3, ((32, 32), (32, 32)))
    jpg = img / "class_000" / "img_0000.jpg"
    (d / "latin1.txt").write_bytes(b"imgs/caf\xe9.jpg\n")
    env = lmdb.open(str(d / "single.lmdb"), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        for i in range(3):
            txn.put(b"k%d" % i, jpg.read_bytes())
    env.close()
    (d / "afile").write_text("x")
    (d / "existing").write_text("x")
    (d / "badnames" / "c").mkdir(parents=True)
    (d / "badnames" / "c" / os.fsdecode(b"\xff.jpg")).write_bytes(jpg.read_bytes())
    return d


def _run(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastfeed", *argv],
        capture_output=True,
        text=True,
        errors="backslashreplace",
        env={**os.environ, **env},
        timeout=300,
        cwd=REPO,
    )


_QUICK = ["--samples", "4", "--transform", "none", "--no-evict"]

# name -> (argv with {d} for the data folder, expected exit code, text of the one line)
CASES: dict[str, tuple[list[str], int, str]] = {
    "pack a single JPEG": (
        ["pack", "{d}/imgs/class_000/img_0000.jpg", "{d}/o.lmdb", "--quiet"],
        1,
        "img_0000.jpg is a binary file, not a file list",
    ),
    "inspect a single JPEG": (
        ["inspect", "{d}/imgs/class_000/img_0000.jpg"],
        1,
        "is a binary file, not a file list",
    ),
    "pack a non-UTF-8 file list naming a missing file": (
        ["pack", "{d}/latin1.txt", "{d}/o.lmdb", "--quiet"],
        1,
        "does not exist (deleted after indexing?)",
    ),
    "pack OUT whose parent is a file": (
        ["pack", "{d}/imgs", "{d}/afile/o.lmdb", "--quiet"],
        1,
        "cannot create the folder of",
    ),
    "pack SRC SRC --overwrite": (
        ["pack", "{d}/imgs", "{d}/imgs", "--overwrite", "--quiet"],
        1,
        "the input and the output are the same path",
    ),
    "pack OUT inside SRC": (
        ["pack", "{d}/imgs", "{d}/imgs/o.lmdb", "--quiet"],
        1,
        "is inside the input",
    ),
    "pack SRC inside OUT": (
        ["pack", "{d}/imgs/class_000", "{d}/imgs", "--overwrite", "--quiet"],
        1,
        "is inside the output",
    ),
    "profile --json into a missing folder": (
        ["profile", "{d}/imgs", *_QUICK, "--json", "{d}/nodir/p.json"],
        1,
        "--json {d}/nodir/p.json: the folder {d}/nodir does not exist",
    ),
    "profile --trace into a missing folder": (
        ["profile", "{d}/imgs", *_QUICK, "--trace", "{d}/nodir/t.json"],
        1,
        "--trace {d}/nodir/t.json: the folder {d}/nodir does not exist",
    ),
    "profile --plot into a missing folder": (
        ["profile", "{d}/imgs", *_QUICK, "--plot", "{d}/nodir/p.png"],
        1,
        "--plot {d}/nodir/p.png: the folder {d}/nodir does not exist",
    ),
    "profile --json onto a folder": (
        ["profile", "{d}/imgs", *_QUICK, "--json", "{d}/imgs"],
        1,
        "is a directory, expected a file name",
    ),
    "profile --script missing": (
        ["profile", "{d}/imgs", *_QUICK, "--script", "{d}/nope.py"],
        1,
        "--script {d}/nope.py: no such file",
    ),
    "bench --json into a missing folder": (
        ["bench", "{d}/imgs", "--vs", "none", "--quiet", "--json", "{d}/nodir/b.json"],
        1,
        "--json {d}/nodir/b.json: the folder {d}/nodir does not exist",
    ),
    "demo --out on an existing file": (
        ["demo", "--out", "{d}/existing", "--images", "4", "--classes", "2"],
        1,
        "--out {d}/existing: exists and is not a folder",
    ),
    "inspect a missing path": (["inspect", "{d}/missing"], 1, "input not found: {d}/missing"),
    "LMDB-looking file that is not one": (
        ["inspect", "{d}/existing.lmdb"],
        1,
        "not an LMDB",
    ),
    "bad option value": (["pack", "a", "b", "--workers", "x"], 2, "invalid int value: 'x'"),
    "missing argument": (["inspect"], 2, "the following arguments are required: path"),
    "unknown command": (["nosuch"], 2, "invalid choice: 'nosuch'"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cli_failure_is_one_line(name: str, data: Path) -> None:
    argv, code, text = CASES[name]
    if name == "LMDB-looking file that is not one":
        (data / "existing.lmdb").write_text("not an lmdb, just text\n")
    result = _run([a.replace("{d}", str(data)) for a in argv])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert result.returncode == code, result.stderr
    assert lines[0].startswith("fastfeed"), lines[0]
    assert "error:" in lines[0]
    assert text.replace("{d}", str(data)) in lines[0]
    if argv[0] == "pack" and code == 1:
        assert not (data / "o.lmdb").exists()
        assert sorted((data / "imgs").iterdir()) == [
            data / "imgs" / "class_000",
            data / "imgs" / "class_001",
        ]
        assert len(list((data / "imgs").rglob("*.jpg"))) == 6  # the input is untouched


def test_inspect_and_bench_open_a_single_file_lmdb(data: Path) -> None:
    result = _run(["inspect", str(data / "single.lmdb")])
    assert result.returncode == 0, result.stderr
    assert "(LMDBSource)" in result.stdout and "records:     3" in result.stdout
    result = _run(["bench", str(data / "single.lmdb"), "--vs", "none", "--quiet", "--samples", "3"])
    assert result.returncode == 0, result.stderr
    assert "(LMDBSource): 3 of 3 records" in result.stdout


def test_inspect_non_utf8_names_on_a_strict_ascii_stdout(data: Path) -> None:
    result = _run(["inspect", str(data / "badnames")], PYTHONIOENCODING="ascii:strict")
    assert result.returncode == 0, result.stderr
    assert "c/\\udcff.jpg" in result.stdout


def test_traceback_on_request_only(data: Path) -> None:
    argv = ["profile", str(data / "imgs"), *_QUICK, "--script", str(data / "boom.py")]
    (data / "boom.py").write_text("raise ValueError('boom in the user script')\n")
    plain = _run(argv)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines()[-1] == (
        "fastfeed profile: error: ValueError: boom in the user script"
    )
    assert len(plain.stderr.strip().splitlines()) == 1
    verbose = _run(argv, FASTFEED_TRACEBACK="1")
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr
