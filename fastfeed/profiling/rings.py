"""The recorder's bounded memory: percentile reservoirs and preallocated event rings."""

from __future__ import annotations

import random
from array import array
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np

__all__ = ["TraceEvent"]

_RESERVOIR = 2048
_FIRST_SLOTS = 512  # ring slots allocated first; doubled as they fill


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def _wrap(n: int, cap: int, m: int) -> tuple[int, list[tuple[int, int, int]]]:
    """Where ``m`` new entries go in a ring of ``cap`` slots that has had ``n`` written.

    Returns:
        ``(skipped, segments)``: the first ``skipped`` entries are overwritten by later
        ones of the same run (only the last ``cap`` can stay), and each segment
        ``(slot, a, b)`` copies entries ``[a, b)`` to slots from ``slot``.
    """
    lo = max(0, m - cap)
    slot = (n + lo) % cap
    split = lo + min(m - lo, cap - slot)
    return lo, [(slot, lo, split)] + ([(0, split, m)] if split < m else [])


def _claim(ring: _EventRing | _CounterRing, m: int) -> list[tuple[int, int, int]]:
    """The :func:`_wrap` segments of a run of ``m`` entries for a growing ring: allocates
    the slots they need and counts the run as written (the caller copies it there)."""
    cap = ring.capacity
    if cap == 0 or m == 0:
        return []
    _, segments = _wrap(ring._n, cap, m)
    while ring._size < min(cap, ring._n + m):
        ring._grow()
    ring._n += m
    return segments


class _Reservoir:
    """Uniform sample of at most ``_RESERVOIR`` values (Vitter's algorithm R)."""

    __slots__ = ("_np_rng", "_rng", "seen", "values")

    def __init__(self) -> None:
        self.values: list[float] = []
        self.seen = 0
        self._rng = random.Random(0)
        self._np_rng: np.random.Generator | None = None

    def add(self, value: float) -> None:
        self.seen += 1
        if len(self.values) < _RESERVOIR:
            self.values.append(value)
        else:
            j = int(self._rng.random() * self.seen)  # cheaper than randrange
            if j < _RESERVOIR:
                self.values[j] = value

    def add_many(self, values: np.ndarray) -> None:
        """Offer every value of ``values`` in order, as :meth:`add` one by one would.

        Vectorized (a per-thread book hands over 256 spans at a time): one random draw
        per value once the reservoir is full, a Python step only for the values kept.
        """
        free = _RESERVOIR - len(self.values)
        if free > 0:
            head = values[:free].tolist()
            self.values.extend(head)
            self.seen += len(head)
            values = values[free:]
        m = len(values)
        if m == 0:
            return
        if self._np_rng is None:
            self._np_rng = np.random.default_rng(self.seen)
        # Algorithm R for items seen+1 .. seen+m: item k replaces slot floor(u * k) if < R.
        ks = np.arange(self.seen + 1, self.seen + m + 1, dtype=np.float64)
        slots = (self._np_rng.random(m) * ks).astype(np.int64)
        kept = np.flatnonzero(slots < _RESERVOIR)
        vals = self.values
        for k, slot in zip(kept.tolist(), slots[kept].tolist(), strict=True):
            vals[slot] = float(values[k])
        self.seen += m

    def percentiles(self) -> dict[str, float]:
        v = sorted(self.values)
        return {"p50": _percentile(v, 50), "p90": _percentile(v, 90), "p99": _percentile(v, 99)}


class TraceEvent(tuple):
    """``(name, thread_name, start_s, end_s, args)``: one slice of the timeline."""

    __slots__ = ()


_NO_ARGS: Mapping[str, Any] = MappingProxyType({})  # shared by every event without args
_NO_ITEMS = -1  # an event without args (consumer waits)


