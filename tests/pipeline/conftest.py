"""Pipeline tests exercise the buffer ring with small batches: let every size use it."""

from __future__ import annotations

import pytest

from fastfeed.pipeline import collate


@pytest.fixture(autouse=True)
def ring_for_every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    # Unpinned buffers under RING_MIN_BYTES are plain allocations in production; the
    # ring's own behaviour is what these tests check (tests/pipeline/test_ring_size.py
    # checks the threshold itself).
    monkeypatch.setattr(collate, "RING_MIN_BYTES", 0)
