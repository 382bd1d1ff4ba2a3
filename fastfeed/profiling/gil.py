"""How long a thread that wants the GIL waits for it: one sleeping probe thread per process.

The probe thread sleeps (``INTERVAL_S``, later ``SLOW_INTERVAL_S``: see below), releasing
the GIL, wakes, and needs the GIL to run its next line. Its lateness beyond the sleep,
minus the time it sat in the run queue (no free core, from
``/proc/thread-self/schedstat``) and minus the smallest lateness ever seen (the timer's
own slack), is the time it waited for another thread to release the GIL. The mean of
that per wake-up is the expected cost of one GIL acquisition in this process: about
``sys.getswitchinterval()`` (5 ms) while some thread runs Python code non-stop, ~0 while
the GIL is mostly free.

A thread's GIL wait is then estimated as (its voluntary context switches: each one is a
block, after which it must take the GIL again) x (that expected cost), capped by the
time it was blocked. Pure-Python transforms on several threads switch every 5 ms and
wait ~5 ms each time, so almost all their blocked time is GIL; a read that sleeps on
storage switches once per read and finds the GIL free, so almost none of it is.

The GIL is the process's, so one probe serves every recorder: each recorder keeps the
totals it started from and reports the difference. The probe wakes every 20 ms for its
first 100 wake-ups (a short profile gets enough of them), then every 100 ms, and holds
the GIL a few microseconds each time. Measured on a 2-core VM
(``benchmarks/profiling_overhead.py``): ~140 us of CPU per wake-up, most of it the
kernel's (a bare 20 ms sleep loop costs 73 us a wake there), so 7-8 ms of CPU per second
while it wakes every 20 ms and about 3 ms after; what that costs a pure-Python loop
beside it is below that machine's noise (medians of paired 1 s rounds from -4% to +5%).
On a crowded machine it can be preempted while holding the GIL, so it runs only while
stages record: it starts with a stage span, exits by itself 0.5 s after the last span
or step, and the next span starts it again. A loop watched by :func:`fastfeed.watch`
alone (no stage spans) runs no probe.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["GilProbeTotals", "ensure_running", "running", "totals", "touch"]

INTERVAL_S = 0.020  # between wake-ups for the first WARM_WAKEUPS of a run, seconds
WARM_WAKEUPS = 100  # 2 s at INTERVAL_S: enough wake-ups for a short profile's estimate
SLOW_INTERVAL_S = 0.100  # between wake-ups after those, seconds
IDLE_EXIT_S = 0.5


@dataclass(frozen=True)
class GilProbeTotals:
    """Cumulative figures of the probe (recorders keep a copy and subtract).

    Attributes:
        wakeups: Wake-ups measured.
        late_s: Lateness summed over wake-ups (beyond the sleep and the run-queue wait), s.
        min_late_s: Smallest lateness seen: the timer's slack, subtracted from the mean, s.
        runq_s: Run-queue wait of the probe thread summed (no free core), seconds.
    """

    wakeups: int = 0
    late_s: float = 0.0
    min_late_s: float = float("inf")
    runq_s: float = 0.0

    def since(self, start: GilProbeTotals) -> dict[str, Any]:
        """The figures between ``start`` and these totals, as a snapshot dict."""
        n = self.wakeups - start.wakeups
        per = None
        if n > 0:
            per = max(0.0, (self.late_s - start.late_s) / n - self.min_late_s)
        return {"wakeups": n, "wait_per_acquire_s": per, "runq_s": self.runq_s - start.runq_s}


class _Probe:
    """The process's probe: its thread, totals and the latest recording activity."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.totals = GilProbeTotals()
        self.last_activity = 0.0


_STATE = _Probe()


def touch(now_s: float) -> None:
    """Note recording activity at ``now_s`` (``perf_counter``): keeps the probe running."""
    _STATE.last_activity = now_s


def totals() -> GilProbeTotals:
    """The probe's totals so far (immutable)."""
    return _STATE.totals


def running() -> bool:
    """Whether the probe thread runs now."""
    return _STATE.thread is not None


def ensure_running(run_delay_s: Callable[[], float]) -> None:
    """Start the probe thread ``fastfeed-gilprobe-0`` unless it runs.

    Args:
        run_delay_s: The calling thread's cumulative run-queue wait, seconds (-1 unknown).
    """
    state = _STATE
    with state.lock:
        if state.thread is not None:
            return
        state.last_activity = time.perf_counter()
        thread = threading.Thread(
            target=_run, args=(state, run_delay_s), name="fastfeed-gilprobe-0", daemon=True
        )
        state.thread = thread
        thread.start()


def _run(state: _Probe, run_delay_s: Callable[[], float]) -> None:
    wakeups = 0
    while True:
        interval = INTERVAL_S if wakeups < WARM_WAKEUPS else SLOW_INTERVAL_S
        wakeups += 1
        q0 = run_delay_s()
        t0 = time.perf_counter()
        time.sleep(interval)
        t1 = time.perf_counter()  # the GIL is held again from here
        q1 = run_delay_s()
        runq = q1 - q0 if q0 >= 0 and q1 >= 0 else 0.0
        late = max(0.0, t1 - t0 - interval - runq)
        with state.lock:
            idle = t1 - state.last_activity
            if idle > IDLE_EXIT_S or idle < -1.0:  # quiet, or a made-up future timestamp
                state.thread = None
                return
            t = state.totals
            state.totals = replace(
                t,
                wakeups=t.wakeups + 1,
                late_s=t.late_s + late,
                min_late_s=min(t.min_late_s, late),
                runq_s=t.runq_s + runq,
            )


def _after_fork_in_child() -> None:
    # The probe thread did not survive the fork; its lock may be held by it.
    _STATE.lock = threading.Lock()
    _STATE.thread = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
