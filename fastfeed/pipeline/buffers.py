"""A ring of reusable batch buffers ("slots"), in pinned host memory when CUDA is there.

Allocating a fresh batch buffer for every batch costs twice: a large ``malloc`` faults in
every page again (tens of milliseconds for a 150 MB batch), and pinned memory from
scratch needs ``cudaHostAlloc``. :class:`PinnedRing` allocates a few slots per buffer
shape once and hands them out again and again.

When may a slot be rewritten? Only when no reader is left:

- **CPU references**: every view handed out, and every view derived from it (``x[0]``,
  ``x.numpy()``, a tuple kept for logging), holds a reference to the slot's storage.
  The ring compares the storage's use count with its own baseline
  (``torch._C._storage_Use_Count``) and reuses a slot only when nothing outside the ring
  refers to it. A batch a user keeps therefore never changes: its slot is simply not
  reused (and, when the ring needs room, it is *retired*: the ring forgets it and the
  memory stays with the user until they drop it).
- **Pending GPU copies** (pinned slots): a ``non_blocking`` copy reads the slot after
  the call returned. A slot released with a ``ready_event`` (the device stager, which
  issues every copy of its slots and records an event after them) is reused once that
  event has completed. A pinned slot released without one went to the user, who may
  have issued copies the ring cannot see; it is retired instead of reused. Its memory
  then goes back to torch's caching host allocator once the user drops it, which
  records an event for every copy from a pinned block and never hands the block out
  again before those copies complete: the sound mechanism torch itself relies on.

Without ``torch._C._storage_Use_Count`` (it exists in torch 2.x, but it is private) the
ring cannot tell whether a slot is referenced, so it never reuses one: every batch gets
a fresh buffer, exactly as without a ring.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fastfeed.errors import ConfigError

__all__ = ["PinnedRing", "RingStats", "compact", "map_tensors", "tensor_leaves"]

_use_count: Callable[[int], int] | None = getattr(torch._C, "_storage_Use_Count", None)

_FREE = "free"  # never handed out, or reusable
_IN_USE = "in_use"  # handed out, not released yet
_RELEASED = "released"  # the consumer moved past it (maybe still referenced or copying)


@dataclass
class RingStats:
    """Counters of one :class:`PinnedRing`.

    Attributes:
        allocations: Slots allocated (each one a new buffer).
        reuses: Buffers handed out again from an existing slot.
        retired: Slots the ring stopped tracking because they were still referenced (a
            batch the user kept) or because a pinned slot went to the user without a
            ready event; their memory is freed when the last reference goes.
        live_slots: Slots the ring tracks now.
        live_bytes: Bytes held by the slots the ring tracks now.
    """

    allocations: int = 0
    reuses: int = 0
    retired: int = 0
    live_slots: int = 0
    live_bytes: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class _Slot:
    """One buffer of the ring and what is known about its readers."""

    __slots__ = ("base", "baseline", "cdata", "event", "key", "nbytes", "rows", "state", "storage")

    def __init__(self, base: torch.Tensor, key: tuple[tuple[int, ...], torch.dtype]) -> None:
        self.base = base
        # Holding the storage object keeps the use-count baseline stable: torch keeps one
        # Python storage object per storage once created, and it counts as a reference.
        self.storage = base.untyped_storage()
        self.cdata: int = self.storage._cdata
        self.baseline = _use_count(self.cdata) if _use_count is not None else -1
        self.key = key
        self.rows = base.shape[0]
        self.nbytes = self.storage.nbytes()
        self.state = _FREE
        self.event: Any = None  # torch.cuda.Event guarding a release, or None

    def unreferenced(self) -> bool:
        """True when nothing outside the ring refers to this slot's storage."""
        return _use_count is not None and _use_count(self.cdata) == self.baseline


