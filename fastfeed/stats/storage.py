"""Is the storage IOPS-bound? The disk's reads per second against its ceiling (pure).

A disk that counts operations (an HDD, a cloud volume or network disk with an IOPS quota)
caps random small-record reads at its operation rate, far below its bandwidth: more
threads and read-ahead hints do not help, reading runs of consecutive records with one
large request each does (``fastfeed pack`` + ``Loader(shuffle="block")``).

The rule (:func:`storage_summary`), from the disk counters the recorder took
(:func:`fastfeed._diskstats.storage_delta`):

- with a read quota known (the cgroup's ``riops``): **IOPS-bound** when the disk ran at
  >= 80% of its operation quota while reading at most 60% of its byte quota (or no byte
  quota is set);
- without one: **IOPS-bound** when the disk had requests in flight >= 80% of the time
  while each read fetched at most 256 KiB (small random reads keep a seeking disk busy).
- **bandwidth-bound** otherwise when reading at >= 80% of the byte quota, or (no quota)
  busy >= 80% of the time with larger reads: more threads cannot help either.

The predicted storage rate with block order: each operation reads
:data:`BLOCK_READ_BYTES`, at the same operation rate, capped by the byte quota; without a
byte quota the bandwidth is unknown and no rate is predicted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastfeed.sources._lmdb_cold import RUN_PIECE_BYTES

__all__ = ["BLOCK_READ_BYTES", "StorageSummary", "storage_summary"]

#: Bytes one request of a block-order run read fetches (the LMDB run reads' piece size).
BLOCK_READ_BYTES = RUN_PIECE_BYTES
_QUOTA_NEAR = 0.80  # share of the operation quota that counts as "at the ceiling"
_BANDWIDTH_SPARE = 0.60  # at most this share of the byte quota used: bandwidth to spare
_BUSY_FROM = 0.80  # share of time with requests in flight that counts as busy
_SMALL_READ = 256 << 10  # bytes per read at most, for "small random reads"
_MIN_READS = 20  # fewer reads say nothing


@dataclass(frozen=True)
class StorageSummary:
    """What the busiest disk did while the loader ran (machine-wide counts).

    Attributes:
        device: ``"major:minor"`` of the disk.
        name: The disk's kernel name (``"sda"``, ``"nvme0n1"``...).
        reads_per_s: Read operations completed per second.
        mb_per_s: Megabytes (10^6 bytes) read per second.
        bytes_per_read: Mean bytes per read operation.
        busy: Share of the time the disk had requests in flight (0..1).
        limit_reads_per_s: The read-operation quota of this process's cgroup (None: none).
        limit_mb_per_s: The read-bandwidth quota, MB/s (None: none).
        iops_bound: Reads are capped by the operation rate, not the bandwidth.
        bandwidth_bound: Reads are capped by the bandwidth: >= 80% of the byte quota,
            or (without one) the disk busy >= 80% of the time with reads over 256 KiB.
        reason: Why (or why not) it is IOPS-bound, in words.
        block_mb_per_s: Predicted MB/s reading runs of :data:`BLOCK_READ_BYTES` per
            request (None: the bandwidth is unknown).
    """

    device: str
    name: str
    reads_per_s: float
    mb_per_s: float
    bytes_per_read: float
    busy: float
    limit_reads_per_s: float | None
    limit_mb_per_s: float | None
    iops_bound: bool
    bandwidth_bound: bool
    reason: str
    block_mb_per_s: float | None

    def line(self) -> str:
        """One line: "disk vda: 400 reads/s of 78 KB (31 MB/s), quota 400 reads/s..."."""
        quota = []
        if self.limit_reads_per_s is not None:
            quota.append(f"{self.limit_reads_per_s:,.0f} reads/s")
        if self.limit_mb_per_s is not None:
            quota.append(f"{self.limit_mb_per_s:,.0f} MB/s")
        q = f", quota {' and '.join(quota)}" if quota else f", busy {100 * self.busy:.0f}%"
        return (
            f"disk {self.name}: {self.reads_per_s:,.0f} reads/s of "
            f"{self.bytes_per_read / 1e3:,.0f} KB ({self.mb_per_s:,.1f} MB/s){q}"
            f"{': IOPS-bound' if self.iops_bound else ''}"
            f"{': bandwidth-bound' if self.bandwidth_bound else ''}"
        )


def storage_summary(delta: Mapping[str, Any] | None) -> StorageSummary | None:
    """Classify a :func:`fastfeed._diskstats.storage_delta` dict; None when unknown."""
    if not delta or int(delta.get("reads", 0)) < _MIN_READS:
        return None
    reads_s = float(delta["reads_per_s"])
    mb_s = float(delta["mb_per_s"])
    per_read = float(delta["bytes_per_read"])
    busy = float(delta.get("busy", 0.0))
    lim_r = delta.get("limit_reads_per_s")
    lim_mb = delta.get("limit_mb_per_s")
    lim_r = None if lim_r is None else float(lim_r)
    lim_mb = None if lim_mb is None else float(lim_mb)
    if lim_r is not None:
        at_ceiling = reads_s >= _QUOTA_NEAR * lim_r
        spare = lim_mb is None or mb_s <= _BANDWIDTH_SPARE * lim_mb
        bound = at_ceiling and spare
        reason = (
            f"{reads_s:,.0f} reads/s is {100 * reads_s / lim_r:.0f}% of the quota of "
            f"{lim_r:,.0f} reads/s"
            + (f", {mb_s:,.1f} of {lim_mb:,.0f} MB/s" if lim_mb is not None else "")
        )
    else:
        bound = busy >= _BUSY_FROM and 0 < per_read <= _SMALL_READ
        reason = (
            f"the disk was busy {100 * busy:.0f}% of the time with reads of "
            f"{per_read / 1e3:,.0f} KB"
        )
    if lim_mb is not None:
        full = mb_s >= _QUOTA_NEAR * lim_mb
    else:
        full = lim_r is None and busy >= _BUSY_FROM and per_read > _SMALL_READ
    if full and not bound:
        reason = (
            f"{mb_s:,.1f} MB/s is {100 * mb_s / lim_mb:.0f}% of the quota of {lim_mb:,.0f} MB/s"
            if lim_mb is not None
            else f"the disk was busy {100 * busy:.0f}% of the time with reads of "
            f"{per_read / 1e3:,.0f} KB"
        )
    block = None
    if lim_mb is not None:
        ops = lim_r if lim_r is not None else reads_s
        block = min(ops * BLOCK_READ_BYTES / 1e6, lim_mb)
    return StorageSummary(
        device=str(delta["device"]),
        name=str(delta.get("name", delta["device"])),
        reads_per_s=reads_s,
        mb_per_s=mb_s,
        bytes_per_read=per_read,
        busy=busy,
        limit_reads_per_s=lim_r,
        limit_mb_per_s=lim_mb,
        iops_bound=bound,
        bandwidth_bound=full and not bound,
        reason=reason,
        block_mb_per_s=block,
    )
