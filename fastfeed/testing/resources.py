"""Resource counters of this process: file descriptors, threads, resident memory."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["ResourceSnapshot", "open_fd_count", "open_fds", "rss_bytes", "thread_names"]


def open_fd_count() -> int:
    """Open file descriptors of this process (``/proc/self/fd``, minus the listing's own)."""
    return len(os.listdir("/proc/self/fd")) - 1


def open_fds() -> dict[int, str]:
    """``{fd: target}`` of this process's open descriptors (for failure messages)."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the listing's own descriptor, closed by now
            continue
    return out


def thread_names() -> list[str]:
    """Names of this process's live Python threads, sorted."""
    return sorted(t.name for t in threading.enumerate() if t.is_alive())


def rss_bytes() -> int:
    """Resident set size of this process, bytes (``/proc/self/statm``)."""
    with open("/proc/self/statm", encoding="ascii") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


@dataclass
class ResourceSnapshot:
    """Threads and file descriptors at one moment.

    Attributes:
        threads: Live thread names, sorted.
        fds: ``{fd: target}``.
    """

    threads: list[str] = field(default_factory=thread_names)
    fds: dict[int, str] = field(default_factory=open_fds)

    def excess_over(self, baseline: ResourceSnapshot) -> str:
        """What this snapshot holds beyond ``baseline`` ('' when nothing)."""
        extra_threads = list((Counter(self.threads) - Counter(baseline.threads)).elements())
        extra_fds = {fd: t for fd, t in self.fds.items() if baseline.fds.get(fd) != t}
        parts = []
        if extra_threads:
            parts.append(f"{len(extra_threads)} extra thread(s): {sorted(extra_threads)[:10]}")
        if len(self.fds) > len(baseline.fds):
            parts.append(f"{len(self.fds) - len(baseline.fds)} extra fd(s): {extra_fds}")
        return "; ".join(parts)

    @classmethod
    def settle(cls, baseline: ResourceSnapshot, timeout_s: float = 3.0) -> ResourceSnapshot:
        """Poll until nothing exceeds ``baseline`` (or ``timeout_s`` passes); return the last."""
        deadline = time.monotonic() + timeout_s
        snap = cls()
        while snap.excess_over(baseline) and time.monotonic() < deadline:
            time.sleep(0.02)
            snap = cls()
        return snap
