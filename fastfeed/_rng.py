"""Per-sample random generators, deterministic in (seed, epoch, index).

The loader's worker threads call :func:`set_sample_key` before transforming a sample;
fastfeed's random transforms call :func:`sample_rng` to get that sample's generator.
Results then depend only on (seed, epoch, index), never on thread count or timing.
The generator is built lazily, so samples whose transforms draw nothing pay nothing.
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["sample_rng", "set_sample_key"]

_local = threading.local()


def set_sample_key(key: tuple[int, int, int] | None) -> None:
    """Declare the (seed, epoch, index) of the sample this thread works on (None clears)."""
    _local.key = key
    _local.gen = None


def sample_rng() -> np.random.Generator:
    """The current sample's generator; a fresh unseeded one outside a loader."""
    gen = getattr(_local, "gen", None)
    if gen is not None:
        return gen
    key = getattr(_local, "key", None)
    if key is None:
        return np.random.default_rng()
    gen = np.random.default_rng(np.random.SeedSequence([k & 0xFFFFFFFFFFFFFFFF for k in key]))
    _local.gen = gen
    return gen
