"""Per-sample random generators, deterministic in (seed, epoch, index).

The loader's worker threads call :func:`set_sample_key` before transforming a sample;
fastfeed's random transforms call :func:`sample_rng` to get that sample's generator.
Results then depend only on (seed, epoch, index), never on thread count or timing.

The stream of a key is Philox4x64-10 (a counter-based generator, numpy's
``np.random.Philox``) with the 128-bit seed as its key and ``(0, 0, index, epoch)`` as the
start of its 256-bit counter: every (epoch, index) of a seed owns a disjoint block of one
keyed cipher stream, and Philox's rounds make neighbouring counters look independent.
Keying a thread's generator is a state assignment (~1.5 us), where building one from a
``SeedSequence`` costs ~10-20 us while holding the GIL. It happens lazily, so samples
whose transforms draw nothing pay nothing.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

__all__ = ["sample_rng", "set_sample_key"]

_MASK_64 = (1 << 64) - 1
_local = threading.local()


def set_sample_key(key: tuple[int, int, int] | None) -> None:
    """Declare the (seed, epoch, index) of the sample this thread works on (None clears).

    Integers of any sign work: the epoch and index are taken modulo 2**64, the seed
    modulo 2**128.
    """
    _local.key = key
    _local.keyed = False


def _thread_generator() -> tuple[np.random.Philox, np.random.Generator]:
    pair = getattr(_local, "pair", None)
    if pair is None:
        bits = np.random.Philox(key=0)
        pair = _local.pair = (bits, np.random.Generator(bits))
    return pair


def sample_rng() -> np.random.Generator:
    """The current sample's generator; a fresh unseeded one outside a loader.

    Inside a sample it is this thread's one generator, re-keyed at the first call after
    each :func:`set_sample_key`: draw from it while working on the sample, never keep it
    for a later one. Its stream equals ``np.random.Generator(np.random.Philox(
    key=[seed % 2**64, seed // 2**64 % 2**64], counter=[0, 0, index % 2**64, epoch % 2**64]))``.
    """
    key = getattr(_local, "key", None)
    if key is None:
        return np.random.default_rng()
    bits, gen = _thread_generator()
    if not _local.keyed:
        seed, epoch, index = key
        # Lists, not arrays: the state setter converts them faster than it copies arrays.
        state: dict[str, Any] = {
            "bit_generator": "Philox",
            "state": {
                "counter": [0, 0, index & _MASK_64, epoch & _MASK_64],
                "key": [seed & _MASK_64, (seed >> 64) & _MASK_64],
            },
            "buffer": [0, 0, 0, 0],
            "buffer_pos": 4,  # empty: the first draw computes the block at counter + 1
            "has_uint32": 0,
            "uinteger": 0,
        }
        bits.state = state  # type: ignore[assignment]  # lists: faster than arrays
        _local.keyed = True
    return gen
