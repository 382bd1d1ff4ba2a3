"""The API reference builds from the docstrings with warnings as errors (docs/build_api.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_api_reference_builds_without_warnings(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "docs" / "build_api.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    page = (tmp_path / "fastfeed.html").read_text(encoding="utf-8")
    for name in ("Loader", "DataLoader", "FileSource", "LMDBSource", "MemoryCache", "PackReport"):
        assert f'id="{name}"' in page, name
    assert (tmp_path / "fastfeed" / "image.html").is_file()


def test_a_docstring_warning_fails_the_build(tmp_path: Path) -> None:
    code = (
        "import sys, warnings; sys.path.insert(0, sys.argv[1]); import build_api, pdoc\n"
        "real = pdoc.pdoc\n"
        "def noisy(*a, **k):\n"
        "    warnings.warn('cannot parse a docstring')\n"
        "    return real(*a, **k)\n"
        "pdoc.pdoc = noisy\n"
        "raise SystemExit(build_api.main(['--out', sys.argv[2]]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(REPO / "docs"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "UserWarning: cannot parse a docstring" in result.stderr
    assert "docs: 1 warning(s): the build fails" in result.stderr
