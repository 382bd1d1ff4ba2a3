"""Block-device read counters and IO quotas, for telling an IOPS-bound disk (Linux).

A disk (or a cloud volume with a quota) that counts *operations* caps random small reads
far below its bandwidth: 400 reads/s of 85 KB is 34 MB/s on a 100 MB/s volume. What
tells it apart, without root:

- ``/proc/diskstats``: per whole disk, reads completed, sectors read and the time the
  disk had requests in flight (``io_ticks``);
- the IO quota of this process's cgroup and its ancestors, if any: cgroup v2
  ``io.max`` (``riops=``, ``rbps=``) or v1 ``blkio.throttle.read_iops_device`` /
  ``read_bps_device``. Cloud block volumes and ``shared/slowdisk`` throttle this way.

:func:`disk_snapshot` reads both (well under a millisecond); :func:`storage_delta` turns
two snapshots into a JSON-ready dict for the device that did the most reading between
them. Elsewhere (no ``/proc``) everything returns None: "unknown", never a guess.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["DiskSnapshot", "disk_snapshot", "storage_delta"]

_SECTOR = 512
_DISKSTATS = "/proc/diskstats"
_SYS_BLOCK = "/sys/block"
_CGROUP_ROOT = "/sys/fs/cgroup"
_PROC_CGROUP = "/proc/self/cgroup"


@dataclass(frozen=True)
class _Dev:
    name: str
    reads: int
    read_bytes: int
    read_ms: int
    busy_ms: int


@dataclass(frozen=True)
class DiskSnapshot:
    """Cumulative read counters of every whole disk at one moment.

    Attributes:
        time_s: ``time.perf_counter()`` when read, seconds.
        devices: ``"major:minor"`` -> counters (name, reads, read bytes, ms reading,
            ms busy), machine-wide.
        cgroup: ``"major:minor"`` -> ``(reads, read bytes)`` of this process's own IO
            cgroup (a container, a job, ``slowdisk``), when it is not the root one:
            the reads of this process and its cgroup peers only.
    """

    time_s: float
    devices: dict[str, _Dev]
    cgroup: dict[str, tuple[int, int]]


def _whole_disks() -> set[str] | None:
    try:
        return set(os.listdir(_SYS_BLOCK))
    except OSError:
        return None


def disk_snapshot() -> DiskSnapshot | None:
    """The read counters of every whole disk now; None where ``/proc/diskstats`` is absent."""
    disks = _whole_disks()
    try:
        with open(_DISKSTATS, encoding="ascii") as f:
            lines = f.readlines()
    except OSError:
        return None
    now = time.perf_counter()
    devices = {}
    for line in lines:
        p = line.split()
        if len(p) < 13 or (disks is not None and p[2] not in disks):
            continue  # partitions count again inside their disk
        if p[2].startswith(("loop", "ram", "zram")):
            continue
        try:
            devices[f"{p[0]}:{p[1]}"] = _Dev(
                p[2], int(p[3]), int(p[5]) * _SECTOR, int(p[6]), int(p[12])
            )
        except ValueError:
            continue
    return DiskSnapshot(now, devices, _cgroup_reads())


def _cgroup_reads() -> dict[str, tuple[int, int]]:
    """``(reads, read bytes)`` per device of this process's innermost non-root IO cgroup."""
    dirs = _cgroup_dirs()
    if not dirs:
        return {}
    version, d = dirs[0]
    if d == next(r for v, r in reversed(dirs) if v == version):
        return {}  # the root cgroup: machine-wide, no better than /proc/diskstats
    out: dict[str, tuple[int, int]] = {}
    if version == "v2":
        for line in _read(os.path.join(d, "io.stat")).splitlines():
            p = line.split()
            kv = dict(x.partition("=")[::2] for x in p[1:])
            try:
                out[p[0]] = (int(kv.get("rios", 0)), int(kv.get("rbytes", 0)))
            except (ValueError, IndexError):
                continue
        return out
    ops = _v1_reads(os.path.join(d, "blkio.throttle.io_serviced"))
    nbytes = _v1_reads(os.path.join(d, "blkio.throttle.io_service_bytes"))
    return {dev: (n, nbytes.get(dev, 0)) for dev, n in ops.items()}


def _v1_reads(path: str) -> dict[str, int]:
    out = {}
    for line in _read(path).splitlines():
        p = line.split()
        if len(p) == 3 and p[1] == "Read":
            try:
                out[p[0]] = int(p[2])
            except ValueError:
                continue
    return out


