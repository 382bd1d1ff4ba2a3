"""One map-style batch at a time while thread workers are measured GIL-bound.

Worker threads of one process share one GIL. A dataset whose ``__getitem__`` is pure
Python (or calls C code that keeps the GIL) gains nothing from a second worker thread:
the threads take turns, and every turn costs a GIL hand-off. Measured on 3 KB records
(``benchmarks/dataloader_dropin.py``'s dataset, batch 256, 2 shared cores): two thread
workers kept 1.1 cores busy; in the gate's own probe, one batch at a time then gave 1.56x
the batches/s for 0.51x the CPU time per batch (over whole epochs, alternating runs:
0.69-0.77x of torch's ``num_workers=0`` with both threads at once, 0.78-0.82x one batch
at a time). Work that releases the GIL (image decoding, most torch ops, file reads)
keeps every thread busy and is not touched (JPEG decode: 1.8 cores busy, never probed).

:class:`GilGate` decides from measurements, repeatedly, never from a guess:

1. *Parallel* (the normal state): every worker thread runs batches at once. After
   ``window`` batches (at least ``_MIN_WINDOW_S``; a window restarts after the loader sat
   idle for ``_GAP_S``, e.g. between epochs) it computes how many cores the workers kept
   busy: the sum of their thread CPU time (``time.thread_time``) over the elapsed time.
   Clearly more than one core (> ``_PARALLEL_CORES``): parallelism pays, nothing changes.
2. At most one core's worth: GIL-bound, or waiting (IO, a full queue, or a machine too
   busy to give the threads their cores). A *serial* probe tells them apart: ``window``
   batches, one at a time. If it delivers at least ``_KEEP`` of the parallel
   throughput (or ``_KEEP_CPU`` of it for ``_CPU_SAVING`` times less CPU per batch: GIL
   contention measured in CPU time, which other load on the machine barely moves),
   batches go on one at a time (*serial*); else back to parallel. A serial
   probe stops as soon as it can no longer win (IO-bound work: after about half of it).
3. Every ``_REPROBE_S`` seconds the choice is measured again (a dataset can change, and
   so can the machine's load); after each serial probe that lost, twice as late (up to
   ``_MAX_REPROBE_S``), so work that only looks GIL-bound on a busy machine pays little.

Nothing observable changes but timing: each batch still runs on one of the
``num_workers`` threads (with that thread's ``get_worker_info()``), batches are
delivered in the same order, ``timeout`` counts the same. A batch that waits for its turn
while no batch finishes for ``_BYPASS_S`` (or 10 batch times, if longer) runs anyway and
the gate stays open for good: batches that wait for each other (a barrier across
workers) can never deadlock on it.
IterableDataset streams and fewer than two threads are never gated.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["GilGate"]

T = TypeVar("T")
R = TypeVar("R")

_PARALLEL_CORES = 1.3  # workers busier than this many cores: parallelism pays
_KEEP = 0.95  # serial must keep this share of the parallel throughput
_KEEP_CPU = 0.9  # ... or this share, while spending _CPU_SAVING times less CPU per batch
_CPU_SAVING = 1.15
_REPROBE_S = 2.0  # measure the choice again after this long, seconds
_MAX_REPROBE_S = 60.0  # ... doubled after each probe serial lost, up to this, seconds
_MIN_WINDOW_S = 0.1  # a measuring window lasts at least this long, seconds
_GAP_S = 0.2  # a batch started this long after the last one ended: the window restarts, s
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
        warm_up: Parallel windows skipped first (threads starting, cold caches).
        clock: Wall clock, seconds (tests pass a fake one).
        cpu_clock: The calling thread's CPU time, seconds.
    """

    def __init__(
        self,
        threads: int,
        window: int = 0,
        warm_up: int = 1,
        *,
        clock: Callable[[], float] = time.perf_counter,
        cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self.threads = threads
        self._clock = clock
        self._cpu_clock = cpu_clock
        self.window = window or max(8, 4 * threads)
        self._books = threading.Lock()
        # The turn of serial mode, handed to waiting batches first come first served: a
        # plain lock is not fair, and the thread releasing it would take it again for
        # its next batch while the batch the loop waits for (in order) starves.
        self._busy = False
        self._waiters: deque[threading.Lock] = deque()
        self._state = _PROBE_PARALLEL if threads >= 2 else _PARALLEL
        self._epoch = 0  # bumped at each state change: older batches are not counted
        self._start: float | None = None  # when the window's first counted batch started
        self._done = 0
        self._cpu_s = 0.0
        self._parallel: tuple[float, float, float] | None = None  # (batches/s, cores, cpu_s)
        self._warm_up = warm_up
        self._next_probe = 0.0
        self._task_s = 0.0  # one batch's time when run alone (the last serial window), s
        self._backoff_s = _REPROBE_S  # from a settled choice to the next probe, s
        self._finished = 0  # batches finished, any state (a waiting batch sees progress)
        self._last_end = 0.0  # when the last batch finished, any state
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
                self._pass_turn()
            self._count(epoch, t0, cpu)

    def _wait_turn(self, fn: Callable[..., Any]) -> bool:
        """Take the turn, first come first served; False: run without it."""
        with self._books:
            if not self._busy:
                self._busy = True
                return True
            mine = threading.Lock()
            mine.acquire()
            self._waiters.append(mine)  # released by _pass_turn: the turn is handed over
        # Waiting while other batches finish is normal; while none finishes, a dependency.
        seen, since = self._finished, self._clock()
        while not mine.acquire(timeout=_POLL_S):
            now = self._clock()
            if self._finished != seen:
                seen, since = self._finished, now
            dependent = now - since > max(_BYPASS_S, 10 * self._task_s)
            if not (getattr(fn, "stopped", False) or not self.serial or dependent):
                continue
            with self._books:
                if mine not in self._waiters:
                    break  # handed over meanwhile: the turn is ours after all
                self._waiters.remove(mine)
                if dependent:
                    self._open_for_good = True
                    self._set(_PARALLEL)
                    self.reason = (
                        "parallel: a batch waited for its turn while none finished, so "
                        "batches may depend on each other; they run at once from now on"
                    )
            return False
        return True

    def _pass_turn(self) -> None:
        with self._books:
            if self._waiters:
                self._waiters.popleft().release()  # the oldest waiting batch goes next
            else:
                self._busy = False

    def _count(self, epoch: int, started: float, cpu_s: float) -> None:
        with self._books:
            self._finished += 1
            now, last, self._last_end = self._clock(), self._last_end, self._clock()
            if epoch != self._epoch or self._open_for_good:
                return  # started under another state: not part of this window
            if self._start is None or started - last > _GAP_S:
                # The first batch of the window, or the loader sat idle (between epochs,
                # or the loop paused): measure from this batch on.
                self._start, self._done, self._cpu_s = started, 0, 0.0
            self._done += 1
            self._cpu_s += cpu_s
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
            if self._warm_up > 0:  # the threads' first batches (start-up, caches)
                self._warm_up -= 1
                self._set(_PROBE_PARALLEL)
                return
            if cores <= _PARALLEL_CORES:
                self._parallel = (rate, cores, self._cpu_s / self._done)
                self._task_s = self.threads / rate  # one batch's time with others running
                self._set(_PROBE_SERIAL)
                return
            self.reason = (
                f"parallel: {self.threads} threads kept {cores:.2f} cores busy (more than "
                "one core's worth: not GIL-bound)"
            )
            self._settle(_PARALLEL, now)

    def _serial_window(self, now: float, elapsed: float) -> None:
        assert self._parallel is not None
        par_rate, par_cores, par_cpu = self._parallel
        self._task_s = max(self._task_s, elapsed / self._done)
        lost = False
        if self._done < self.window:
            # Lost already: even the rest of the window at once would not reach it.
            lost = elapsed > self.window / (_KEEP_CPU * par_rate)
            if not lost:
                return
        elif elapsed < _MIN_WINDOW_S:
            return
        rate, cpu = self._done / elapsed, self._cpu_s / self._done
        # Serial wins by throughput, or (GIL contention measured as CPU spent per batch,
        # a figure the machine's other load barely moves) nearly so, for much less CPU.
        saves_cpu = cpu * _CPU_SAVING <= par_cpu and rate >= _KEEP_CPU * par_rate
        serial_wins = not lost and (rate >= _KEEP * par_rate or saves_cpu)
        self.reason = (
            f"{'serial' if serial_wins else 'parallel'}: {self.threads} threads kept "
            f"{par_cores:.2f} cores busy; one batch at a time gave "
            f"{rate / par_rate:.2f}x the batches/s of {self.threads} at once for "
            f"{cpu / par_cpu:.2f}x the CPU time per batch"
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
