"""The README's commands are the ones the tests run.

Every fenced ``bash`` block right after a ``<!-- tested -->`` comment is extracted; each
of its lines must be a command that tests/test_examples.py or tests/test_cli_demo_bench.py
runs verbatim (they run them rather than this file, so each runs once per suite).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import test_cli_demo_bench
import test_examples

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks_after(marker: str, text: str) -> list[list[str]]:
    """The lines of each fenced block that directly follows ``marker``."""
    blocks = []
    pattern = re.escape(marker) + r"\s*\n```(\w*)\n(.*?)\n```"
    for m in re.finditer(pattern, text, re.S):
        assert m.group(1) == "bash", f"block after {marker} is ```{m.group(1)}, not ```bash"
        blocks.append([ln.strip() for ln in m.group(2).splitlines() if ln.strip()])
    return blocks


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## ", text, flags=re.M)
    return {p.splitlines()[0].strip(): p for p in parts[1:]}


def test_every_tested_readme_command_is_run_by_a_test() -> None:
    text = README.read_text(encoding="utf-8")
    commands = [c for block in _blocks_after("<!-- tested -->", text) for c in block]
    tested = set(test_examples.COMMANDS) | set(test_cli_demo_bench.COMMANDS)
    assert commands, "no <!-- tested --> blocks in README.md"
    missing = [c for c in commands if c not in tested]
    assert not missing, f"README commands no test runs: {missing}"
    # ...and every example / CLI command the tests run is shown to users.
    shown = set(commands) | {"fastfeed demo"}  # the demo line of the Set-up section
    assert set(test_examples.COMMANDS) | set(test_cli_demo_bench.COMMANDS) <= shown


def test_each_way_in_has_a_tested_command() -> None:
    sections = _sections(README.read_text(encoding="utf-8"))
    ways = [name for name in sections if name.startswith("Way ")]
    assert [w.split(":")[0] for w in ways] == ["Way 1", "Way 2", "Way 3"]
    for name in ways:
        assert "<!-- tested -->" in sections[name], f"section '{name}' has no tested command"


def test_setup_markers_still_give_the_demo_and_test_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert _blocks_after("<!-- demo-command -->", text) == [["pip install -e . && fastfeed demo"]]
    assert _blocks_after("<!-- test-command -->", text) == [
        ['pip install -e ".[dev]" && python -m pytest -q']
    ]
    # .ci/run extracts the test command with awk; it must find the same line.
    awk = (
        "/<!-- test-command -->/{found=1; next} found && /^```/{if (inblock) exit; "
        "inblock=1; next} found && inblock {print; exit}"
    )
    out = subprocess.run(["awk", awk, str(README)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == 'pip install -e ".[dev]" && python -m pytest -q'


def test_pasted_bench_table_header_matches_the_command() -> None:
    from fastfeed.commands.bench import format_table

    header = format_table({"results": []}).splitlines()[0]
    assert header in README.read_text(encoding="utf-8").splitlines()
