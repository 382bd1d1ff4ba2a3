"""Shared-memory batch slots: a ring owned by the training process, written by workers.

Each slot is an anonymous ``memfd`` (``memfd_create``): it has no name in ``/dev/shm``, is
not limited by the size of ``/dev/shm`` (Docker's 64 MB default does not apply), and the
kernel frees it when the last process holding it exits, also after SIGKILL. Worker
processes open a slot through ``/proc/<training pid>/fd/<fd>`` (fork and spawn alike),
grow it with ``ftruncate`` when a batch needs more room, and write the batch's tensors
straight into it; the training process receives a small :class:`Layout` per batch and
wraps the slot as tensors without copying.

When may a slot be rewritten? By the rules of :class:`~fastfeed.pipeline.buffers.PinnedRing`:
only when no tensor outside the ring refers to it (torch's storage use count against a
baseline) and, when the device stager copied it, once the copy's CUDA event completed. A
slot still referenced when the ring needs room is retired (the ring forgets it; its
memory lives on with the user's tensors).

With ``pin=True`` every mapping is registered with CUDA (``cudaHostRegister``), so the
stager's ``non_blocking`` copies from it are asynchronous DMA at full speed.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fastfeed.pipeline.buffers import map_tensors, tensor_leaves

__all__ = ["Layout", "SharedRing", "SlotMapping", "SlotWriter", "TensorRef", "slot_views"]

_use_count: Callable[[int], int] | None = getattr(torch._C, "_storage_Use_Count", None)

_ALIGN = 64  # bytes: every tensor starts on a cache line
_MIN_SLOT_BYTES = 1 << 20  # first size of a slot, bytes (grown on demand)

_FREE = "free"  # never handed out, or reusable
_BUSY = "busy"  # a worker is writing it
_OUT = "out"  # handed to the consumer, not released yet
_RELEASED = "released"  # the consumer moved past it (maybe still referenced or copying)


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor of a batch lies in its slot (picklable placeholder)."""

    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Layout:
    """A finished batch in a slot: the batch's structure with :class:`TensorRef` leaves.

    Attributes:
        slot: Slot id.
        nbytes: Bytes of the slot the batch needs (the slot's size is at least this).
        data: The batch data's structure.
        labels: The labels' structure (a TensorRef or None).
    """

    slot: int
    nbytes: int
    data: Any
    labels: Any


def _round_up(n: int, to: int = _ALIGN) -> int:
    return (n + to - 1) // to * to


def _cuda_register(ptr: int, nbytes: int) -> None:
    err = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed (error {int(err)})")


def _cuda_unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


class SlotMapping:
    """One mmap of a slot and the uint8 tensor over it."""

    __slots__ = ("base", "baseline", "cdata", "mm", "nbytes", "pinned", "ptr", "storage")

    def __init__(self, fd: int, nbytes: int, pin: bool) -> None:
        self.mm = mmap.mmap(fd, nbytes)
        self.nbytes = nbytes
        self.base = torch.frombuffer(self.mm, dtype=torch.uint8)
        self.storage = self.base.untyped_storage()
        self.cdata: int = self.storage._cdata
        self.baseline = _use_count(self.cdata) if _use_count is not None else -1
        self.ptr = self.base.data_ptr()
        self.pinned = False
        if pin:
            _cuda_register(self.ptr, nbytes)
            self.pinned = True

    def unreferenced(self) -> bool:
        return _use_count is not None and _use_count(self.cdata) == self.baseline

    def close(self) -> None:
        if self.pinned:
            _cuda_unregister(self.ptr)
            self.pinned = False


class _Slot:
    __slots__ = ("event", "fd", "id", "mapping", "state")

    def __init__(self, slot_id: int, pin: bool, fds: set[int]) -> None:
        self.id = slot_id
        self.fd = os.memfd_create(f"fastfeed-slot-{slot_id}", os.MFD_CLOEXEC)
        fds.add(self.fd)
        os.ftruncate(self.fd, _MIN_SLOT_BYTES)
        self.mapping = SlotMapping(self.fd, _MIN_SLOT_BYTES, pin)
        self.state = _FREE
        self.event: Any = None


