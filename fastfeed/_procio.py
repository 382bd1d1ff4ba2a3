"""Process IO and page-cache helpers for the profiler (Linux; degrade to "unknown" elsewhere).

- :func:`read_proc_io` reads ``/proc/self/io``: ``rchar`` counts bytes handed to
  ``read()``-family calls (page cache or not), ``read_bytes`` counts bytes the block layer
  actually fetched from storage for this process (page faults on mmaps included). Their
  difference tells the page-cache hit ratio without root. In some containers and on
  some filesystems (overlay, FUSE, network mounts) ``read_bytes`` stays 0 whatever
  happens: :func:`io_accounting_works` probes for that once, so callers can say
  "unknown" instead of a false "100% cached".
- :func:`residency` asks the kernel (``mincore`` on a read-only mapping) how many pages
  of a file are in the page cache; :func:`evict` drops them
  (``posix_fadvise(POSIX_FADV_DONTNEED)``; clean pages only, no root needed).
- :func:`cpu_times` reads the machine-wide busy/total CPU jiffies from ``/proc/stat``.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = [
    "ProcIO",
    "Residency",
    "cpu_times",
    "evict",
    "io_accounting_works",
    "read_proc_io",
    "residency",
    "tree_rss_bytes",
]

_PROC_IO = "/proc/self/io"


@dataclass(frozen=True)
class ProcIO:
    """Cumulative IO counters of this process (``/proc/self/io``), bytes.

    Attributes:
        rchar: Bytes returned by read-family syscalls (from the page cache or storage).
        read_bytes: Bytes fetched from storage by the block layer (0 where not accounted).
        syscr: Read syscalls.
    """

    rchar: int
    read_bytes: int
    syscr: int

    def __sub__(self, other: ProcIO) -> ProcIO:
        return ProcIO(
            self.rchar - other.rchar,
            self.read_bytes - other.read_bytes,
            self.syscr - other.syscr,
        )


def read_proc_io() -> ProcIO | None:
    """This process's IO counters, or None where ``/proc/self/io`` is missing or unreadable."""
    try:
        with open(_PROC_IO, encoding="ascii") as f:
            text = f.read()
    except OSError:
        return None
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        try:
            values[key.strip()] = int(value)
        except ValueError:
            continue
    try:
        return ProcIO(values["rchar"], values["read_bytes"], values.get("syscr", 0))
    except KeyError:
        return None


