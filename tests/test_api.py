"""The curated public API: sorted ``__all__``, every name importable, one error tree."""

from __future__ import annotations

import inspect
import subprocess
import sys

import fastfeed
import fastfeed.errors


def test_all_is_sorted_and_complete() -> None:
    assert fastfeed.__all__ == sorted(fastfeed.__all__)
    assert len(set(fastfeed.__all__)) == len(fastfeed.__all__)
    for name in fastfeed.__all__:
        assert hasattr(fastfeed, name), name


def test_every_public_error_is_exported_and_derives_from_fastfeed_error() -> None:
    errors = {
        name
        for name, obj in vars(fastfeed.errors).items()
        if inspect.isclass(obj) and issubclass(obj, BaseException) and not name.startswith("_")
    }
    assert errors == set(fastfeed.errors.__all__)
    for name in errors:
        assert issubclass(getattr(fastfeed.errors, name), fastfeed.FastFeedError), name
        assert name in fastfeed.__all__, name


def test_version_matches_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fastfeed", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"fastfeed {fastfeed.__version__}"