class SharedRing:
    """Shared-memory batch slots owned by the training process (thread-safe).

    Args:
        slots: Slots kept: every batch that can hold one at once (in flight, staged,
            with the training loop).
        pin: Register the slots with CUDA (page-locked) for the device stager.
    """

    def __init__(self, slots: int, *, pin: bool = False) -> None:
        self.slots = slots
        self.pin = bool(pin) and torch.cuda.is_available()
        self._lock = threading.Lock()
        self._slots: dict[int, _Slot] = {}
        self._order: list[int] = []  # slot ids, least recently handed out first
        self._next_id = 0
        self._by_cdata: dict[int, _Slot] = {}
        self._old: list[tuple[SlotMapping, Any]] = []  # outgrown mappings still referenced
        self.allocations = 0
        self.reuses = 0
        self.retired = 0
        # Descriptors of live slots: closed by close() or when the ring is collected.
        self._fds: set[int] = set()
        self._finalizer = weakref.finalize(self, _close_fds, self._fds)

    # -- handing out to workers ----------------------------------------------------------

    def take(self) -> tuple[int, int] | None:
        """A slot for the next task, as ``(slot id, fd)``; None when the ring is full.

        The ring is full when it holds ``slots`` slots and none is reusable; then the
        oldest slot that the consumer still references is retired to make room, and
        None is returned only if every slot is with a worker.
        """
        with self._lock:
            self._sweep_old()
            for sid in self._order:
                slot = self._slots[sid]
                if self._reusable(slot):
                    self._hand_out(slot)
                    self.reuses += 1
                    return slot.id, slot.fd
            if len(self._slots) >= self.slots:
                victim = next(
                    (self._slots[s] for s in self._order if self._slots[s].state != _BUSY), None
                )
                if victim is None:
                    return None
                self._retire(victim)
            slot = _Slot(self._next_id, self.pin, self._fds)
            self._next_id += 1
            self._slots[slot.id] = slot
            self._by_cdata[slot.mapping.cdata] = slot
            self._order.append(slot.id)
            self.allocations += 1
            self._hand_out(slot)
            return slot.id, slot.fd

    def _hand_out(self, slot: _Slot) -> None:
        slot.state = _BUSY
        slot.event = None
        self._order.remove(slot.id)
        self._order.append(slot.id)

    def _reusable(self, slot: _Slot) -> bool:
        if slot.state == _BUSY or not slot.mapping.unreferenced():
            return False
        if slot.state == _FREE:
            return True
        if slot.state == _OUT:
            # Handed out, dropped unreleased: without CUDA registration nothing can
            # still read it; a registered slot may be the source of an unseen copy.
            return not slot.mapping.pinned
        return slot.event is None or bool(slot.event.query())

    def _retire(self, slot: _Slot) -> None:
        """Forget a slot; its memory lives on with whoever still references it."""
        del self._slots[slot.id]
        self._order.remove(slot.id)
        self._by_cdata.pop(slot.mapping.cdata, None)
        if slot.fd in self._fds:  # not closed by the finalizer at interpreter exit
            self._fds.discard(slot.fd)
            os.close(slot.fd)
        self._old.append((slot.mapping, slot.event))
        self.retired += 1

    def _sweep_old(self) -> None:
        keep = []
        for mapping, event in self._old:
            if mapping.unreferenced() and (event is None or bool(event.query())):
                mapping.close()
            else:
                keep.append((mapping, event))
        self._old = keep

    def abandon(self, slot_id: int) -> None:
        """A task's slot comes back unused (the task failed or its epoch was abandoned)."""
        with self._lock:
            slot = self._slots.get(slot_id)
            if slot is not None:
                slot.state = _FREE

    # -- the consumer's side ---------------------------------------------------------------

    def open(self, layout: Layout) -> tuple[Any, Any]:
        """Wrap a finished batch as tensors over its slot (no copy): ``(data, labels)``."""
        with self._lock:
            slot = self._slots[layout.slot]
            if layout.nbytes > slot.mapping.nbytes:
                # A worker grew the slot: map it again (the old mapping lives on while
                # anything references it, and is unregistered once nothing does).
                size = os.fstat(slot.fd).st_size
                old = slot.mapping
                self._by_cdata.pop(old.cdata, None)
                self._old.append((old, slot.event))
                slot.mapping = SlotMapping(slot.fd, size, self.pin)
                self._by_cdata[slot.mapping.cdata] = slot
            slot.state = _OUT
            base = slot.mapping.base
        return slot_views(base, layout.data), slot_views(base, layout.labels)

    def release(self, batch: Any, *, ready_event: Any = None) -> None:
        """The consumer moved past ``batch``; its slot is reused once nothing reads it.

        Args:
            batch: A batch from :meth:`open` (other tensors are ignored).
            ready_event: CUDA event recorded after the last copy from the slot (the
                device stager); without one a registered slot is only reused once it is
                unreferenced *and* was never handed on (see :meth:`_reusable`).
        """
        with self._lock:
            for t in tensor_leaves(batch):
                slot = self._by_cdata.get(t.untyped_storage()._cdata)
                if slot is None or slot.state != _OUT:
                    continue
                if slot.mapping.pinned and ready_event is None:
                    self._retire(slot)  # the user may copy from it: never rewrite it
                    continue
                slot.state = _RELEASED
                slot.event = ready_event

    def discard(self, batch: Any) -> None:
        """A batch that never reached the consumer (its epoch was abandoned): reusable."""
        with self._lock:
            for t in tensor_leaves(batch):
                slot = self._by_cdata.get(t.untyped_storage()._cdata)
                if slot is not None and slot.state == _OUT:
                    slot.state = _RELEASED
                    slot.event = None

    def stats(self) -> dict[str, int]:
        """Counters: allocations, reuses, retired, live slots and bytes."""
        with self._lock:
            live = sum(s.mapping.nbytes for s in self._slots.values())
            return {
                "allocations": self.allocations,
                "reuses": self.reuses,
                "retired": self.retired,
                "live_slots": len(self._slots),
                "live_bytes": live,
            }

    def close(self) -> None:
        """Close every slot's descriptor (memory is freed when nothing maps it). Idempotent."""
        with self._lock:
            for slot in list(self._slots.values()):
                self._retire(slot)
            self.retired = 0
            self._sweep_old()


