"""Cold reads of :class:`~fastfeed.sources.lmdb.LMDBSource`: ``pread`` at the values' offsets.

:class:`_LMDBColdReads` is the source's layer that tells a cold call from a warm one
(``mincore`` probes with back-off), finds the map's base address and the values' file
offsets (:class:`~fastfeed.sources._lmdb_btree.RecordIndex`, verified against py-lmdb),
reads a cold call's values concurrently on the read pool, and reads runs of consecutive
records whole (one byte range each, in pieces) for block and sequential orders, also in
the background for :meth:`~fastfeed.sources.lmdb.LMDBSource.hint`.
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import lmdb

from fastfeed.errors import CorruptSourceError
from fastfeed.sources import _lmdb_io as io
from fastfeed.sources._lmdb_env import _EnvEntry, _LMDBEnv
from fastfeed.sources._lmdb_format import META_KEY
from fastfeed.sources._worker_pool import _WorkerPool

#: Records probed with mincore per read_many call to tell a warm batch from a cold one.
_PROBES = 8
#: Warm calls that skip the probes (doubling from 1) while every probe finds its pages.
_MAX_PROBE_SKIP = 16
#: Records this large on average are probed on every call: a cold batch taken for warm
#: is copied out of the memory map a page fault at a time, about 20 reads for an 80 KB
#: record instead of one (under a 400 IO/s quota: 91 records/s instead of 400), while 8
#: probes cost about 1% of copying such a batch. Smaller records fit in a page or two,
#: where a fault is one read per record, as a pread is.
_ALWAYS_PROBE_BYTES = 16 * 1024
#: A call reads whole runs when it needs at least this many records per run it touches
#: (block and sequential orders: 8 or more; a full shuffle of many runs: about 1).
_RUN_DENSITY = 3
#: Threads of a source's cold-read pool: enough outstanding requests to fill a disk queue.
_READ_THREADS = 16
_IDLE_S = 30.0  # an idle source's read threads end after this, seconds
#: Runs are read in pieces of this size, all at once on the read pool.
RUN_PIECE_BYTES = 1 << 20
#: Longest wait for a run another thread is reading, seconds.
_RUN_WAIT_S = 120.0


def _slice(chunks: dict[int, bytes], start: int, offset: int, size: int) -> bytes:
    """Bytes ``[offset, offset + size)`` of a run read in ``RUN_PIECE_BYTES`` pieces from
    ``start``."""
    lo = start + (offset - start) // RUN_PIECE_BYTES * RUN_PIECE_BYTES
    piece = chunks[lo]
    a = offset - lo
    if a + size <= len(piece):
        return piece[a : a + size]
    parts = [piece[a:]]
    need = size - len(parts[0])
    while need > 0:
        lo += RUN_PIECE_BYTES
        parts.append(chunks[lo][:need])
        need -= len(parts[-1])
    return b"".join(parts)


class _LMDBColdReads(_LMDBEnv):
    """The cold-read layer of :class:`~fastfeed.sources.lmdb.LMDBSource` (see there).

    ``run_bytes``, ``read_runs`` and ``_mean_record_bytes`` are set by
    ``LMDBSource.__init__``; the per-process state by :meth:`_init_runtime`.
    """

    run_bytes: int
    read_runs: bool
    _mean_record_bytes: float

    def _init_runtime(self) -> None:
        """Per-process state: the read pool (lazy), runs being read, probe back-off."""
        self._pool: _WorkerPool | None = None
        self._pool_lock = threading.Lock()
        self._runs_lock = threading.Lock()
        self._runs_reading: dict[int, threading.Event] = {}
        self._probe_skip = 0  # warm calls left that skip the mincore probes
        self._probe_backoff = 1
        #: Runs read whole / read record by record because their values were out of order.
        self.run_reads = 0
        self.unordered_runs = 0

    @property
    def mean_record_bytes(self) -> float:
        """Mean bytes per record (data file size / records)."""
        return self._mean_record_bytes

    @property
    def run_records(self) -> int:
        """Records per run: ``run_bytes`` of records of the mean size (at least 1)."""
        return max(1, round(self.run_bytes / max(1.0, self._mean_record_bytes)))

    # -- cold reads -------------------------------------------------------------------

    def _find_base(self, entry: _EnvEntry, txn: lmdb.Transaction) -> None:
        """Look up (once per map) where file offset 0 is mapped; None when unknown.

        Other threads wait for the answer (``entry.setup``): seeing "unknown" meanwhile
        would send their cold batches down the memory-map path, a page fault at a time.
        """
        if entry.base != -1:  # known already: no lock
            return
        with entry.setup:
            if entry.base == -1:
                entry.base = self._map_base(entry, txn)

    def _map_base(self, entry: _EnvEntry, txn: lmdb.Transaction) -> int | None:
        if entry.fd < 0:
            return None
        buf = txn.get(META_KEY) if self._keys is None else txn.get(self._keys[0])
        if not buf:
            return None
        addr = io.address_of(buf)
        base = io.map_base(addr, entry.inode)
        if base is None:
            return None
        probe = min(len(buf), 256)
        try:
            same = os.pread(entry.fd, probe, addr - base) == bytes(buf[:probe])
        except OSError:
            same = False
        return base if same else None

    def _record_index(self, entry: _EnvEntry, txn: lmdb.Transaction) -> io.RecordIndex | None:
        """The values' file offsets, built on first use and again when the tree changed.

        Verified once against py-lmdb (one record read both ways); None for a foreign
        LMDB or where the pages are not in the format it reads.
        """
        ix = entry.index
        if ix is False or self._keys is not None or entry.fd < 0:
            return None
        txnid = entry.env.info()["last_txnid"]
        if isinstance(ix, io.RecordIndex) and ix.txnid == txnid:
            return ix
        with entry.setup:  # one thread builds; the others wait for it, not "unknown"
            ix = entry.index
            if isinstance(ix, io.RecordIndex) and ix.txnid == txnid:
                return ix
            if ix is False:
                return None
            return self._build_index(entry, txn, txnid)

    def _build_index(
        self, entry: _EnvEntry, txn: lmdb.Transaction, txnid: int
    ) -> io.RecordIndex | None:
        """Build and verify the index (caller holds ``entry.setup``); ``entry.index``
        stays as it was while building, so readers outside the lock never see False for
        "being built"."""
        try:
            ix = io.RecordIndex(entry.fd, entry.psize, self._count)
            if ix.txnid != txnid:
                return None  # a writer committed meanwhile: try again next call
            probe = self._count - 1
            where = ix.locate(probe) if probe >= 0 else None
            value = txn.get(self.key(probe)) if probe >= 0 else None
            ok = (where is None) == (value is None)
            if ok and where is not None and value is not None:
                size = min(where[1], 256)
                ok = where[1] == len(value) and (
                    io.pread_exact(entry.fd, size, where[0]) == bytes(value[:size])
                )
        except (OSError, EOFError, ValueError):
            ok = False
        if not ok:
            entry.index = False  # not a format this reads: the memory-map path only
            return None
        entry.index = ix
        return ix

    def _cold(self, entry: _EnvEntry, indices: Sequence[int]) -> bool:
        """Whether some probed record of the call is not in the page cache.

        Probes up to 8 records (mincore at the value's place in the map, ~2 us each).
        After a warm verdict the next calls skip probing, 1, 2, 4 ... up to 16 of them
        (records under 16 KiB on average only); any cold verdict probes every call again.
        """
        n = len(indices)
        if n == 0 or entry.base is None:
            return False
        if self._probe_skip > 0 and self._mean_record_bytes < _ALWAYS_PROBE_BYTES:
            self._probe_skip -= 1
            return False
        step = max(1, n // _PROBES)
        with entry.env.begin(buffers=True) as txn:
            self._find_base(entry, txn)
            base = entry.base
            ix = self._record_index(entry, txn) if base is not None else None
        if ix is None or base is None:
            return False
        for i in indices[::step][:_PROBES]:
            # A leaf not read yet is itself a read: probe its page before reading it.
            leaf = ix.leaf_page(int(i))
            if leaf is not None and io.resident(base + leaf, entry.psize) is False:
                self._probe_backoff = 1
                return True
            where = ix.locate(int(i))
            if where is not None and io.resident(base + where[0], where[1]) is False:
                self._probe_backoff = 1
                return True
        self._probe_skip = self._probe_backoff
        self._probe_backoff = min(_MAX_PROBE_SKIP, 2 * self._probe_backoff)
        return False

    def release_mapped_pages(self) -> bool:
        """Unmap this process's view of the data's pages (``madvise(MADV_DONTNEED)``).

        The pages stay in the page cache and the next access maps them again; pages
        this process maps cannot be dropped from the cache (``posix_fadvise(DONTNEED)``
        skips them), so ``fastfeed bench --cold`` / ``profile --cold`` call this before
        dropping the file. Returns whether it was done (False: not open, map unknown).
        """
        entry = self._entry
        if entry is None or io.madvise is None:
            return False
        with entry.env.begin(buffers=True) as txn:
            self._find_base(entry, txn)
        base = entry.base
        if base is None or base < 0:
            return False
        return io.madvise(base, entry.need_bytes, mmap.MADV_DONTNEED) == 0

    def _read_pool(self) -> _WorkerPool:
        pool = self._pool
        if pool is None:
            with self._pool_lock:
                pool = self._pool
                if pool is None:
                    pool = _WorkerPool(_READ_THREADS, "lmdb-read", idle_s=_IDLE_S)
                    weakref.finalize(self, pool.close, 0.0)
                    self._pool = pool
        return pool

    def _group_runs(self, indices: Sequence[int]) -> dict[int, list[int]] | None:
        """Positions of the call by run, when the call needs enough records per run."""
        r = self.run_records
        if not self.read_runs or r <= 1 or len(indices) < _RUN_DENSITY:
            return None
        runs: dict[int, list[int]] = {}
        for pos, i in enumerate(indices):
            runs.setdefault(int(i) // r, []).append(pos)
        return runs if len(indices) >= _RUN_DENSITY * len(runs) else None

    def _read_cold(self, entry: _EnvEntry, indices: Sequence[int]) -> list[Any]:
        """Read the call's values concurrently: whole runs, or one ``pread`` per record."""
        ix = entry.index
        assert isinstance(ix, io.RecordIndex)
        out: list[Any] = [None] * len(indices)
        pool = self._read_pool()
        runs = self._group_runs(indices)
        rest = (
            list(range(len(indices)))
            if runs is None
            else self._read_runs(entry, ix, runs, indices, out)
        )
        if rest:
            values = pool.map(lambda k: self._read_value(entry, ix, indices[rest[k]]), len(rest))
            for pos, value in zip(rest, values, strict=True):
                out[pos] = value
        return out

    def _read_runs(
        self,
        entry: _EnvEntry,
        ix: io.RecordIndex,
        runs: dict[int, list[int]],
        indices: Sequence[int],
        out: list[Any],
    ) -> list[int]:
        """Read the byte range of every run the call needs; return the positions left.

        Each run's range is read in pieces of :data:`RUN_PIECE_BYTES` issued together on the
        read pool (measured here: 16 threads reading 4 MiB pieces with read-ahead off
        moved 514 MB/s, 1 MiB pieces 923 MB/s). A run another thread is reading is
        waited for, then its records are read from the page cache like the rest; so is a
        run already in the page cache, or one whose values are not in key order.
        """
        base = entry.base
        rest: list[int] = []
        waits: list[tuple[threading.Event, list[int]]] = []
        mine: list[tuple[int, threading.Event]] = []
        plans: list[tuple[int, int, list[int], list[tuple[int, int] | None]]] = []
        try:
            for run, positions in runs.items():
                ev, owner = self._claim_run(run)
                if not owner:
                    waits.append((ev, positions))
                    continue
                mine.append((run, ev))
                where = [ix.locate(int(indices[pos])) for pos in positions]
                span = self._run_range(ix, run, [w for w in where if w is not None])
                if span is None:
                    self.unordered_runs += 1
                    rest.extend(positions)
                    continue
                start, end = span
                if base is not None and base != -1 and io.resident(base + start, end - start):
                    rest.extend(positions)
                    continue
                plans.append((start, end, positions, where))
            pieces = [
                (k, lo, min(lo + RUN_PIECE_BYTES, end))
                for k, (start, end, _, _) in enumerate(plans)
                for lo in range(start, end, RUN_PIECE_BYTES)
            ]
            # os.pread, not readinto a bytearray: no zero-filling of the buffer first.
            got = self._read_pool().map(
                lambda j: self._pread(entry, pieces[j][2] - pieces[j][1], pieces[j][1]),
                len(pieces),
            )
            chunks: list[dict[int, bytes]] = [{} for _ in plans]
            for (k, lo, _), data in zip(pieces, got, strict=True):
                chunks[k][lo] = data
            for k, (start, _, positions, where) in enumerate(plans):
                self.run_reads += 1
                for pos, w in zip(positions, where, strict=True):
                    out[pos] = None if w is None else _slice(chunks[k], start, w[0], w[1])
        finally:
            for run, ev in mine:
                self._release_run(run, ev)
        for ev, positions in waits:
            ev.wait(_RUN_WAIT_S)
            rest.extend(positions)
        return rest

    def _preadinto(self, entry: _EnvEntry, view: memoryview, offset: int) -> None:
        got = 0
        try:
            while got < len(view):
                n = os.preadv(entry.fd, [view[got:]], offset + got)
                if n <= 0:
                    raise EOFError(f"file ends at {offset + got} bytes")
                got += n
        except (OSError, EOFError) as exc:
            raise CorruptSourceError(
                f"reading {len(view)} bytes at offset {offset} of LMDB {self.data_path} "
                f"failed: {exc}",
                path=self.path,
            ) from exc

    def _read_value(self, entry: _EnvEntry, ix: io.RecordIndex, index: int) -> bytes | None:
        """One value with one ``pread`` of its exact range (None: no such key)."""
        where = ix.locate(int(index))
        if where is None:
            return None
        return self._pread(entry, where[1], where[0]) if where[1] else b""

    def _run_range(
        self, ix: io.RecordIndex, run: int, extra: Sequence[tuple[int, int]] = ()
    ) -> tuple[int, int] | None:
        """File range ``[start, end)`` holding run ``run``'s values, if they look contiguous.

        From the run's first value to the end of its last one, widened to cover
        ``extra`` ``(offset, size)`` pairs (the values a call needs: a value small enough
        to live in a B-tree leaf sits in the leaf page, after its neighbours' overflow
        pages). None when the span is far larger than a run: not in key order.
        """
        r = self.run_records
        first = ix.locate(run * r)
        last = ix.locate(min(self._count, (run + 1) * r) - 1)
        if first is None or last is None:
            return None
        start, end = first[0], last[0] + last[1]
        for off, size in extra:
            start = min(start, off)
            end = max(end, off + size)
        # Values in key order span about run_bytes (plus B-tree pages between them).
        if end <= start or end - start > 4 * max(self.run_bytes, r * self._mean_record_bytes):
            return None
        return start, end

    def _claim_run(self, run: int) -> tuple[threading.Event, bool]:
        with self._runs_lock:
            ev = self._runs_reading.get(run)
            if ev is not None:
                return ev, False
            ev = self._runs_reading[run] = threading.Event()
            return ev, True

    def _release_run(self, run: int, ev: threading.Event) -> None:
        with self._runs_lock:
            if self._runs_reading.get(run) is ev:
                del self._runs_reading[run]
        ev.set()

    def _page_in_run(self, run: int) -> None:
        """Background job of :meth:`hint`: read a run into the page cache."""
        entry = self._entry
        ix = entry.index if entry is not None else None
        if entry is None or not isinstance(ix, io.RecordIndex) or entry.base in (None, -1):
            return
        base = entry.base
        ev, mine = self._claim_run(run)
        if not mine:
            return
        try:
            span = self._run_range(ix, run)
            if span is None or io.resident(base + span[0], span[1] - span[0]):
                return
            scratch = memoryview(bytearray(min(RUN_PIECE_BYTES, span[1] - span[0])))
            for lo in range(span[0], span[1], RUN_PIECE_BYTES):
                self._preadinto(entry, scratch[: min(RUN_PIECE_BYTES, span[1] - lo)], lo)
            self.run_reads += 1
        except (OSError, EOFError, ValueError, CorruptSourceError):
            pass  # advisory: the read reports real errors
        finally:
            self._release_run(run, ev)
