"""The sdist: SPDX license metadata, no build warnings, and the files its own tests need."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _copy_sources(dest: Path) -> None:
    """Copy the project without caches or a dev install's egg-info (git's view if any)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
    )
    if listed.returncode != 0:  # an unpacked sdist: no git
        junk = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache", "build")
        shutil.copytree(REPO, dest, ignore=junk)
        return
    for name in filter(None, listed.stdout.decode().split("\0")):
        path = REPO / name
        if path.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / name)


def test_sdist_builds_without_warnings_and_carries_its_tests(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _copy_sources(src)
    result = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path)],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    log = (result.stdout + result.stderr).lower()
    assert "warning" not in log, [line for line in log.splitlines() if "warning" in line]
    (sdist,) = tmp_path.glob("fastfeed-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        pkg_info = tar.extractfile(
            next(m for m in tar.getmembers() if m.name.endswith("/PKG-INFO"))
        )
        assert pkg_info is not None
        meta = pkg_info.read().decode()
    assert "License-Expression: Apache-2.0" in meta and "License-File: LICENSE" in meta
    for needed in (
        "LICENSE",
        "CHANGELOG.md",
        "README.md",
        "tests/conftest.py",
        "tests/test_examples.py",
        "examples/train_classifier.py",
        "benchmarks/_common.py",
        "docs/build_api.py",
        "fastfeed/py.typed",
    ):
        assert needed in names, needed
    assert not [n for n in names if n.endswith((".pyc", ".pyo")) or "__pycache__" in n]