class PinnedRing:
    """Reusable batch buffers: up to ``slots`` per row shape and dtype.

    Thread-safe: worker threads :meth:`acquire`, the consumer (or the device stager)
    :meth:`release`. Never blocks: when no slot is reusable a new one is allocated, and
    the oldest slot still in use is retired if the ring is full.

    Args:
        slots: Buffers kept per ``(row_shape, dtype)``; at least the batches that can
            hold a slot at once (prefetch depth + the device stager's two copies in
            flight), so the ring never has to retire a slot in steady state.
        pin_memory: Allocate page-locked memory (only honoured when CUDA is available;
            the caller decides whether to warn).
    """

    def __init__(self, slots: int, *, pin_memory: bool = False) -> None:
        if slots < 1:
            raise ConfigError(f"a PinnedRing needs at least 1 slot, got slots={slots}")
        self.slots = slots
        self.pinned = bool(pin_memory) and torch.cuda.is_available()
        # Pinned slots can be read by asynchronous copies the ring never sees.
        self._async_readers = self.pinned
        self._lock = threading.Lock()
        self._pools: dict[tuple[tuple[int, ...], torch.dtype], list[_Slot]] = {}
        self._rows: dict[tuple[tuple[int, ...], torch.dtype], int] = {}
        self._by_cdata: dict[int, _Slot] = {}
        self._stats = RingStats()

    # -- handing out ---------------------------------------------------------------------

    def acquire(self, n: int, row_shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous ``(n, *row_shape)`` buffer (uninitialised) from a reusable slot.

        Args:
            n: Rows (samples) in the batch.
            row_shape: Shape of one row (one sample).
            dtype: Element type.

        Returns:
            A view of a slot; the slot is reused only after nothing references it any more
            (and, for a pinned slot, after :meth:`release` with a completed ready event).
        """
        if n < 0:
            raise ConfigError(f"a batch cannot have {n} rows")
        key = (tuple(int(s) for s in row_shape), dtype)
        with self._lock:
            rows = max(self._rows.get(key, 0), n)
            self._rows[key] = rows
            if n < rows:
                # A partial batch (an epoch's last): an exact buffer of its own, so that it
                # pickles or saves with its own rows only, not a whole slot's.
                return torch.empty((n, *key[0]), dtype=dtype, pin_memory=self.pinned)
            pool = self._pools.setdefault(key, [])
            slot = self._take_reusable(pool, n)
            if slot is not None:
                self._stats.reuses += 1
            else:
                slot = self._allocate(pool, key, rows)
            slot.state = _IN_USE
            slot.event = None
            # The pool is kept in order of last hand-out: reuse is least-recently-used
            # first, which gives pending copies and lingering references the most time.
            pool.append(slot)
            return slot.base.narrow(0, 0, n)

    def _take_reusable(self, pool: list[_Slot], n: int) -> _Slot | None:
        for i, slot in enumerate(pool):
            if slot.rows >= n and self._reusable(slot):
                return pool.pop(i)
        return None

    def _reusable(self, slot: _Slot) -> bool:
        if not slot.unreferenced():
            return False
        if slot.state == _IN_USE:
            # Handed out, never released, and dropped (a worker failed mid-batch, or the
            # user dropped it early). Pageable memory has no asynchronous readers, so it is
            # free; a pinned slot may still be the source of a copy nobody told us about.
            return not self._async_readers
        if slot.state == _RELEASED and slot.event is not None:
            return bool(slot.event.query())
        return True

    def _allocate(
        self, pool: list[_Slot], key: tuple[tuple[int, ...], torch.dtype], rows: int
    ) -> _Slot:
        # Make room first: the oldest slots that cannot serve this request are retired
        # (a kept batch keeps its memory; the ring just stops tracking it).
        while len(pool) >= self.slots:
            self._retire(pool.pop(0))
        base = torch.empty((rows, *key[0]), dtype=key[1], pin_memory=self.pinned)
        slot = _Slot(base, key)
        self._by_cdata[slot.cdata] = slot
        self._stats.allocations += 1
        self._stats.live_slots += 1
        self._stats.live_bytes += slot.nbytes
        return slot

    def _retire(self, slot: _Slot, *, counted: bool = True) -> None:
        self._by_cdata.pop(slot.cdata, None)
        self._stats.retired += counted
        self._stats.live_slots -= 1
        self._stats.live_bytes -= slot.nbytes

    # -- taking back ---------------------------------------------------------------------

    def owns(self, tensor: torch.Tensor) -> bool:
        """True when ``tensor`` is (a view of) a slot this ring tracks."""
        return tensor.untyped_storage()._cdata in self._by_cdata

    def release(self, tensor: torch.Tensor, ready_event: Any = None) -> bool:
        """The consumer moved past ``tensor``; its slot may be reused once unreferenced.

        Args:
            tensor: A buffer from :meth:`acquire` (or a view of it). Other tensors are
                ignored.
            ready_event: A CUDA event recorded after the last GPU work that reads the
                slot, passed by a caller that issued every such copy itself (the device
                stager). Without it a pinned slot is retired rather than reused, because
                the user may have issued copies from it that the ring cannot see.

        Returns:
            True when ``tensor`` belonged to the ring.
        """
        cdata = tensor.untyped_storage()._cdata
        with self._lock:
            slot = self._by_cdata.get(cdata)
            if slot is None:
                return False
            if slot.state != _IN_USE:
                return True  # released twice (stager, then loader): the first one counts
            if self._async_readers and ready_event is None:
                pool = self._pools.get(slot.key, [])
                if slot in pool:
                    pool.remove(slot)
                self._retire(slot)
                return True
            slot.state = _RELEASED
            slot.event = ready_event
            return True

    # -- reading -------------------------------------------------------------------------

    def stats(self) -> RingStats:
        """A copy of the ring's counters."""
        with self._lock:
            return RingStats(**self._stats.to_dict())

    def clear(self) -> None:
        """Forget every slot (memory is freed as soon as nothing else references it)."""
        with self._lock:
            for pool in self._pools.values():
                for slot in pool:
                    self._retire(slot, counted=False)
            self._pools.clear()
            self._rows.clear()
            self._by_cdata.clear()


# -- batch structures -------------------------------------------------------------------


def map_tensors(
    batch: Any,
    fn: Callable[[torch.Tensor], Any],
    other: Callable[[Any], Any] | None = None,
) -> Any:
    """Apply ``fn`` to every tensor in a nested batch, keeping the structure's types.

    Tuples (namedtuples and tuple subclasses such as the Loader's batch with its
    ``.indices`` attribute), lists, dicts and other mappings are rebuilt with the same
    type and instance attributes; strings and bytes are left alone.

    Args:
        batch: A tensor, or a nested tuple/list/dict of them (anything else is kept).
        fn: Applied to each tensor.
        other: Applied to each leaf that is not a tensor nor a container (e.g. a custom
            batch type with a ``pin_memory`` method); such leaves are kept when None.

    Returns:
        The rebuilt batch.
    """
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, (str, bytes, bytearray)):
        return batch
    if isinstance(batch, tuple):
        items = [map_tensors(x, fn, other) for x in batch]
        if type(batch) is tuple:
            return tuple(items)
        return _rebuild_tuple(batch, items)
    if isinstance(batch, list):
        items = [map_tensors(x, fn, other) for x in batch]
        if type(batch) is list:
            return items
        new_list = copy.copy(batch)  # same subclass, same attributes
        new_list[:] = items
        return new_list
    if isinstance(batch, dict):
        if type(batch) is dict:
            return {k: map_tensors(v, fn, other) for k, v in batch.items()}
        new_dict = copy.copy(batch)  # OrderedDict, defaultdict... keep type and attributes
        for k, v in batch.items():
            new_dict[k] = map_tensors(v, fn, other)
        return new_dict
    if isinstance(batch, Mapping):
        mapped = {k: map_tensors(v, fn, other) for k, v in batch.items()}
        try:
            return type(batch)(mapped)  # type: ignore[call-arg]
        except TypeError:  # a mapping whose constructor takes something else
            return mapped
    return other(batch) if other is not None else batch


