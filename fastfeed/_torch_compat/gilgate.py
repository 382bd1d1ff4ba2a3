"""One map-style batch at a time while thread workers are measured GIL-bound.

Worker threads of one process share one GIL. A dataset whose ``__getitem__`` is pure
Python (or calls C code that keeps the GIL) gains nothing from a second worker thread:
the threads take turns, and every turn costs a GIL hand-off. Measured on 3 KB records
(``benchmarks/dataloader_dropin.py``, 2 cores): two thread workers used 1.0 core and
delivered 0.70x of torch's ``num_workers=0``; the same two threads taking one batch at a
time delivered 0.80x and spent 25% less CPU per sample. Work that releases the GIL
(image decoding, most torch ops, file reads) keeps every thread busy and is not touched.

:class:`GilGate` decides from measurements, repeatedly, never from a guess:

1. *Parallel* (the normal state): every worker thread runs batches at once. After
   ``window`` batches it computes how many cores the workers kept busy: the sum of their
   thread CPU time (``time.thread_time``) over the elapsed time. Clearly more than one
   core (> ``_PARALLEL_CORES``): parallelism pays, nothing changes.
2. At most one core's worth: GIL-bound, or waiting (IO, a full queue, or a machine too
   busy to give the threads their cores). A *serial* probe tells them apart: ``window``
   batches, one at a time. If it delivers at least ``_KEEP`` of the parallel
   throughput, batches go on one at a time (*serial*); else back to parallel. A serial
   probe stops as soon as it can no longer win (IO-bound work: after about half of it).
3. Every ``_REPROBE_S`` seconds the choice is measured again (a dataset can change, and
   so can the machine's load); after each serial probe that lost, twice as late (up to
   ``_MAX_REPROBE_S``), so work that only looks GIL-bound on a busy machine pays little.

Nothing observable changes but timing: each batch still runs on one of the
``num_workers`` threads (with that thread's ``get_worker_info()``), batches are
delivered in the same order, ``timeout`` counts the same. A batch that waits for its turn
while no batch finishes for ``_BYPASS_S`` (or 4 batch times, if longer) runs anyway and
the gate stays open for good: batches that wait for each other (a barrier across
workers) can never deadlock on it.
IterableDataset streams and fewer than two threads are never gated.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["GilGate"]

T = TypeVar("T")
R = TypeVar("R")

_PARALLEL_CORES = 1.3  # workers busier than this many cores: parallelism pays
_KEEP = 0.95  # serial must keep this share of the parallel throughput
_REPROBE_S = 2.0  # measure the choice again after this long, seconds
_MAX_REPROBE_S = 60.0  # ... doubled after each probe serial lost, up to this, seconds
_MIN_WINDOW_S = 0.03  # a measuring window lasts at least this long, seconds
_BYPASS_S = 1.0  # longest a batch waits for its turn before it runs anyway, seconds
_POLL_S = 0.05  # how often a waiting batch looks at the stop flag, seconds

_PARALLEL, _PROBE_PARALLEL, _PROBE_SERIAL, _SERIAL = (
    "parallel",
    "probe-parallel",
    "probe-serial",
    "serial",
)


class GilGate:
    """Lets map-style batches run one at a time while that is measured to be no slower.

    One gate per loader, shared by its pools (epochs), so what was measured carries over.
    ``run(fn, task)`` gives up a wait for its turn once ``fn.stopped`` is true (the pool
    is stopping).

    Args:
        threads: Worker threads (the gate never closes below 2).
        window: Batches per measuring window (also at least ``_MIN_WINDOW_S`` long).
        clock: Wall clock, seconds (tests pass a fake one).
        cpu_clock: The calling thread's CPU time, seconds.
    """

    def __init__(
        self,
        threads: int,
        window: int = 0,
        *,
        clock: Callable[[], float] = time.perf_counter,
        cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self.threads = threads
        self._clock = clock
        self._cpu_clock = cpu_clock
        self.window = window or max(4, 2 * threads)
        self._books = threading.Lock()
        self._turn = threading.Lock()  # held by the batch running in serial mode
        self._state = _PROBE_PARALLEL if threads >= 2 else _PARALLEL
        self._epoch = 0  # bumped at each state change: older batches are not counted
        self._start: float | None = None  # when the window's first counted batch started
        self._done = 0
        self._cpu_s = 0.0
        self._parallel: tuple[float, float] | None = None  # (batches/s, cores)
        self._next_probe = 0.0
        self._task_s = 0.0  # one batch's time when run alone (the last serial window), s
        self._backoff_s = _REPROBE_S  # from a settled choice to the next probe, s
        self._finished = 0  # batches finished, any state (a waiting batch sees progress)
        self._open_for_good = threads < 2
        self.reason = "not measured yet"

    @property
    def serial(self) -> bool:
        """True while batches run one at a time."""
        return self._state in (_SERIAL, _PROBE_SERIAL)

    def run(self, fn: Callable[[T], R], task: T) -> R:
        """``fn(task)``, waiting for its turn while the gate is serial; measured."""
        if self._open_for_good:
            return fn(task)
        epoch = self._epoch
        turn = self.serial and self._wait_turn(fn)
        t0, c0 = self._clock(), self._cpu_clock()
        try:
            return fn(task)
        finally:
            cpu = self._cpu_clock() - c0
            if turn:
                self._turn.release()
            self._count(epoch, t0, cpu)

    def _wait_turn(self, fn: Callable[..., Any]) -> bool:
        # Waiting while other batches finish is normal (the lock is not fair: one thread
        # may take several turns in a row); waiting while none finishes is a dependency.
        seen, since = self._finished, self._clock()
        while not self._turn.acquire(timeout=_POLL_S):
            if getattr(fn, "stopped", False) or not self.serial:
                return False
            now = self._clock()
            if self._finished != seen:
                seen, since = self._finished, now
            elif now - since > max(_BYPASS_S, 4 * self._task_s):
                with self._books:
                    self._open_for_good = True
                    self._set(_PARALLEL)
                    self.reason = (
                        "parallel: a batch waited for its turn while none finished, so "
                        "batches may depend on each other; they run at once from now on"
                    )
                return False
        return True

    def _count(self, epoch: int, started: float, cpu_s: float) -> None:
        with self._books:
            self._finished += 1
            if epoch != self._epoch or self._open_for_good:
                return  # started under another state: not part of this window
            if self._start is None:
                self._start = started
            self._done += 1
            self._cpu_s += cpu_s
            now = self._clock()
            elapsed = max(now - self._start, 1e-9)
            if self._state in (_PARALLEL, _SERIAL):
                if now >= self._next_probe:
                    self._set(_PROBE_PARALLEL)
                return
            if self._state == _PROBE_SERIAL:
                self._serial_window(now, elapsed)
                return
            if self._done < self.window or elapsed < _MIN_WINDOW_S:
                return
            rate, cores = self._done / elapsed, self._cpu_s / elapsed
            if cores <= _PARALLEL_CORES:
                self._parallel = (rate, cores)
                self._set(_PROBE_SERIAL)
                return
            self.reason = (
                f"parallel: {self.threads} threads kept {cores:.2f} cores busy (more than "
                "one core's worth: not GIL-bound)"
            )
            self._settle(_PARALLEL, now)

    def _serial_window(self, now: float, elapsed: float) -> None:
        assert self._parallel is not None
        par_rate, par_cores = self._parallel
        self._task_s = elapsed / self._done
        lost = False
        if self._done < self.window:
            # Lost already: even the rest of the window at once would not reach _KEEP.
            lost = elapsed > self.window / (_KEEP * par_rate)
            if not lost:
                return
        elif elapsed < _MIN_WINDOW_S:
            return
        rate = self._done / elapsed
        serial_wins = not lost and rate >= _KEEP * par_rate
        self.reason = (
            f"{'serial' if serial_wins else 'parallel'}: {self.threads} threads kept "
            f"{par_cores:.2f} cores busy; one batch at a time gave "
            f"{rate / par_rate:.2f}x the batches/s of {self.threads} at once"
        )
        if serial_wins:
            self._backoff_s = _REPROBE_S
        else:  # each lost probe costs throughput: probe less and less often
            self._backoff_s = min(2 * self._backoff_s, _MAX_REPROBE_S)
        self._settle(_SERIAL if serial_wins else _PARALLEL, now)

    def _settle(self, state: str, now: float) -> None:
        self._set(state)
        self._next_probe = now + self._backoff_s

    def _set(self, state: str) -> None:
        self._state = state
        self._epoch += 1
        self._start = None
        self._done = 0
        self._cpu_s = 0.0

    def describe(self) -> dict[str, Any]:
        """The gate's state for ``stats()``: ``{"serial": bool, "reason": str}``."""
        with self._books:
            return {"serial": self.serial, "reason": self.reason}
