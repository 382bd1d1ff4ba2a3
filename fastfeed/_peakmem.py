"""Peak memory of a process tree while something runs, sampled from another process.

:class:`PeakRSS` is what ``fastfeed bench`` and the benchmarks measure memory with. Its
sampler runs in a child process (``python -m fastfeed._peakmem``), not in a thread of the
measured process, where each sample needs the GIL that an in-process loader's threads
use and torch's worker processes do not: sampling every 5 ms, ``fastfeed.DataLoader(
num_workers=2)`` on 3 KB records lost 12% of its rate to a sampling thread and 8% to the
child (medians of 6 alternating runs, 2 cores). What remains is the ``/proc`` reads
themselves: each holds the measured process's mm lock, which all the threads of an
in-process loader share (a PSS read walks its page tables), so sample no more often than
needed: every 20 ms the loss was below run-to-run noise. The child leaves itself out of
the tree it measures. Where ``/proc`` is missing or the child cannot start, a thread
samples (the figures are 0 without ``/proc`` anyway).
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from fastfeed._procio import _pss_bytes, _rss_bytes, _tree_sum, tree_pss_bytes, tree_rss_bytes

__all__ = ["PeakRSS"]

_MEASURES: dict[str, Callable[[int | None], int]] = {
    "rss": tree_rss_bytes,
    "pss": tree_pss_bytes,
}
_PER_PROCESS: dict[str, Callable[[int], int]] = {"rss": _rss_bytes, "pss": _pss_bytes}
_CHILD_WAIT_S = 5.0  # longest wait for the sampler's answer at exit, seconds


class PeakRSS:
    """Samples a process tree's memory from a child process; a context manager.

    Args:
        interval_s: Seconds between samples.
        pid: Root of the tree (default: this process).
        measure: ``measure(pid) -> bytes``: :func:`~fastfeed._procio.tree_rss_bytes`
            (default) or :func:`~fastfeed._procio.tree_pss_bytes` (shared pages divided
            among the processes). Any other function is sampled by a thread here.

    Attributes:
        peak_bytes: Highest process-tree figure seen, bytes.
        start_bytes: The figure when sampling started, bytes.
        sampler: ``"process"`` or ``"thread"``: where the samples were taken.
    """

    def __init__(
        self,
        interval_s: float = 0.01,
        pid: int | None = None,
        measure: Callable[[int | None], int] = tree_rss_bytes,
    ) -> None:
        self.interval_s = interval_s
        self.pid = os.getpid() if pid is None else pid
        self.measure = measure
        self.peak_bytes = 0
        self.start_bytes = 0
        self.sampler = "thread"
        self._child: subprocess.Popen[str] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRSS:
        self.start_bytes = self.peak_bytes = self.measure(self.pid)
        name = next((k for k, fn in _MEASURES.items() if fn is self.measure), None)
        if name is not None and os.path.isdir("/proc"):
            self._child = _start_child(self.pid, self.interval_s, name)
        if self._child is not None:
            self.sampler = "process"
        else:
            self._thread = threading.Thread(target=self._run, name="fastfeed-rss-0", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, self.measure(self.pid))

    def __exit__(self, *exc: object) -> None:
        child, self._child = self._child, None
        if child is not None:
            try:
                out, _ = child.communicate(input="", timeout=_CHILD_WAIT_S)  # EOF: stop
                self.peak_bytes = max(self.peak_bytes, int(out.split()[-1]))
            except (subprocess.TimeoutExpired, ValueError, IndexError):
                child.kill()
                child.wait()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        self.peak_bytes = max(self.peak_bytes, self.measure(self.pid))


def _start_child(pid: int, interval_s: float, name: str) -> subprocess.Popen[str] | None:
    """Start ``python -m fastfeed._peakmem PID INTERVAL NAME``; None if it cannot start."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)  # where this fastfeed is imported from
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "fastfeed._peakmem", str(pid), repr(interval_s), name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
    except OSError:
        return None


def _sample(pid: int, interval_s: float, name: str) -> int:
    """The child's loop: sample until stdin closes; the peak, bytes."""
    per_process = _PER_PROCESS[name]
    me = os.getpid()

    def others(p: int) -> int:  # the sampler is in the tree it measures: not counted
        return 0 if p == me else per_process(p)

    peak = 0
    while True:
        peak = max(peak, _tree_sum(pid, others))
        ready, _, _ = select.select([sys.stdin], [], [], interval_s)
        if ready and not sys.stdin.read(1):
            return peak


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        print(_sample(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]), flush=True)