def _rebuild_tuple(batch: tuple[Any, ...], items: list[Any]) -> Any:
    """A tuple subclass instance like ``batch`` holding ``items``.

    namedtuples: ``_make``; C types (``torch.Size``, structseqs such as
    ``torch.return_types.max``) refuse ``tuple.__new__`` ("not safe") and are rebuilt by
    calling the type on the sequence, as their constructors take; other subclasses:
    ``tuple.__new__`` (skips a ``__new__`` whose signature is unknown). Instance
    attributes are copied across; a type that cannot be rebuilt gives a plain tuple.
    """
    cls = type(batch)
    make = getattr(cls, "_make", None)
    try:
        if make is not None:
            new = make(items)
        else:
            try:
                new = tuple.__new__(cls, items)
            except TypeError:  # "tuple.__new__(torch.Size) is not safe": a C type
                new = cls(items)
    except Exception:
        return tuple(items)
    if hasattr(batch, "__dict__"):
        try:
            new.__dict__.update(batch.__dict__)
        except AttributeError:
            pass
    return new


def tensor_leaves(batch: Any) -> list[torch.Tensor]:
    """Every tensor in a nested batch, depth first."""
    out: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        out.append(t)
        return t

    map_tensors(batch, keep)
    return out


def compact(batch: Any) -> Any:
    """``batch`` with every tensor that views a larger buffer copied to its own memory.

    A batch shrunk after it was built (skipped samples) is a view of its slot; pickling or
    ``torch.save`` would write the whole slot. Tensors that own their memory are kept.
    """

    def own(t: torch.Tensor) -> torch.Tensor:
        if t.layout == torch.strided and t.untyped_storage().nbytes() > t.nbytes:
            return t.clone()
        return t

    return map_tensors(batch, own)