class _EventRing:
    """The latest ``capacity`` timeline events in preallocated parallel arrays.

    About 49 bytes per event (two name references, two doubles, items, bytes, a flag),
    no object created per event. The arrays start at :data:`_FIRST_SLOTS` events and
    double as they fill, up to ``capacity``, then stay flat: a short run does not pay
    for the full ring (allocating 20,000 slots at once costs ~1.5 ms, 2% of a 65 ms
    epoch of 3 KB records).
    Names are references to the callers' (shared) strings. Not thread-safe: the
    :class:`Recorder` holds its lock around every call.
    """

    __slots__ = (
        "_bytes",
        "_end",
        "_failed",
        "_items",
        "_n",
        "_size",
        "_stage",
        "_start",
        "_thread",
        "capacity",
    )

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, int(capacity))
        self._n = 0  # events ever appended
        self._size = 0  # slots allocated
        self._stage: list[str | None] = []
        self._thread: list[str | None] = []
        self._start = array("d")
        self._end = array("d")
        self._items = array("q")
        self._bytes = array("q")
        self._failed = array("B")

    def _grow(self) -> None:
        more = min(self.capacity, max(_FIRST_SLOTS, 2 * self._size)) - self._size
        self._stage.extend([None] * more)
        self._thread.extend([None] * more)
        self._start.frombytes(bytes(8 * more))
        self._end.frombytes(bytes(8 * more))
        self._items.frombytes(bytes(8 * more))
        self._bytes.frombytes(bytes(8 * more))
        self._failed.frombytes(bytes(more))
        self._size += more

    def append(
        self,
        stage: str,
        thread: str,
        start_s: float,
        end_s: float,
        items: int,
        nbytes: int,
        failed: bool,
    ) -> None:
        """Keep one event (``items == -1``: no args), overwriting the oldest when full."""
        cap = self.capacity
        if cap == 0:
            return
        i = self._n % cap
        if i >= self._size:
            self._grow()
        self._n += 1
        self._stage[i] = stage
        self._thread[i] = thread
        self._start[i] = start_s
        self._end[i] = end_s
        self._items[i] = items
        self._bytes[i] = nbytes
        self._failed[i] = failed

    def extend(
        self,
        stages: Sequence[str],
        thread: str,
        starts: array,
        ends: array,
        items: array,
        nbytes: array,
        failed: array,
    ) -> None:
        """Keep a run of one thread's events (equal-length sequences), oldest first.

        Slice copies at C speed: how a per-thread book hands over its events.
        """
        for dst, a, b in _claim(self, len(starts)):
            k = b - a
            self._stage[dst : dst + k] = stages[a:b]
            self._thread[dst : dst + k] = [thread] * k
            self._start[dst : dst + k] = starts[a:b]
            self._end[dst : dst + k] = ends[a:b]
            self._items[dst : dst + k] = items[a:b]
            self._bytes[dst : dst + k] = nbytes[a:b]
            self._failed[dst : dst + k] = failed[a:b]

    def __len__(self) -> int:
        return min(self._n, self.capacity)

    def clear(self) -> None:
        """Forget every event and release the arrays (re-allocated by the next event)."""
        self.__init__(self.capacity)  # type: ignore[misc]

    def events(self) -> list[TraceEvent]:
        """The kept events, oldest first, with their ``args`` mappings built now."""
        n, cap = len(self), self.capacity
        first = self._n - n
        out = []
        for k in range(first, first + n):
            i = k % cap
            items = self._items[i]
            if items == _NO_ITEMS:
                args: Mapping[str, Any] = _NO_ARGS
            else:
                args = {"items": items}
                if self._bytes[i]:
                    args["bytes"] = self._bytes[i]
                if self._failed[i]:
                    args["failed"] = True
            ev = (self._stage[i], self._thread[i], self._start[i], self._end[i], args)
            out.append(TraceEvent(ev))
        return out


class _StepRing:
    """The latest ``capacity`` ``(end_s, wait_s, step_s)`` training steps, in one flat
    ``array("d")`` (24 B a step): no tuple kept per step, so nothing for the garbage
    collector to look at (a deque of tuples set off collections on tiny records)."""

    __slots__ = ("_a", "_n", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, int(capacity))
        self._n = 0  # steps ever added
        self._a = array("d")

    def extend(self, steps: np.ndarray) -> None:
        """Keep the rows of ``steps`` (``(m, 3)``), overwriting the oldest when full."""
        cap = self.capacity
        if cap == 0 or len(steps) == 0:
            return
        flat = array("d", np.ascontiguousarray(steps[-cap:]).tobytes())
        m = len(flat) // 3
        self._n += len(steps) - m
        i = self._n % cap
        grow = min(cap, self._n + m) * 3 - len(self._a)
        if grow > 0:
            self._a.frombytes(bytes(8 * grow))
        first = min(m, cap - i)
        self._a[3 * i : 3 * (i + first)] = flat[: 3 * first]
        if first < m:
            self._a[: 3 * (m - first)] = flat[3 * first :]
        self._n += m

    def __len__(self) -> int:
        return min(self._n, self.capacity)

    def steps(self) -> list[tuple[float, float, float]]:
        """The kept steps, oldest first."""
        n, cap, a = len(self), self.capacity, self._a
        first = self._n - n
        out = []
        for k in range(first, first + n):
            j = 3 * (k % cap)
            out.append((a[j], a[j + 1], a[j + 2]))
        return out


class _CounterRing:
    """The latest ``capacity`` ``(queue_name, time_s, depth)`` samples, preallocated (24 B each)."""

    __slots__ = ("_depth", "_n", "_name", "_size", "_t", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, int(capacity))
        self._n = 0
        self._size = 0
        self._name: list[str | None] = []
        self._t = array("d")
        self._depth = array("d")

    def append(self, name: str, t_s: float, depth: float) -> None:
        """Keep one sample, overwriting the oldest when full."""
        cap = self.capacity
        if cap == 0:
            return
        i = self._n % cap
        if i >= self._size:
            self._grow()
        self._n += 1
        self._name[i] = name
        self._t[i] = t_s
        self._depth[i] = depth

    def _grow(self) -> None:  # by doubling, as the event ring
        more = min(self.capacity, max(_FIRST_SLOTS, 2 * self._size)) - self._size
        self._name.extend([None] * more)
        self._t.frombytes(bytes(8 * more))
        self._depth.frombytes(bytes(8 * more))
        self._size += more

    def extend(self, names: Sequence[str], times: array, depths: array) -> None:
        """Keep a run of samples (equal-length sequences), oldest first (slice copies)."""
        for dst, a, b in _claim(self, len(times)):
            k = b - a
            self._name[dst : dst + k] = names[a:b]
            self._t[dst : dst + k] = times[a:b]
            self._depth[dst : dst + k] = depths[a:b]

    def __len__(self) -> int:
        return min(self._n, self.capacity)

    def clear(self) -> None:
        """Forget every sample and release the arrays (re-allocated by the next one)."""
        self.__init__(self.capacity)  # type: ignore[misc]

    def samples(self) -> list[tuple[str, float, float]]:
        """The kept samples, oldest first."""
        n, cap = len(self), self.capacity
        first = self._n - n
        return [
            (self._name[k % cap], self._t[k % cap], self._depth[k % cap])  # type: ignore[misc]
            for k in range(first, first + n)
        ]