def _cgroup_dirs() -> list[tuple[str, str]]:
    """``(version, directory)`` of this process's IO cgroups, innermost first."""
    try:
        with open(_PROC_CGROUP, encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            base, version = _CGROUP_ROOT, "v2"
            if os.path.isdir(os.path.join(_CGROUP_ROOT, "unified")):
                base = os.path.join(_CGROUP_ROOT, "unified")
        elif "blkio" in controllers.split(","):
            base, version = os.path.join(_CGROUP_ROOT, "blkio"), "v1"
        else:
            continue
        rel = path.strip("/")
        while True:
            out.append((version, os.path.join(base, rel) if rel else base))
            if not rel:
                break
            rel = os.path.dirname(rel)
    return out


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except OSError:
        return ""


def io_limits(device: str) -> tuple[float | None, float | None]:
    """The tightest read quota on ``device`` ("major:minor") over this process's cgroups.

    Returns:
        ``(read operations per second, read bytes per second)``; None for no limit.
    """
    iops: float | None = None
    bps: float | None = None

    def tighter(old: float | None, value: str) -> float | None:
        if value in ("", "max"):
            return old
        try:
            v = float(value)
        except ValueError:
            return old
        return v if old is None or v < old else old

    for version, d in _cgroup_dirs():
        if version == "v2":
            for line in _read(os.path.join(d, "io.max")).splitlines():
                p = line.split()
                if not p or p[0] != device:
                    continue
                for kv in p[1:]:
                    k, _, v = kv.partition("=")
                    if k == "riops":
                        iops = tighter(iops, v)
                    elif k == "rbps":
                        bps = tighter(bps, v)
        else:
            for name in ("blkio.throttle.read_iops_device", "blkio.throttle.read_bps_device"):
                for line in _read(os.path.join(d, name)).splitlines():
                    p = line.split()
                    if len(p) == 2 and p[0] == device:
                        if "iops" in name:
                            iops = tighter(iops, p[1])
                        else:
                            bps = tighter(bps, p[1])
    return iops, bps


def storage_delta(start: DiskSnapshot | None, end: DiskSnapshot | None) -> dict[str, Any] | None:
    """What the busiest disk read between two snapshots, as a JSON-ready dict.

    Counts are this process's IO cgroup's when it has its own (``scope`` "cgroup"),
    else machine-wide for that disk (``scope`` "machine": other processes' reads
    included).

    Returns:
        None when unknown or when nothing was read. Otherwise ``device``
        ("major:minor"), ``name``, ``scope``, ``seconds``, ``reads``, ``read_bytes``,
        ``reads_per_s``, ``mb_per_s`` (10^6 bytes), ``bytes_per_read``, ``busy`` (share
        of the interval the disk had reads or writes in flight, 0..1),
        ``limit_reads_per_s`` and ``limit_mb_per_s`` (the cgroup quota, None without).
    """
    if start is None or end is None:
        return None
    seconds = end.time_s - start.time_s
    best: tuple[int, str, _Dev, _Dev] | None = None
    for dev, e in end.devices.items():
        s = start.devices.get(dev)
        if s is None:
            continue
        nbytes = e.read_bytes - s.read_bytes
        if nbytes > 0 and (best is None or nbytes > best[0]):
            best = (nbytes, dev, s, e)
    if best is None or seconds <= 0:
        return None
    nbytes, dev, s, e = best
    reads = e.reads - s.reads
    scope = "machine"
    cg0, cg1 = start.cgroup.get(dev), end.cgroup.get(dev)
    if cg0 is not None and cg1 is not None and cg1[1] > cg0[1]:
        reads, nbytes, scope = cg1[0] - cg0[0], cg1[1] - cg0[1], "cgroup"
    iops, bps = io_limits(dev)
    return {
        "device": dev,
        "name": e.name,
        "scope": scope,
        "seconds": seconds,
        "reads": reads,
        "read_bytes": nbytes,
        "reads_per_s": reads / seconds,
        "mb_per_s": nbytes / 1e6 / seconds,
        "bytes_per_read": nbytes / reads if reads else 0.0,
        "busy": min(1.0, (e.busy_ms - s.busy_ms) / 1e3 / seconds),
        "limit_reads_per_s": iops,
        "limit_mb_per_s": None if bps is None else bps / 1e6,
    }
