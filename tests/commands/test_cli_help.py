"""``fastfeed --help`` is light: the CLI and its command modules import no heavy library."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Load fastfeed.cli under a stand-in package (so fastfeed/__init__.py is not run) with the
# heavy libraries blocked: any import of them by cli.py or a command module fails.
_PROBE = """
import importlib.abc, io, sys, types, contextlib
HEAVY = ("torch", "numpy", "PIL", "lmdb", "tqdm", "matplotlib")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError(f"blocked import of {name}")
sys.meta_path.insert(0, Block())
pkg = types.ModuleType("fastfeed")
pkg.__path__ = [sys.argv[1]]
pkg.__version__ = "0.0.test"
sys.modules["fastfeed"] = pkg
from fastfeed.cli import main
from fastfeed.commands import NAMES
for argv in (["--help"], ["--version"], *([n, "--help"] for n in NAMES if n != "profile")):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(argv)
        except SystemExit as exc:
            assert exc.code == 0, (argv, exc.code)
    print("OK", " ".join(argv), len(out.getvalue()))
"""


def test_help_imports_no_heavy_library() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, str(REPO / "fastfeed")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    oks = [line for line in result.stdout.splitlines() if line.startswith("OK")]
    assert [line.split()[1] for line in oks] == [
        "--help",
        "--version",
        "demo",
        "pack",
        "inspect",
        "bench",
    ]


def test_help_lists_each_command_with_its_help_once() -> None:
    import fastfeed.cli
    from fastfeed.commands import NAMES

    text = subprocess.run(
        [sys.executable, "-m", "fastfeed", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    ).stdout
    for name in NAMES:
        module = __import__(f"fastfeed.commands.{name}", fromlist=["HELP"])
        assert module.HELP in " ".join(text.split()), name
    assert not hasattr(fastfeed.cli, "COMMANDS")  # the help text lives only in the modules


_HELP_PROBE = """
import sys
from fastfeed.cli import main
try:
    main(["--help"])
except SystemExit:
    pass
print("torch" in sys.modules)
"""


def _last_line(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr


def test_python_m_fastfeed_help_does_not_import_torch() -> None:
    if _last_line("import sys, fastfeed; print('torch' in sys.modules)") != "False":
        pytest.skip("`import fastfeed` itself imports torch (the lazy package face is not in)")
    assert _last_line(_HELP_PROBE) == "False"
