"""One RAM cache per machine: the shared store behind ``MemoryCache(..., shared=True)``.

Every process that opens the same source (same :func:`source_identity`) with the same
capacity finds one segment of shared memory and fills it once; worker processes and DDP
ranks on the node read each other's records.

Design, and why
---------------
**Backing: an anonymous ``memfd``, never a file in /dev/shm.** A memfd has no name, so
nothing can be left behind: the kernel frees it when the last process holding a
descriptor or a mapping exits, also after SIGKILL. Hits are read-only ``memoryview``
slices of the mapping (no copy): a record still referenced keeps the mapping, and the
descriptor Python's ``mmap`` duplicates, alive after :meth:`SharedStore.detach`.
A memfd is not limited by the size of /dev/shm (Docker's 64 MB default does not apply),
only by memory; pages are reserved with ``posix_fallocate`` as records are placed, so
running out of memory is an ``ENOMEM`` warned about with the size needed (the records
are then read through), never a SIGBUS.

**Finding it: abstract-namespace unix socket names as a directory.** Each attached process
binds ``\\0fastfeed-cache/<key>/<pid>/<fd>`` (an abstract name: no file, released by the
kernel when the process dies). A newcomer lists ``/proc/net/unix``, opens
``/proc/<pid>/fd/<fd>`` of any live holder (as the worker ring in
:mod:`fastfeed.workers.shm` does) and checks the segment's magic and key. Creation is
serialised by binding ``\\0fastfeed-cache/<key>/create`` (atomic, also released on death).
A rank that restarts finds the segment again as long as one process still holds it.

**Claims: POSIX record locks on the memfd, one byte per record.** The first epoch's fill
is split: a process that misses record ``i`` takes a non-blocking ``lockf`` on byte
``2**51 + i`` of the segment, reads the record from storage, copies it in and publishes
it; another process that misses ``i`` meanwhile waits for the publication instead of
reading storage. The kernel drops the locks of a process that dies, so a writer killed
mid-fill leaves its records unpublished and claimable: the waiter takes the claim over
(``reclaims``), no timeout needed. A claimant that hangs is waited for at most
``claim_timeout_s``; then the record is read through. Threads of one process (which
POSIX locks do not tell apart) coordinate through an in-process table. POSIX locks are
dropped when the process closes *any* descriptor of the file: so there is one attachment
per process and key (:func:`attach`), and candidate descriptors are only opened and
closed before this process holds locks on that segment. (One gap: records kept after
:meth:`SharedStore.detach` keep Python's duplicate descriptor; if the process re-attaches
to the same segment and later drops them, its locks go, and another process may adopt its
counter slot or fill a record it is filling, with identical bytes.)

**Publishing: a record is visible only once complete.** The filler copies the bytes,
writes offset, length and label, and only then sets the record's one-byte state to
READY. A reader checks that byte first. x86 keeps stores in order (and the reader's loads
in order); on weaker memory models the lock and GIL operations around both sides act as
barriers. A writer killed between placing and publishing wastes the bytes it had placed
(bounded by one ``read_many``); the record stays EMPTY.

**Policy: static fill-once.** Space is handed out by a bump allocator under a record lock
on the header; a record that does not fit in what is left is marked SKIP and is read
through from then on, by every process. So the hit rate is fixed at the cached fraction,
as with the in-process static cache; there is no eviction.

**Statistics.** Each process owns a slot of counters in the segment (claimed with a lock
held for its lifetime); machine-wide figures are the sum of the live slots plus the totals
that exited or killed processes left (folded in by whoever reuses their slot).

Segment layout (little endian): a 4 KiB header, ``MAX_PROCS`` counter slots, the record
table (state ``u8[n]``, offset ``u64[n]``, length ``u64[n]``, label ``i64[n]``), then the
data region of ``capacity`` bytes. The file is sparse: untouched pages cost nothing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import socket
import struct
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no shared cache (MemoryCache(shared=True) says so)
    fcntl = None  # type: ignore[assignment]

from fastfeed._size import format_size
from fastfeed.errors import ConfigError
from fastfeed.sources.base import Record, Source

__all__ = [
    "LAYOUT_VERSION",
    "SharedStore",
    "attach",
    "list_segments",
    "segment_key",
    "source_identity",
]

#: Version of the segment layout; part of every key, so an incompatible fastfeed never
#: attaches to another's segment.
LAYOUT_VERSION = 1

_MAGIC = b"FFSHCACH"
_HEADER_BYTES = 4096
MAX_PROCS = 256  # counter slots: processes attached at once with their own counters
_SLOT_WORDS = 16  # u64 per slot
_NO_LABEL = -(2**63)

EMPTY, READY, SKIP = 0, 1, 2

# Header words (u64 index into the header)
_H_N, _H_CAP, _H_USED, _H_FILLED, _H_FILLED_BYTES, _H_SKIPPED, _H_ENOMEM = 8, 9, 10, 11, 12, 13, 14
_H_RETIRED = 16  # 16 + counter index: totals of processes that left
# Counter slot words
_PID = 0
_COUNTERS = (
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
_C = {name: 1 + k for k, name in enumerate(_COUNTERS)}

# Lock offsets (record locks may lie beyond the end of the file).
_ALLOC_LOCK = 1 << 50
_SLOT_LOCK = (1 << 50) + 16
_RECORD_LOCK = 1 << 51

_PREFIX = "fastfeed-cache/"


def _align(n: int, to: int = 64) -> int:
    return (n + to - 1) // to * to


def source_identity(source: Source) -> tuple[Any, ...] | None:
    """What makes ``source`` the same data in another process, or ``None``.

    Calls ``source.identity()``; sources that do not implement it are not shareable. An
    :class:`~fastfeed.sources.lmdb.LMDBSource` is recognised here too (its path, data
    file size and modification time, and its format version).
    """
    ident = source.identity()
    if ident is not None:
        return ident
    from fastfeed.sources.lmdb import FORMAT_VERSION, LMDBSource

    if isinstance(source, LMDBSource):
        st = os.stat(source.data_path)
        return (
            "LMDBSource",
            os.path.realpath(source.path),
            st.st_size,
            st.st_mtime_ns,
            FORMAT_VERSION,
            len(source),
        )
    return None


def segment_key(identity: tuple[Any, ...], n: int, capacity: int) -> str:
    """The 32-hex-digit name of the segment for a source identity and a capacity."""
    text = repr((LAYOUT_VERSION, identity, n, capacity)).encode()
    return hashlib.sha256(text).hexdigest()[:32]


def list_segments() -> dict[str, list[tuple[int, int]]]:
    """Shared cache segments alive on this machine: key -> ``[(pid, fd), ...]`` holders."""
    out: dict[str, list[tuple[int, int]]] = {}
    try:
        with open("/proc/net/unix", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return out
    tag = "@" + _PREFIX
    for line in lines:
        parts = line.split()
        if len(parts) < 8 or not parts[7].startswith(tag):
            continue
        fields = parts[7][len(tag) :].split("/")
        if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
            out.setdefault(fields[0], []).append((int(fields[1]), int(fields[2])))
    return out


def _lock(fd: int, offset: int, *, wait: bool = False) -> bool:
    flags = fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB
    try:
        fcntl.lockf(fd, flags, 1, offset, os.SEEK_SET)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _unlock(fd: int, offset: int) -> None:
    fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset, os.SEEK_SET)


def _bind_abstract(name: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind("\0" + name)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            return None
        raise
    return sock


class SharedStore:
    """This process's attachment to one machine-wide cache segment (thread-safe).

    Args:
        key: Segment key (:func:`segment_key`).
        n: Records of the source.
        capacity: Bytes of record data the segment holds.
        claim_timeout_s: Longest wait for a record another live process is filling
            before reading it through, seconds.
        attach_timeout_s: Longest wait to find or create the segment, seconds.

    Attributes:
        key: The segment's key.
        created: Whether this process created the segment (False: it attached).
        total_bytes: Size of the segment (header, counters, record table, data), bytes.

    Raises:
        ConfigError: Not Linux (no memfd), or ``capacity`` larger than the machine's memory.
    """

    def __init__(
        self,
        key: str,
        n: int,
        capacity: int,
        *,
        claim_timeout_s: float = 60.0,
        attach_timeout_s: float = 30.0,
    ) -> None:
        if not hasattr(os, "memfd_create") or fcntl is None:
            raise ConfigError("MemoryCache(shared=True) needs Linux (memfd_create)")
        self.key = key
        self.n = n
        self.capacity = capacity
        self.claim_timeout_s = claim_timeout_s
        self._table_off = _HEADER_BYTES + MAX_PROCS * _SLOT_WORDS * 8
        self._offs_off = _align(self._table_off + n, 8)
        self._lens_off = self._offs_off + 8 * n
        self._labels_off = self._lens_off + 8 * n
        self._data_off = _align(self._labels_off + 8 * n, 4096)
        self.total_bytes = self._data_off + capacity
        _check_memory(self.total_bytes, capacity)
        self._tlock = threading.Lock()
        self._inflight: dict[int, threading.Event] = {}
        self._fd = -1
        self._warned = False
        self._attach(attach_timeout_s)
        self._finalizer = weakref.finalize(self, _release, self._resources)

    # -- attaching -------------------------------------------------------------------------

    def _attach(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            fd = self._open_existing()
            if fd is None:
                guard = _bind_abstract(f"{_PREFIX}{self.key}/create")
                if guard is not None:
                    try:
                        fd = self._open_existing()
                        created = fd is None
                        if created:
                            fd = self._create()
                        self._map(fd)
                        self._register()
                    finally:
                        guard.close()
                    self.created = created
                    return
            else:
                self._map(fd)
                self._register()
                self.created = False
                return
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"shared cache {self.key}: could not find or create the segment in "
                    f"{timeout_s:.0f} s (another process holds the creation lock)"
                )
            time.sleep(0.005)

    def _open_existing(self) -> int | None:
        for pid, pfd in list_segments().get(self.key, []):
            try:
                fd = os.open(f"/proc/{pid}/fd/{pfd}", os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue  # the holder just exited
            if self._verify(fd):
                return fd
            os.close(fd)
        return None

    def _verify(self, fd: int) -> bool:
        try:
            head = os.pread(fd, 64, 0)
            size = os.fstat(fd).st_size
        except OSError:
            return False
        return head[:8] == _MAGIC and head[16:48] == self.key.encode() and size == self.total_bytes

    def _create(self) -> int:
        fd = os.memfd_create(f"fastfeed-cache-{self.key}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, self.total_bytes)
            header = bytearray(_HEADER_BYTES)
            struct.pack_into("<Q", header, 8, LAYOUT_VERSION)
            header[16:48] = self.key.encode()
            struct.pack_into("<QQ", header, 8 * _H_N, self.n, self.capacity)
            os.pwrite(fd, bytes(header), 0)
            os.pwrite(fd, _MAGIC, 0)  # last: a segment with the magic is complete
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _map(self, fd: int) -> None:
        self._fd = fd
        self._mm = mmap.mmap(fd, self.total_bytes)
        mv = memoryview(self._mm)
        self._header = mv[:_HEADER_BYTES].cast("Q")
        self._slots = mv[_HEADER_BYTES : self._table_off].cast("Q")
        self._states = mv[self._table_off : self._table_off + self.n]
        self._offs = mv[self._offs_off : self._lens_off].cast("Q")
        self._lens = mv[self._lens_off : self._labels_off].cast("Q")
        self._labels = mv[self._labels_off : self._labels_off + 8 * self.n].cast("q")
        # Hits are read-only slices: no copy, and nobody can scribble on the shared copy
        # through a record.
        self._ro = mv.toreadonly()
        # What the finalizer releases; it must not refer to self (or it would keep it alive).
        self._resources: dict[str, Any] = {
            "fd": fd,
            "mm": self._mm,
            "header": self._header,
            "slots": self._slots,
            "views": [self._states, self._offs, self._lens, self._labels, self._ro, mv],
            "sock": None,
            "slot": None,
            "pid": None,
        }

    def _register(self) -> None:
        """Take a counter slot and advertise this process as a holder."""
        self._pid = os.getpid()
        self._slot: int | None = None
        self._local = [0] * (1 + len(_COUNTERS))  # counters when no slot is free
        for s in range(MAX_PROCS):
            if _lock(self._fd, _SLOT_LOCK + s):
                _with_alloc_lock(self._fd, lambda s=s: _adopt_slot(self._header, self._slots, s))
                self._slot = s
                break
        sock = _bind_abstract(f"{_PREFIX}{self.key}/{self._pid}/{self._fd}")
        self._resources.update(slot=self._slot, pid=self._pid, sock=sock)

    def after_fork(self) -> None:
        """In a forked child: new locks, a counter slot and a holder name of its own."""
        if self._pid == os.getpid() or not self._resources:
            return
        self._tlock = threading.Lock()
        self._inflight = {}
        sock = self._resources.get("sock")
        if sock is not None:
            sock.close()  # our copy only: the parent's stays bound while it lives
        self._register()

    def _with_alloc_lock(self, fn: Callable[[], Any]) -> Any:
        return _with_alloc_lock(self._fd, fn)

    def _count(self, name: str, amount: int) -> None:
        # Called under self._tlock: this process is the only writer of its slot.
        if self._slot is None:
            self._local[_C[name]] += amount
        else:
            self._slots[self._slot * _SLOT_WORDS + _C[name]] += amount

    # -- reading ---------------------------------------------------------------------------

    def state(self, index: int) -> int:
        """EMPTY (0), READY (1) or SKIP (2)."""
        return self._states[index]

    def read_many(self, indices: Sequence[int], source: Source) -> list[Record]:
        """Records ``indices``: hits from the segment, misses filled (once per machine)."""
        states, offs, lens, labels, mm = (
            self._states,
            self._offs,
            self._lens,
            self._labels,
            self._ro,
        )
        recs: list[Any] = [None] * len(indices)
        missing: list[int] = []
        hit_bytes = 0
        for k, i in enumerate(indices):
            if states[i] == READY:
                off = offs[i]
                ln = lens[i]
                lab = labels[i]
                recs[k] = Record(mm[off : off + ln], None if lab == _NO_LABEL else lab)
                hit_bytes += ln
            else:
                missing.append(k)
        with self._tlock:
            self._count("hits", len(indices) - len(missing))
            self._count("hit_bytes", hit_bytes)
            self._count("misses", len(missing))
        if missing:
            self._fill(indices, missing, recs, source, wait=True)
        return recs

    def _get(self, i: int) -> Record:
        off = self._offs[i]
        lab = self._labels[i]
        data = self._ro[off : off + self._lens[i]]
        return Record(data, None if lab == _NO_LABEL else lab)

    def _fill(
        self,
        indices: Sequence[int],
        missing: list[int],
        recs: list[Any],
        source: Source,
        *,
        wait: bool,
    ) -> int:
        """Fill ``recs[k]`` for ``k`` in ``missing``; returns records this process placed."""
        fd = self._fd
        mine: list[int] = []  # positions whose record this process claimed
        through: list[int] = []  # positions read from storage without caching
        others: list[int] = []  # positions another thread or process is filling
        with self._tlock:
            for k in missing:
                i = indices[k]
                st = self._states[i]
                if st == READY:
                    recs[k] = self._get(i)
                elif st == SKIP:
                    through.append(k)
                elif i in self._inflight:
                    others.append(k)
                elif _lock(fd, _RECORD_LOCK + i):
                    st = self._states[i]  # again: it may have changed before the claim
                    if st != EMPTY:
                        _unlock(fd, _RECORD_LOCK + i)
                        if st == READY:
                            recs[k] = self._get(i)
                        else:
                            through.append(k)
                    else:
                        self._inflight[i] = threading.Event()
                        mine.append(k)
                else:
                    others.append(k)
        placed = 0
        claimed = [indices[k] for k in mine]
        try:
            todo = mine + through if wait else mine
            if todo:
                fetched = source.read_many([indices[k] for k in todo])
                nbytes = 0
                for k, rec in zip(todo, fetched, strict=True):
                    recs[k] = rec
                    nbytes += len(rec.data)
                with self._tlock:
                    self._count("storage_reads", len(todo))
                    self._count("storage_bytes", nbytes)
                    self._count("read_through", len(through) if wait else 0)
                placed = self._place([(indices[k], recs[k]) for k in mine])
        finally:
            with self._tlock:
                for i in claimed:
                    _unlock(fd, _RECORD_LOCK + i)
                    ev = self._inflight.pop(i, None)
                    if ev is not None:
                        ev.set()
        if others and wait:
            self._wait_for(indices, others, recs, source)
        return placed

    def _place(self, items: list[tuple[int, Record]]) -> int:
        """Copy claimed records into the segment and publish them; returns records placed."""
        if not items:
            return 0
        header = self._header
        spots: list[tuple[int, int, Record]] = []
        skipped: list[int] = []

        def allocate() -> None:
            used = header[_H_USED]
            for i, rec in items:
                size = len(rec.data)
                if used + size <= self.capacity:
                    spots.append((i, self._data_off + used, rec))
                    used += size  # packed: the budget counts record bytes, as in-process
                else:
                    skipped.append(i)
            header[_H_USED] = used

        self._with_alloc_lock(allocate)
        if spots:
            lo = spots[0][1]
            hi = spots[-1][1] + len(spots[-1][2].data)
            try:
                if hi > lo:
                    os.posix_fallocate(self._fd, lo, hi - lo)
            except OSError as exc:
                self._note_no_memory(hi - lo, exc)
                skipped.extend(i for i, _, _ in spots)
                spots = []
        mm, offs, lens, labels, states = (
            self._mm,
            self._offs,
            self._lens,
            self._labels,
            self._states,
        )
        nbytes = 0
        for i, off, rec in spots:
            data = rec.data
            ln = len(data)
            mm[off : off + ln] = data
            offs[i] = off
            lens[i] = ln
            labels[i] = _NO_LABEL if rec.label is None else int(rec.label)
            states[i] = READY  # publish: only now can anyone read it
            nbytes += ln
        for i in skipped:
            states[i] = SKIP

        def account() -> None:
            header[_H_FILLED] += len(spots)
            header[_H_FILLED_BYTES] += nbytes
            header[_H_SKIPPED] += len(skipped)

        self._with_alloc_lock(account)
        with self._tlock:
            self._count("fills", len(spots))
            self._count("fill_bytes", nbytes)
        return len(spots)

    def _note_no_memory(self, need: int, exc: OSError) -> None:
        self._with_alloc_lock(lambda: _header_add(self._header, _H_ENOMEM, need))
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"shared cache {self.key}: could not reserve {format_size(need)} of shared "
                f"memory ({exc.strerror}); the segment needs up to "
                f"{format_size(self.total_bytes)} in all. Records that do not fit are read "
                "from storage; lower the capacity or free memory",
                UserWarning,  # ResourceWarning is hidden by default: this must be seen
                stacklevel=4,
            )

    def _wait_for(
        self, indices: Sequence[int], others: list[int], recs: list[Any], source: Source
    ) -> None:
        """Wait for records other threads or processes are filling; take over dead claims."""
        deadline = time.monotonic() + self.claim_timeout_s
        pending = list(others)
        with self._tlock:
            self._count("waits", len(pending))
        pause = 0.0005
        while pending:
            retry: list[int] = []
            for k in pending:
                i = indices[k]
                st = self._states[i]
                if st == READY:
                    recs[k] = self._get(i)
                elif st == SKIP:
                    retry.append(k)  # read through below
                else:
                    with self._tlock:
                        ev = self._inflight.get(i)
                    if ev is None and _lock(self._fd, _RECORD_LOCK + i):
                        # The claimant released without publishing: it died or gave up.
                        _unlock(self._fd, _RECORD_LOCK + i)
                        retry.append(k)
                    else:
                        continue
            if retry:
                with self._tlock:
                    self._count(
                        "reclaims", sum(1 for k in retry if self._states[indices[k]] == EMPTY)
                    )
                self._fill(indices, retry, recs, source, wait=True)
            pending = [k for k in pending if recs[k] is None]
            if not pending:
                return
            if time.monotonic() > deadline:
                fetched = source.read_many([indices[k] for k in pending])
                for k, rec in zip(pending, fetched, strict=True):
                    recs[k] = rec
                with self._tlock:
                    self._count("read_through", len(pending))
                    self._count("storage_reads", len(pending))
                    self._count("storage_bytes", sum(len(r.data) for r in fetched))
                return
            time.sleep(pause)
            pause = min(pause * 2, 0.01)

    def preload(self, indices: Sequence[int], source: Source) -> int:
        """Claim and fill what no one else is filling; never waits. Returns records placed."""
        todo = [k for k, i in enumerate(indices) if self._states[i] == EMPTY]
        recs: list[Any] = [None] * len(indices)
        return self._fill(indices, todo, recs, source, wait=False)

    def full(self) -> bool:
        """No record placed from now on would fit (less than 1 byte left)."""
        return self._header[_H_USED] >= self.capacity

    # -- statistics -------------------------------------------------------------------------

    def process_counters(self) -> dict[str, int]:
        """This process's counters."""
        with self._tlock:
            if self._slot is None:
                vals = self._local
            else:
                base = self._slot * _SLOT_WORDS
                vals = self._slots[base : base + _SLOT_WORDS].tolist()
        return {name: int(vals[_C[name]]) for name in _COUNTERS}

    def machine_counters(self) -> dict[str, Any]:
        """Machine-wide counters: every process attached now plus those that left."""
        header, slots = self._header, self._slots
        totals = {name: int(header[_H_RETIRED + k]) for k, name in enumerate(_COUNTERS)}
        attached = 0
        for s in range(MAX_PROCS):
            base = s * _SLOT_WORDS
            pid = int(slots[base + _PID])
            if pid:
                attached += os.path.exists(f"/proc/{pid}")  # a killed one's slot stays
                for name in _COUNTERS:
                    totals[name] += int(slots[base + _C[name]])
        filled = int(header[_H_FILLED])
        totals.update(
            processes=attached,
            records=self.n,
            filled_records=filled,
            filled_bytes=int(header[_H_FILLED_BYTES]),
            skipped_records=int(header[_H_SKIPPED]),
            fill_fraction=filled / self.n if self.n else 0.0,
            used_bytes=int(header[_H_USED]),
            capacity_bytes=self.capacity,
            segment_bytes=self.total_bytes,
            unreserved_bytes=int(header[_H_ENOMEM]),
        )
        return totals

    def reset_counters(self) -> None:
        """Zero this process's counters (machine-wide totals keep what others counted)."""
        with self._tlock:
            if self._slot is None:
                self._local = [0] * len(self._local)
            else:
                base = self._slot * _SLOT_WORDS
                for k in range(1, 1 + len(_COUNTERS)):
                    self._slots[base + k] = 0

    def detach(self) -> None:
        """Leave the segment: fold this process's counters, drop the holder name and map."""
        with self._tlock:
            self._finalizer()


