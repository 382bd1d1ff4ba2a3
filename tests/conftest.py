"""Shared fixtures: the thread-leak guard and the ``cuda`` marker."""

from __future__ import annotations

import threading
import time

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _live_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.is_alive()}


@pytest.fixture(autouse=True)
def no_thread_leak(request: pytest.FixtureRequest):
    """Fail any test that leaves a thread running (after a 2 s grace for joins)."""
    before = _live_threads()
    yield
    if "allow_thread_leak" in request.keywords:
        return
    deadline = time.monotonic() + 2.0
    leaked = _live_threads() - before
    while leaked and time.monotonic() < deadline:
        time.sleep(0.02)
        leaked = _live_threads() - before
    if leaked:
        names = sorted(t.name for t in leaked)
        pytest.fail(f"test leaked {len(leaked)} thread(s): {names}", pytrace=False)
