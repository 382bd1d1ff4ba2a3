"""``MemoryCache``: keep raw record bytes of any source in RAM under a byte budget.

Two policies:

``"static"`` (default)
    Fill once, never evict. The first records read (or :meth:`MemoryCache.preload`) take
    the budget; later ones are read through. On shuffled epochs over a dataset larger than
    the budget, every epoch hits ``capacity / dataset`` of its reads. LRU would thrash
    there: by the time a record comes round again (one epoch later) it has been evicted,
    so its hit rate falls towards zero (Mohan et al., "Analyzing and Mitigating Data
    Stalls in DNN Training", VLDB 2021).
``"lru"``
    Evict the least recently used records; for workloads that re-read a hot subset.

Hits are a list (static) or dict (LRU) lookup per index and one lock per call at most: the
cached ``bytes`` object itself is returned, without a copy.

``shared=True`` (static only) keeps one copy per machine in shared memory, found by every
process that opens the same source with the same capacity: worker processes and every DDP
rank on the node; each record is read from storage once per machine. See
:mod:`fastfeed.sources.shared_cache` for the design.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from fastfeed._progress import progress_bar
from fastfeed._size import parse_size
from fastfeed.errors import ConfigError
from fastfeed.sources import shared_cache
from fastfeed.sources.base import Record, Source

__all__ = ["MemoryCache"]

_POLICIES = ("static", "lru")


class MemoryCache(Source):
    """A RAM cache of raw records in front of another source.

    Args:
        source: The source to cache (any :class:`Source`).
        capacity: Byte budget for cached record data: an int or a string such as
            ``"8GiB"`` or ``"512MB"`` (see :func:`fastfeed._size.parse_size`). Python object
            overhead (~100 bytes per record) is not counted.
        policy: ``"static"`` (fill once, never evict) or ``"lru"``.
        shared: Keep the cache in shared memory, one copy per machine for every process
            that opens the same source with the same capacity (static policy only; the
            source must have an identity, see :meth:`Source.identity`).
        claim_timeout_s: Shared only: longest wait for a record another process is
            filling before reading it from storage, seconds.
        zero_copy: Shared only: a hit's ``data`` is a read-only ``memoryview`` of the
            shared copy (no copy; it keeps the mapping alive while referenced). False
            returns ``bytes`` copies: use it where records must pickle (raw records,
            no ``transform``, under ``processes=K``).

    Attributes:
        source: The wrapped source.
        capacity_bytes: The byte budget (machine-wide when shared).
        policy: ``"static"`` or ``"lru"``.
        shared: Whether the cache is one copy per machine.
        machine_wide: Same as ``shared``: ``capacity_bytes`` holds for the whole machine.

    Raises:
        ConfigError: ``shared=True`` with the LRU policy, or over a source without an
            identity; a shared capacity larger than the machine's memory.

    Note:
        Pickling (spawn, process workers) sends the wrapped source but not the cached
        bytes: the receiving process starts with an empty cache (a shared cache: it
        attaches to the machine's copy). A shared cache stays attached through
        :meth:`close`; :meth:`detach` leaves the machine's copy, which the kernel frees
        when the last process leaves (also when processes are killed). A forked child inherits
        the cache (copy-on-write). :meth:`close` closes the wrapped source and keeps the
        cached data; :meth:`clear` drops it.
    """

    def __init__(
        self,
        source: Source,
        capacity: int | str,
        policy: str = "static",
        *,
        shared: bool = False,
        claim_timeout_s: float = 60.0,
        zero_copy: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(source, Source):
            raise ConfigError(f"MemoryCache wraps a Source, not {type(source).__name__}")
        if policy not in _POLICIES:
            raise ConfigError(f"cache policy must be one of {_POLICIES}, not {policy!r}")
        self.source = source
        self.capacity_bytes = parse_size(capacity)
        self.policy = policy
        self.shared = self.machine_wide = bool(shared)
        self.claim_timeout_s = float(claim_timeout_s)
        self.zero_copy = bool(zero_copy)
        self.classes = source.classes
        self._lock = threading.Lock()
        self._store: shared_cache.SharedStore | None = None
        self._key: str | None = None
        if self.shared:
            if policy != "static":
                raise ConfigError(
                    "MemoryCache(shared=True) supports policy='static' only (fill once: "
                    "every process agrees on what is cached without coordinating evictions)"
                )
            identity = shared_cache.source_identity(source)
            if identity is None:
                raise ConfigError(
                    f"MemoryCache(shared=True): {type(source).__name__} has no identity(), "
                    "so other processes cannot tell it is the same data; use FileSource or "
                    "LMDBSource, or implement Source.identity()"
                )
            self._key = shared_cache.segment_key(identity, len(source), self.capacity_bytes)
            self._store = self._attach()  # now: this process keeps the copy alive
        self._init_store()

    def _attach(self) -> shared_cache.SharedStore:
        assert self._key is not None
        store = shared_cache.attach(
            self._key,
            len(self.source),
            self.capacity_bytes,
            claim_timeout_s=self.claim_timeout_s,
        )
        store.after_fork()  # no-op unless inherited through fork
        return store

    def _open(self) -> None:
        if self.shared and (self._store is None or not self._store._resources):
            self._store = self._attach()

    def _init_store(self) -> None:
        self._n = len(self.source)
        # static: a list indexed by record (fastest hit path); lru: an ordered dict.
        self._slots: list[Record | None] = [None] * self._n if self.policy == "static" else []
        self._lru: OrderedDict[int, Record] = OrderedDict()
        self._bytes = 0
        self._entries = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    # -- contract -----------------------------------------------------------------

    def __len__(self) -> int:
        return self._n

    def describe(self, index: int) -> str:
        """The wrapped source's description of ``index``."""
        return self.source.describe(index)

    @property
    def labels(self) -> Any:
        """The wrapped source's labels, or ``None``."""
        return getattr(self.source, "labels", None)

    def _read_one(self, index: int) -> Record:
        return self._read_many((index,))[0]

    def _read_many(self, indices: Sequence[int]) -> list[Record]:
        if self.policy == "static":
            return self._read_static(indices)
        return self._read_lru(indices)

    def _read_static(self, indices: Sequence[int]) -> list[Record]:
        if self._store is not None:
            shared = self._store.read_many(indices, self.source)
            if not self.zero_copy:  # bytes() of a miss's bytes is the same object
                shared = [Record(bytes(r.data), r.label) for r in shared]
            return shared
        slots = self._slots
        recs: list[Any] = [slots[i] for i in indices]
        missing = [k for k, r in enumerate(recs) if r is None]
        if missing:
            fetched = self.source.read_many([indices[k] for k in missing])
            with self._lock:
                cap = self.capacity_bytes
                for k, rec in zip(missing, fetched, strict=True):
                    recs[k] = rec
                    i = indices[k]
                    size = len(rec.data)
                    if slots[i] is None and self._bytes + size <= cap:
                        slots[i] = rec
                        self._bytes += size
                        self._entries += 1
                self._hits += len(recs) - len(missing)
                self._misses += len(missing)
        else:
            with self._lock:
                self._hits += len(recs)
        return recs

    def _read_lru(self, indices: Sequence[int]) -> list[Record]:
        lru = self._lru
        recs: list[Any] = [None] * len(indices)
        missing: list[int] = []
        with self._lock:
            touch = lru.move_to_end
            for k, i in enumerate(indices):
                rec = lru.get(i)
                if rec is None:
                    missing.append(k)
                else:
                    touch(i)
                    recs[k] = rec
            self._hits += len(recs) - len(missing)
            self._misses += len(missing)
        if missing:
            # Read outside the lock so other threads' hits are not held up by IO.
            fetched = self.source.read_many([indices[k] for k in missing])
            with self._lock:
                for k, rec in zip(missing, fetched, strict=True):
                    recs[k] = rec
                    self._lru_insert(indices[k], rec)
        return recs

    def _lru_insert(self, index: int, rec: Record) -> None:
        size = len(rec.data)
        if size > self.capacity_bytes:
            return
        old = self._lru.pop(index, None)
        if old is not None:
            self._bytes -= len(old.data)
            self._entries -= 1
        while self._lru and self._bytes + size > self.capacity_bytes:
            _, evicted = self._lru.popitem(last=False)
            self._bytes -= len(evicted.data)
            self._entries -= 1
            self._evictions += 1
        self._lru[index] = rec
        self._bytes += size
        self._entries += 1

    def hint(self, indices: Iterable[int]) -> None:
        """Forward the read-ahead hint for the indices that are not cached."""
        n = self._n
        if self._store is not None:
            state = self._store.state
            todo = [i for i in indices if 0 <= i < n and state(i) != shared_cache.READY]
        elif self.policy == "static":
            slots = self._slots
            todo = [i for i in indices if 0 <= i < n and slots[i] is None]
        else:
            lru = self._lru
            todo = [i for i in indices if 0 <= i < n and i not in lru]
        if todo:
            self.source.hint(todo)

    def close(self) -> None:
        """Close the wrapped source (its handles); cached bytes are kept. Idempotent."""
        super().close()
        self.source.close()

    # -- cache API ------------------------------------------------------------------

    def cached(self, index: int) -> bool:
        """Whether record ``index`` is in the cache now."""
        if self._store is not None:
            return self._store.state(index) == shared_cache.READY
        if self.policy == "static":
            return self._slots[index] is not None
        return index in self._lru

    def cached_indices(self) -> list[int]:
        """Cached record indices (static: ascending; LRU: least to most recently used)."""
        if self._store is not None:
            return [i for i in range(self._n) if self._store.state(i) == shared_cache.READY]
        with self._lock:
            if self.policy == "static":
                return [i for i, r in enumerate(self._slots) if r is not None]
            return list(self._lru)

    def preload(self, progress: bool = True, batch: int = 256) -> int:
        """Read records in index order into the cache until the budget is full.

        Stops at the first record that no longer fits (static) or when the budget is full
        (LRU: nothing is evicted by a preload). Records already cached are skipped.

        Args:
            progress: Show a tqdm bar (records).
            batch: Records per ``read_many`` of the wrapped source.

        Returns:
            Records added.
        """
        self._ensure_open()
        if self._store is not None:
            return self._preload_shared(progress, batch)
        added = 0
        bar = progress_bar(total=self._n, unit="rec", desc="preload", enabled=progress, leave=True)
        with bar:
            for start in range(0, self._n, batch):
                todo = [i for i in range(start, min(self._n, start + batch)) if not self.cached(i)]
                bar.update(min(self._n, start + batch) - start - len(todo))
                if not todo:
                    continue
                fetched = self.source.read_many(todo)
                full = False
                with self._lock:
                    for i, rec in zip(todo, fetched, strict=True):
                        size = len(rec.data)
                        if self._bytes + size > self.capacity_bytes:
                            full = True
                            break
                        if self.policy == "static":
                            self._slots[i] = rec
                            self._bytes += size
                            self._entries += 1
                        else:
                            self._lru_insert(i, rec)
                        added += 1
                        bar.update(1)
                if full:
                    break
        return added

    def _preload_shared(self, progress: bool, batch: int) -> int:
        store = self._store
        assert store is not None
        added = 0
        bar = progress_bar(total=self._n, unit="rec", desc="preload", enabled=progress, leave=True)
        with bar:
            for start in range(0, self._n, batch):
                if store.full():
                    break
                added += store.preload(range(start, min(self._n, start + batch)), self.source)
                bar.update(min(self._n, start + batch) - start)
        return added

    def cache_stats(self) -> dict[str, Any]:
        """Hits, misses, hit rate, bytes and entries cached, evictions, capacity, policy.

        A shared cache reports this process's hits and misses at the top level, the
        machine's bytes and entries, and two more dicts: ``process`` (this process's
        counters) and ``machine`` (every process on the machine, live or gone: hits,
        misses, bytes read from storage, fills, ``fill_fraction``, ``processes``).
        """
        if self._store is not None:
            return self._shared_stats(self._store)
        with self._lock:
            total = self._hits + self._misses
            return {
                "policy": self.policy,
                "hits": self._hits,
                "misses": self._misses,
                "hit_rate": self._hits / total if total else 0.0,
                "bytes_cached": self._bytes,
                "entries": self._entries,
                "evictions": self._evictions,
                "capacity_bytes": self.capacity_bytes,
            }

    def _shared_stats(self, store: shared_cache.SharedStore) -> dict[str, Any]:
        mine: dict[str, Any] = store.process_counters()
        machine = store.machine_counters()
        for d in (mine, machine):
            total = d["hits"] + d["misses"]
            d["hit_rate"] = d["hits"] / total if total else 0.0
        return {
            "policy": self.policy,
            "shared": True,
            "hits": mine["hits"],
            "misses": mine["misses"],
            "hit_rate": mine["hit_rate"],
            "bytes_cached": machine["filled_bytes"],
            "entries": machine["filled_records"],
            "evictions": 0,
            "capacity_bytes": self.capacity_bytes,
            "process": mine,
            "machine": machine,
        }

    stats = cache_stats

    def detach(self) -> None:
        """Shared cache: leave the machine's copy now (freed when the last process leaves).

        Reading again re-attaches. A no-op for an in-process cache.
        """
        if self._store is not None:
            self._store.detach()
            self._store = None
            self._pid = None  # the next read attaches again

    def reset_stats(self) -> None:
        """Zero hits, misses and evictions (the cached data stays)."""
        if self._store is not None:
            self._store.reset_counters()
            return
        with self._lock:
            self._hits = self._misses = self._evictions = 0

    def clear(self) -> None:
        """Drop every cached record and zero the statistics.

        Raises:
            ConfigError: The cache is shared (other processes read it).
        """
        if self.shared:
            raise ConfigError("cannot clear a shared MemoryCache: other processes read it")
        with self._lock:
            self._init_store()

    # -- pickling -------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        del state["_lock"]
        state["_store"] = None  # the receiver attaches to the machine's copy
        for key in ("_slots", "_lru"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._lock = threading.Lock()
        self._init_store()

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        if self._store is not None:
            self._store.after_fork()

    def __repr__(self) -> str:
        return (
            f"MemoryCache({self.source!r}, capacity={self.capacity_bytes}, "
            f"policy={self.policy!r}, entries={self._entries}"
            + (", shared=True)" if self.shared else ")")
        )