_STORES: weakref.WeakValueDictionary[str, SharedStore] = weakref.WeakValueDictionary()
_STORES_LOCK = threading.Lock()


def attach(key: str, n: int, capacity: int, **kw: Any) -> SharedStore:
    """This process's :class:`SharedStore` for ``key`` (one per process and key).

    One per process, because POSIX record locks belong to a process: two attachments of
    one process would share claims and counter slots.
    """
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is None or not store._resources:
            store = SharedStore(key, n, capacity, **kw)
            _STORES[key] = store
        return store


def _header_add(header: memoryview, word: int, amount: int) -> None:
    header[word] += amount


# POSIX record locks exclude other processes, not other threads of this one: the header
# lock is taken under this process-wide lock too.
_HEADER_TLOCK = threading.Lock()


def _new_header_tlock() -> None:
    global _HEADER_TLOCK, _STORES_LOCK
    # A thread of the parent may have held them at fork.
    _HEADER_TLOCK = threading.Lock()
    _STORES_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_header_tlock)


def _with_alloc_lock(fd: int, fn: Callable[[], Any]) -> Any:
    with _HEADER_TLOCK:
        _lock(fd, _ALLOC_LOCK, wait=True)
        try:
            return fn()
        finally:
            _unlock(fd, _ALLOC_LOCK)


