"""How long a thread that wants the GIL waits for it: a sleeping probe thread.

The probe thread sleeps ``interval_s`` (releasing the GIL), wakes, and needs the GIL to
run its next line. Its lateness beyond the sleep, minus the time it sat in the run
queue (no free core, from ``/proc/thread-self/schedstat``) and minus the smallest
lateness ever seen (the timer's own slack), is the time it waited for another thread
to release the GIL. The mean of that per wake-up is the expected cost of one GIL
acquisition in this process right now: about ``sys.getswitchinterval()`` (5 ms) when
some thread runs Python code non-stop, ~0 when the GIL is mostly free.

A thread's GIL wait is then estimated as (its voluntary context switches: each one is a
block, after which it must take the GIL again) x (that expected cost), capped by the
time it was blocked. Pure-Python transforms on several threads switch every 5 ms and
wait ~5 ms each time, so almost all their blocked time is GIL; a read that sleeps on
storage switches once per read and finds the GIL free, so almost none of it is.

The probe costs one wake-up per ``interval_s`` (20 ms: well under 0.1% of a core), and
holds the GIL a few microseconds each time (on a crowded machine it can be preempted
while holding it, so it runs only while stages record). It starts with the first stage
span, exits by itself 0.5 s after the last span or step and when the recorder is
garbage collected, and the next span starts it again. A loop watched by
:func:`fastfeed.watch` alone (no stage spans) runs no probe.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["GilProbeTotals", "start_probe"]

INTERVAL_S = 0.020


@dataclass
class GilProbeTotals:
    """Cumulative figures of the probe (the recorder owns one and resets it).

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

    def add(self, late_s: float, runq_s: float) -> None:
        self.wakeups += 1
        self.late_s += late_s
        self.runq_s += runq_s
        if late_s < self.min_late_s:
            self.min_late_s = late_s

    def wait_per_acquire_s(self) -> float | None:
        """Mean GIL wait per acquisition, seconds; None before any wake-up."""
        if self.wakeups == 0:
            return None
        return max(0.0, self.late_s / self.wakeups - self.min_late_s)

    def to_dict(self) -> dict[str, Any]:
        return {
            "wakeups": self.wakeups,
            "wait_per_acquire_s": self.wait_per_acquire_s(),
            "runq_s": self.runq_s,
        }


def start_probe(
    owner: Any,
    report: Callable[[Any, float, float], bool],
    run_delay_s: Callable[[], float],
    *,
    interval_s: float = INTERVAL_S,
) -> threading.Thread:
    """Start the probe thread for ``owner`` (held weakly).

    Args:
        owner: The recorder; the thread stops when it is garbage collected.
        report: ``report(owner, late_s, runq_s) -> keep_going``, called after each wake-up
            (the recorder adds the figures under its lock and says whether it is still
            active).
        run_delay_s: This thread's cumulative run-queue wait, seconds (-1 if unknown).
        interval_s: Sleep between wake-ups, seconds.

    Returns:
        The started daemon thread ``fastfeed-gilprobe-0``.
    """
    ref = weakref.ref(owner)

    def run() -> None:
        while True:
            q0 = run_delay_s()
            t0 = time.perf_counter()
            time.sleep(interval_s)
            t1 = time.perf_counter()  # the GIL is held again from here
            q1 = run_delay_s()
            runq = q1 - q0 if q0 >= 0 and q1 >= 0 else 0.0
            late = max(0.0, t1 - t0 - interval_s - runq)
            rec = ref()
            if rec is None or not report(rec, late, runq):
                return
            del rec

    thread = threading.Thread(target=run, name="fastfeed-gilprobe-0", daemon=True)
    thread.start()
    return thread
