"""Per-thread clocks the hooks read: wall, CPU, run-queue wait, blocking switches.

- :func:`_run_delay_s`: time runnable without a core (``/proc/thread-self/schedstat``);
- :func:`_voluntary_switches`: blocks so far (``getrusage(RUSAGE_THREAD)``);
- :data:`Mark`: the four at one instant, for ``Recorder.mark``/``add_since`` chains.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import TypeAlias

try:  # Linux: per-thread rusage (voluntary context switches)
    import resource

    _RUSAGE_THREAD: int | None = resource.RUSAGE_THREAD
except (ImportError, AttributeError):  # pragma: no cover - not Linux
    _RUSAGE_THREAD = None

__all__ = ["SCHED_SAMPLE_EVERY", "SCHED_SAMPLE_GAP_S", "Mark"]

#: ``mark()`` chains per thread of which one reads the thread CPU time, the run-queue
#: wait and the context switches (~2 us a mark, ~10 us a chain of four); the others
#: read only the wall clock (~0.1 us). 1 reads them every time.
SCHED_SAMPLE_EVERY = 8
#: ...and at least this long after the thread's previous measured chain started,
#: seconds: on tiny records (a batch in 0.3 ms) one chain in 8 cost ~1.5 us a batch,
#: 0.5% of the time; one every 20 ms bounds it to ~0.05% whatever the batch size.
#: Chains slower than 2.5 ms are still measured one in 8.
SCHED_SAMPLE_GAP_S = 0.020
_NOT_SAMPLED = -2  # run delay / switches of a mark that did not read them

_tls = threading.local()


class _SchedFd:
    """This thread's open ``/proc/thread-self/schedstat`` (closed when the thread ends)."""

    __slots__ = ("fd", "pid")

    def __init__(self) -> None:
        self.pid = os.getpid()
        try:
            self.fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self.fd = -1

    def __del__(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass


def _run_delay_s() -> float:
    """This thread's cumulative run-queue wait (runnable, but no core free), seconds; -1 if unknown.

    Tells "waiting for a CPU" (cores oversubscribed) apart from "blocked" (IO, the
    GIL, locks), which ``thread_time`` alone cannot. One ``pread`` of an already open
    file, ~1.5 us.
    """
    holder: _SchedFd | None = getattr(_tls, "sched", None)
    if holder is None or holder.pid != os.getpid():  # new thread, or a forked child
        holder = _tls.sched = _SchedFd()
    if holder.fd < 0:
        return -1.0
    try:
        return int(os.pread(holder.fd, 96, 0).split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return -1.0


def _voluntary_switches() -> int:
    """This thread's voluntary context switches so far; -1 where unknown.

    A thread switches voluntarily when it blocks: on IO, on a lock, or waiting for the
    GIL (a waiter wakes every ``sys.getswitchinterval()``, 5 ms). Compute-bound code
    that releases the GIL (numpy, Pillow) hardly ever does, even on a crowded machine,
    where it is preempted instead: the rate tells GIL contention from oversubscription.
    """
    if _RUSAGE_THREAD is None:
        return -1
    return resource.getrusage(_RUSAGE_THREAD).ru_nvcsw


def _torch_profiler_active() -> bool:
    """Whether a torch profiler is running in this process (cheap; False without torch).

    ``torch.autograd._profiler_enabled()`` is thread-local and reads False in worker
    threads even while a profiler records every thread; torch's own process-global
    flag ``torch.autograd.profiler._is_profiler_enabled`` is the one to read.
    """
    mod = sys.modules.get("torch.autograd.profiler")
    return mod is not None and bool(getattr(mod, "_is_profiler_enabled", False))


@contextlib.contextmanager
def _torch_range(stage: str) -> Iterator[None]:
    import torch.profiler  # already imported: a profiler is running

    with torch.profiler.record_function(f"fastfeed/{stage}"):
        yield


#: ``(perf_counter_s, thread_time_s, run_delay_s, voluntary_switches)`` of one thread,
#: taken with :meth:`Recorder.mark`; run delay and switches are -1 where unknown and -2
#: in a mark that did not read them (see :data:`SCHED_SAMPLE_EVERY`). A plain tuple: a
#: tuple subclass cost ~0.25 us more per mark, four marks per batch.
Mark: TypeAlias = tuple[float, float, float, int]


def _mark() -> Mark:
    return (time.perf_counter(), time.thread_time(), _run_delay_s(), _voluntary_switches())


def _light_mark() -> Mark:
    return (time.perf_counter(), -1.0, _NOT_SAMPLED, _NOT_SAMPLED)


# Returned while recording is off; a span that started before recording was switched on
# is dropped rather than measured from a bogus start.
_NO_MARK: Mark = (0.0, 0.0, -1.0, -1)