def _adopt_slot(header: memoryview, slots: memoryview, s: int) -> None:
    """Fold slot ``s``'s counters into the header's totals and give it to this process."""
    base = s * _SLOT_WORDS
    if slots[base + _PID]:
        # Left by a process that died (or exited without folding): keep its counts.
        for k in range(1, 1 + len(_COUNTERS)):
            header[_H_RETIRED + k - 1] += slots[base + k]
    for k in range(_SLOT_WORDS):
        slots[base + k] = 0
    slots[base + _PID] = os.getpid()


def _release(res: dict[str, Any]) -> None:
    if not res:
        return
    slot, fd = res.get("slot"), res.get("fd", -1)
    if slot is not None and res.get("pid") == os.getpid():
        header, slots = res["header"], res["slots"]
        with contextlib.suppress(OSError):
            _with_alloc_lock(fd, lambda: _adopt_slot(header, slots, slot))
            slots[slot * _SLOT_WORDS + _PID] = 0
    sock = res.get("sock")
    if sock is not None:
        sock.close()
    for view in [*res.get("views", []), res.get("header"), res.get("slots")]:
        if view is None:
            continue
        with contextlib.suppress(BufferError):
            view.release()
    mm = res.get("mm")
    if mm is not None:
        with contextlib.suppress(BufferError):
            mm.close()
    fd = res.get("fd", -1)
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)  # drops this process's record and slot locks too
    res.clear()


def _check_memory(total: int, capacity: int) -> None:
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