def cpu_times() -> tuple[float, float] | None:
    """Machine-wide ``(busy, total)`` CPU time from ``/proc/stat``, in jiffies; None if unknown.

    Busy excludes idle and iowait. Take two readings and divide the deltas for the
    fraction of all cores busy (whoever used them).
    """
    try:
        with open("/proc/stat", encoding="ascii") as f:
            first = f.readline().split()
    except OSError:
        return None
    if not first or first[0] != "cpu":
        return None
    fields = [float(x) for x in first[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return total - idle, total


@dataclass(frozen=True)
class Residency:
    """Page-cache residency of a set of files.

    Attributes:
        resident_bytes: Bytes whose pages are in the page cache (page granular).
        total_bytes: Size of the files.
        files: Files inspected.
        unknown_files: Files whose residency could not be read (missing, not mappable).
    """

    resident_bytes: int
    total_bytes: int
    files: int
    unknown_files: int = 0

    @property
    def fraction(self) -> float:
        """Resident share of the bytes (0..1); 0 for empty files."""
        return self.resident_bytes / self.total_bytes if self.total_bytes else 0.0


class _Libc:
    """``mmap``/``mincore``/``munmap`` through ctypes, loaded on first use."""

    _lock = threading.Lock()
    _lib: ctypes.CDLL | None = None
    _failed = False

    @classmethod
    def get(cls) -> ctypes.CDLL | None:
        with cls._lock:
            if cls._lib is None and not cls._failed:
                try:
                    lib = ctypes.CDLL(None, use_errno=True)
                    lib.mmap.restype = ctypes.c_void_p
                    lib.mmap.argtypes = [
                        ctypes.c_void_p,
                        ctypes.c_size_t,
                        ctypes.c_int,
                        ctypes.c_int,
                        ctypes.c_int,
                        ctypes.c_long,
                    ]
                    lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
                    lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
                    cls._lib = lib
                except (OSError, AttributeError):
                    cls._failed = True
            return cls._lib


_MAP_FAILED = ctypes.c_void_p(-1).value


def _file_residency(path: str) -> tuple[int, int] | None:
    """``(resident_bytes, size_bytes)`` of one file, or None if it cannot be inspected."""
    lib = _Libc.get()
    if lib is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0, 0
        # Our own read-only mapping: mincore reports the page cache's state for the file,
        # and mapping does not fault anything in.
        addr = lib.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    if addr is None or addr == _MAP_FAILED:
        return None
    try:
        page = mmap.PAGESIZE
        pages = (size + page - 1) // page
        vec = (ctypes.c_ubyte * pages)()
        if lib.mincore(addr, size, vec) != 0:
            return None
        resident_pages = sum(1 for v in bytes(vec) if v & 1)
    finally:
        lib.munmap(addr, size)
    return min(size, resident_pages * page), size


def residency(paths: Iterable[str]) -> Residency:
    """How much of ``paths`` sits in the page cache (``mincore``; no root needed)."""
    resident = total = files = unknown = 0
    for path in paths:
        files += 1
        got = _file_residency(os.fspath(path))
        if got is None:
            unknown += 1
            continue
        resident += got[0]
        total += got[1]
    return Residency(resident, total, files, unknown)


def evict(paths: Iterable[str]) -> int:
    """Drop the clean page-cache pages of ``paths`` (``POSIX_FADV_DONTNEED``).

    Returns:
        Files advised; files that cannot be opened are skipped. Check the effect with
        :func:`residency`: dirty pages and pages mapped by other processes may stay.
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return 0
    done = 0
    for path in paths:
        try:
            fd = os.open(os.fspath(path), os.O_RDONLY)
        except OSError:
            continue
        try:
            advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            done += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return done


_probe_lock = threading.Lock()
_probe_result: list[bool | None] = []


def io_accounting_works() -> bool | None:
    """Whether ``read_bytes`` counts storage reads here (probed once per process).

    Writes a 1 MiB temporary file, evicts it, checks with ``mincore`` that it left the
    page cache, reads it back, and looks for the bytes in ``read_bytes``.

    Returns:
        True or False; None when the probe is inconclusive (no ``/proc/self/io``, the
        page cache kept the file, no writable temp dir).
    """
    with _probe_lock:
        if not _probe_result:
            _probe_result.append(_probe())
        return _probe_result[0]


def _probe() -> bool | None:
    if read_proc_io() is None:
        return None
    size = 1 << 20
    try:
        fd, path = tempfile.mkstemp(prefix="fastfeed-ioprobe-")
    except OSError:
        return None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(size))
            f.flush()
            os.fsync(f.fileno())  # dirty pages cannot be evicted
        evict([path])
        if residency([path]).resident_bytes > size // 2:
            return None
        before = read_proc_io()
        with open(path, "rb") as f:
            while f.read(1 << 18):
                pass
        after = read_proc_io()
        if before is None or after is None:
            return None
        return (after.read_bytes - before.read_bytes) >= size // 2
    except OSError:
        return None
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


# -- process-tree memory ----------------------------------------------------------------

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(x) for x in f.read().split())
        except OSError:
            continue
    return kids


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return 0  # gone between listing and reading, or not Linux


def _pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0  # gone between listing and reading, or not Linux


def _tree_sum(root: int, per_process: Callable[[int], int]) -> int:
    total, stack, seen = 0, [root], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        total += per_process(p)
        stack.extend(_children(p))
    return total


def tree_pss_bytes(pid: int | None = None) -> int:
    """Proportional set size of a process and its descendants, bytes (from ``/proc``).

    Each shared page is divided among the processes mapping it, so copy-on-write pages of
    forked workers and shared-memory batch slots count once for the tree. 0 without /proc.
    """
    return _tree_sum(os.getpid() if pid is None else pid, _pss_bytes)


def tree_rss_bytes(pid: int | None = None) -> int:
    """Resident memory of a process and all its descendants, bytes (from ``/proc``).

    Shared pages (fork copy-on-write, shared libraries) are counted once per process,
    the same way ``ps`` and ``psutil`` count them. 0 where ``/proc`` is missing.
    """
    return _tree_sum(os.getpid() if pid is None else pid, _rss_bytes)