def _picklable(leaf: Any) -> Any:
    """Raw records may be read-only views (a shared cache's hits): send their bytes."""
    return bytes(leaf) if isinstance(leaf, memoryview) else leaf


def _close_fds(fds: set[int]) -> None:
    for fd in list(fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


def _view(base: torch.Tensor, ref: TensorRef) -> torch.Tensor:
    itemsize = ref.dtype.itemsize
    span = 1 + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True) if n > 0)
    if any(n == 0 for n in ref.shape):
        span = 0
    raw = base.narrow(0, ref.offset, span * itemsize)
    return raw.view(ref.dtype).as_strided(ref.shape, ref.stride)


def slot_views(base: torch.Tensor, structure: Any) -> Any:
    """``structure`` (a :class:`Layout`'s data or labels) with each :class:`TensorRef`
    replaced by a tensor viewing ``base``, the slot's mapping (no copy)."""

    def leaf(ref: Any) -> Any:
        return _view(base, ref) if isinstance(ref, TensorRef) else ref

    if isinstance(structure, TensorRef):
        return leaf(structure)
    return map_tensors(structure, lambda t: t, other=leaf)


# -- the worker's side ---------------------------------------------------------------------


class SlotWriter:
    """A worker process's view of the ring: writes batches straight into slots.

    Used as the ``ring`` of the worker's :class:`~fastfeed.pipeline.collate.Collator`, so
    fixed-shape rows, default-collated tensors and labels are written in place; whatever
    else a batch holds (a custom ``collate_fn``'s tensors) is copied in by
    :meth:`layout`. Each worker thread writes the slot bound to its current task.

    Args:
        parent_pid: The training process, whose slot descriptors are opened via /proc.
    """

    def __init__(self, parent_pid: int) -> None:
        self.parent_pid = parent_pid
        self._fds: dict[int, int] = {}
        self._maps: dict[int, tuple[mmap.mmap, torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._tls = threading.local()

    def _open(self, slot: int, parent_fd: int) -> int:
        with self._lock:
            fd = self._fds.get(slot)
            if fd is None:
                fd = os.open(f"/proc/{self.parent_pid}/fd/{parent_fd}", os.O_RDWR | os.O_CLOEXEC)
                self._fds[slot] = fd
            return fd

    def forget(self, slot: int) -> None:
        """The training process retired ``slot``: drop this worker's handle on it."""
        with self._lock:
            fd = self._fds.pop(slot, None)
            self._maps.pop(slot, None)
        if fd is not None:
            os.close(fd)

    def bind(self, slot: int, parent_fd: int) -> None:
        """This thread's next batch goes into ``slot``."""
        fd = self._open(slot, parent_fd)
        self._tls.slot, self._tls.fd, self._tls.used = slot, fd, 0
        self._tls.ranges = {}  # data_ptr -> size of every mapping this batch was written via

    def _base(self, need: int) -> torch.Tensor:
        slot, fd = self._tls.slot, self._tls.fd
        with self._lock:
            got = self._maps.get(slot)
            # Mapped far enough already (the usual case): no syscall on this per-batch path.
            # len(mmap) is the mapped length (mmap.size() would be the file's).
            if got is None or len(got[0]) < need:
                size = os.fstat(fd).st_size  # another worker may have grown it already
                if size < need:
                    size = max(need, 2 * size)
                    os.ftruncate(fd, size)
                mm = mmap.mmap(fd, size)
                got = (mm, torch.frombuffer(mm, dtype=torch.uint8))
                self._maps[slot] = got
        base = got[1]
        self._tls.ranges[base.data_ptr()] = (base.numel(), base)
        return base

    def _alloc(self, nbytes: int) -> tuple[int, torch.Tensor]:
        offset = _round_up(self._tls.used)
        self._tls.used = offset + nbytes
        return offset, self._base(offset + nbytes)

    # Collator's ring interface ------------------------------------------------------------

    def acquire(self, n: int, row_shape: Any, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised ``(n, *row_shape)`` tensor inside this thread's slot."""
        shape = (n, *(int(s) for s in row_shape))
        itemsize = dtype.itemsize
        numel = 1
        for s in shape:
            numel *= s
        offset, base = self._alloc(numel * itemsize)
        return base.narrow(0, offset, numel * itemsize).view(dtype).view(shape)

    def release(self, tensor: torch.Tensor, ready_event: Any = None) -> bool:
        return True  # the training process owns reuse

    def stats(self) -> Any:  # pragma: no cover - the training process reports the ring
        raise NotImplementedError

    # -- finishing a batch -------------------------------------------------------------------

    @property
    def used(self) -> int:
        """Bytes of the bound slot this thread's batch uses so far."""
        return int(self._tls.used)

    def layout(self, data: Any, labels: Any) -> Layout:
        """The batch's :class:`Layout`, copying into the slot any tensor not already there."""
        d = self.pack(data, other=_picklable)
        labs = self.pack(labels, other=_picklable) if labels is not None else None
        return Layout(self._tls.slot, self.used, d, labs)

    def pack(
        self,
        batch: Any,
        *,
        keep: Callable[[torch.Tensor], bool] | None = None,
        other: Callable[[Any], Any] | None = None,
    ) -> Any:
        """``batch`` with each tensor as a :class:`TensorRef` into the bound slot.

        Tensors written in place (views of this slot) are referenced where they lie; any
        other tensor is copied in. One tensor object appearing twice is placed once.

        Args:
            batch: A nested batch.
            keep: Tensors for which this is true stay as they are (they travel pickled).
                None: every tensor goes into the slot, and one that cannot (not a dense
                CPU tensor) raises TypeError.
            other: Applied to every leaf that is not a tensor (see ``map_tensors``).
        """
        self._base(0)
        ranges = dict(self._tls.ranges)
        placed: dict[int, TensorRef] = {}

        def place(t: torch.Tensor) -> Any:
            if keep is not None and keep(t):
                return t
            ref = placed.get(id(t))
            if ref is None:
                ref = placed[id(t)] = self._place(t, ranges)
            return ref

        return map_tensors(batch, place, other)

    def _place(self, t: torch.Tensor, ranges: dict[int, Any]) -> TensorRef:
        if t.device.type != "cpu" or t.layout != torch.strided:
            raise TypeError(
                f"a worker process can only return dense CPU tensors, got {t.layout} on {t.device}"
            )
        if t.numel() == 0:  # no bytes to place (and its data_ptr() may be 0)
            return TensorRef(0, tuple(t.shape), tuple(t.stride()), t.dtype)
        ptr = t.untyped_storage().data_ptr()
        for lo, (size, _) in ranges.items():
            if lo <= ptr < lo + size:  # written in place (a view of this slot)
                offset = t.data_ptr() - lo
                return TensorRef(offset, tuple(t.shape), tuple(t.stride()), t.dtype)
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        offset, dst = self._alloc(nbytes)
        dst.narrow(0, offset, nbytes).copy_(t.reshape(-1).view(torch.uint8))
        return TensorRef(offset, tuple(t.shape), tuple(t.stride()), t.dtype)

    def close(self) -> None:
        with self._lock:
            fds = list(self._fds.values())
            self._fds.clear()
            self._maps.clear()
        for fd in fds:
            os.close(fd)
