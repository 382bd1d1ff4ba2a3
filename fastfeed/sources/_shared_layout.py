"""The shared cache segment's layout: header, counter slots, record table, data region.

Little endian. A 4 KiB header (magic, layout version, key, record count, capacity, the
allocator's used bytes, fill totals, and the counter totals of processes that left), then
:data:`MAX_PROCS` counter slots of :data:`SLOT_WORDS` u64 each, the record table (state
``u8[n]``, offset ``u64[n]``, length ``u64[n]``, label ``i64[n]``), then the data region
of ``capacity`` bytes. The file is sparse: untouched pages cost nothing.

This module computes where each part lies (:class:`SegmentLayout`), creates a segment
(:func:`create_segment`), recognises one (:func:`is_segment`), maps one
(:func:`map_segment`), and checks that one fits the machine (:func:`check_memory`). The
design is described in :mod:`fastfeed.sources.shared_cache`.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import NamedTuple

from fastfeed._size import format_size
from fastfeed.errors import ConfigError

__all__ = [
    "COUNTERS",
    "COUNTER_WORD",
    "EMPTY",
    "HEADER_BYTES",
    "H_ENOMEM",
    "H_FILLED",
    "H_FILLED_BYTES",
    "H_N",
    "H_RETIRED",
    "H_SKIPPED",
    "H_USED",
    "LAYOUT_VERSION",
    "MAGIC",
    "MAX_PROCS",
    "NO_LABEL",
    "PID_WORD",
    "READY",
    "SKIP",
    "SLOT_WORDS",
    "SegmentLayout",
    "SegmentViews",
    "check_memory",
    "create_segment",
    "is_segment",
    "map_segment",
]

#: Version of the segment layout; part of every key, so an incompatible fastfeed never
#: attaches to another's segment.
LAYOUT_VERSION = 1

MAGIC = b"FFSHCACH"
HEADER_BYTES = 4096
MAX_PROCS = 256  # counter slots: processes attached at once with their own counters
SLOT_WORDS = 16  # u64 per slot
NO_LABEL = -(2**63)  # the label word of a record without a label

#: Record states (one byte per record in the table).
EMPTY, READY, SKIP = 0, 1, 2

# Header words (u64 index into the header). Bytes 0-7: magic; word 1: layout version;
# bytes 16-47: the key.
H_N, H_CAP, H_USED, H_FILLED, H_FILLED_BYTES, H_SKIPPED, H_ENOMEM = 8, 9, 10, 11, 12, 13, 14
H_RETIRED = 16  # 16 + counter index: totals of processes that left

# Counter slot words: the owner's pid, then one word per counter.
PID_WORD = 0
COUNTERS = (
    "hits",
    "misses",
    "hit_bytes",
    "storage_reads",
    "storage_bytes",
    "fills",
    "fill_bytes",
    "waits",
    "reclaims",
    "read_through",
)
COUNTER_WORD = {name: 1 + k for k, name in enumerate(COUNTERS)}


def _align(n: int, to: int = 64) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class SegmentLayout:
    """Where each part of a segment of ``n`` records and ``capacity`` data bytes lies.

    Attributes:
        n: Records of the source.
        capacity: Bytes of record data the segment holds.
        table_off: Offset of the record states (``u8[n]``), bytes.
        offs_off: Offset of the record offsets (``u64[n]``), bytes.
        lens_off: Offset of the record lengths (``u64[n]``), bytes.
        labels_off: Offset of the record labels (``i64[n]``), bytes.
        data_off: Offset of the data region (page aligned), bytes.
        total_bytes: Size of the whole segment, bytes.
    """

    n: int
    capacity: int
    table_off: int
    offs_off: int
    lens_off: int
    labels_off: int
    data_off: int
    total_bytes: int

    @classmethod
    def of(cls, n: int, capacity: int) -> SegmentLayout:
        """The layout for ``n`` records and ``capacity`` bytes of data."""
        table_off = HEADER_BYTES + MAX_PROCS * SLOT_WORDS * 8
        offs_off = _align(table_off + n, 8)
        lens_off = offs_off + 8 * n
        labels_off = lens_off + 8 * n
        data_off = _align(labels_off + 8 * n, 4096)
        return cls(
            n=n,
            capacity=capacity,
            table_off=table_off,
            offs_off=offs_off,
            lens_off=lens_off,
            labels_off=labels_off,
            data_off=data_off,
            total_bytes=data_off + capacity,
        )


class SegmentViews(NamedTuple):
    """A mapped segment and typed views of its parts (all over one ``mmap``)."""

    mm: mmap.mmap
    whole: memoryview  # bytes of the whole segment, writable
    header: memoryview  # u64 words
    slots: memoryview  # u64 words: MAX_PROCS slots of SLOT_WORDS
    states: memoryview  # u8 per record
    offs: memoryview  # u64 per record: offset of its bytes in the segment
    lens: memoryview  # u64 per record: its length, bytes
    labels: memoryview  # i64 per record: its label, or NO_LABEL
    ro: memoryview  # bytes of the whole segment, read-only: what hits slice


def create_segment(key: str, layout: SegmentLayout) -> int:
    """A new anonymous memfd holding an empty segment; returns its descriptor.

    The magic is written last: a segment that has it is complete.
    """
    fd = os.memfd_create(f"fastfeed-cache-{key}", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, layout.total_bytes)
        header = bytearray(HEADER_BYTES)
        struct.pack_into("<Q", header, 8, LAYOUT_VERSION)
        header[16:48] = key.encode()
        struct.pack_into("<QQ", header, 8 * H_N, layout.n, layout.capacity)
        os.pwrite(fd, bytes(header), 0)
        os.pwrite(fd, MAGIC, 0)  # last: a segment with the magic is complete
    except BaseException:
        os.close(fd)
        raise
    return fd


def is_segment(fd: int, key: str, total_bytes: int) -> bool:
    """Whether ``fd`` is a complete segment of ``key`` and ``total_bytes`` bytes."""
    try:
        head = os.pread(fd, 64, 0)
        size = os.fstat(fd).st_size
    except OSError:
        return False
    return head[:8] == MAGIC and head[16:48] == key.encode() and size == total_bytes


def map_segment(fd: int, layout: SegmentLayout) -> SegmentViews:
    """Map the segment behind ``fd`` and cut it into its parts."""
    mm = mmap.mmap(fd, layout.total_bytes)
    mv = memoryview(mm)
    n = layout.n
    return SegmentViews(
        mm=mm,
        whole=mv,
        header=mv[:HEADER_BYTES].cast("Q"),
        slots=mv[HEADER_BYTES : layout.table_off].cast("Q"),
        states=mv[layout.table_off : layout.table_off + n],
        offs=mv[layout.offs_off : layout.lens_off].cast("Q"),
        lens=mv[layout.lens_off : layout.labels_off].cast("Q"),
        labels=mv[layout.labels_off : layout.labels_off + 8 * n].cast("q"),
        # Hits are read-only slices: no copy, and nobody can scribble on the shared copy
        # through a record.
        ro=mv.toreadonly(),
    )


def check_memory(total: int, capacity: int) -> None:
    """Refuse a segment of ``total`` bytes larger than the machine's memory.

    Raises:
        ConfigError: ``total`` exceeds ``MemTotal`` of ``/proc/meminfo``.
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = dict(line.split(":", 1) for line in f)
        mem_total = int(info["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return
    if total > mem_total:
        raise ConfigError(
            f"MemoryCache(shared=True, capacity={format_size(capacity)}) needs "
            f"{format_size(total)} of shared memory, more than this machine's "
            f"{format_size(mem_total)}; lower the capacity"
        )
