"""Batches from torch's worker processes through reused shared-memory slots.

torch's worker processes send every batch through a fresh shared-memory segment per
tensor: the worker allocates it (``default_collate`` stacks into it), the training process
receives its descriptor over a Unix socket, maps it, faults its pages in and unmaps it when
the batch dies. On 3 KB records (batch 256, 0.75 MB a batch, 2 workers on 2 cores) that
costs the training process ~0.7 ms of CPU a batch, as much as collating the batch itself,
and caps torch's ``num_workers=2`` near 110k samples/s.

Here each worker writes its batches into slots the training process created once per
iterator (``memfd`` slots, opened by the workers through ``/proc``, as the Loader's worker
processes do: :mod:`fastfeed.workers.shm`), and sends back a small :class:`SlotBatch`
(the batch's structure with :class:`~fastfeed.workers.shm.TensorRef` leaves). The
training process wraps the slot as tensors without copying. Slot ownership is one byte
per slot in a shared flags segment, each worker owning a fixed share of the slots:

- the worker takes a FREE slot of its share and marks it BUSY; when none is free (the
  training loop keeps many batches alive) the batch goes torch's usual way, so a worker
  never waits for a slot;
- the training process marks a slot FREE again once no tensor refers to any mapping of
  it (torch's storage use count, checked at each ``next()``), or when a received batch
  is dropped unopened (an abandoned epoch, a reset of persistent workers).

What the training loop gets is what torch would give: the same structure, values, dtypes,
shapes and strides. Tensors that are not plain, dense, contiguous CPU tensors (subclasses,
sparse, requiring grad, transposed) and everything that is not a tensor travel torch's
way. ``FASTFEED_PROCESS_SLOTS=0`` in the environment sends every batch torch's way. Differences a
script could see: the tensors' storage is the slot (``is_shared()`` is False, it cannot be
resized), and one tensor appearing twice in a batch arrives as two views of one memory.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate as _default_collate
from torch.utils.data._utils.pin_memory import pin_memory as _torch_pin_memory

from fastfeed.pipeline.collate import Collator
from fastfeed.profiling import Recorder
from fastfeed.profiling.clocks import Mark, _light_mark, _mark
from fastfeed.profiling.stages import Stage
from fastfeed.workers.shm import Layout, SlotMapping, SlotWriter, slot_views

__all__ = [
    "SlotBatch",
    "SlotCollate",
    "SlotTransport",
    "enabled",
    "fetch_started",
    "slots_per_worker",
]

_FREE = 0
_BUSY = 1
_SLOT_BYTES = 1 << 20  # a slot's first size, bytes (a worker grows it for larger batches)
# One batch in this many has its thread CPU time and run-queue wait read in the worker
# (~2 us a mark, three marks a batch); the others only the wall clock.
_SAMPLE_EVERY = 4

#: A batch's stage times measured in its worker: (read start, read end = collate start,
#: collate end) as ``time.perf_counter()`` (CLOCK_MONOTONIC, the same in every process
#: of the machine), samples, then read CPU, read run-queue wait, collate CPU, collate
#: run-queue wait in seconds (None where not measured).
Times = tuple[float, float, float, int, float | None, float | None, float | None, float | None]
_registry: weakref.WeakValueDictionary[tuple[int, int], SlotTransport] = (
    weakref.WeakValueDictionary()
)
_tokens = itertools.count()


def enabled() -> bool:
    """Whether batches of worker processes go through slots (``FASTFEED_PROCESS_SLOTS``)."""
    return os.environ.get("FASTFEED_PROCESS_SLOTS", "1") != "0"


def slots_per_worker(prefetch_factor: int | None) -> int:
    """Slots each worker owns: its batches in flight, one with the loop, one being dropped."""
    return max(1, prefetch_factor or 2) + 2


class _SlotState:
    """The training process's mappings of one slot (the newest last)."""

    __slots__ = ("fd", "mappings")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.mappings: list[SlotMapping] = []

    def unreferenced(self) -> bool:
        return all(m.unreferenced() for m in self.mappings)


class SlotTransport:
    """The training process's side: slots, their flags, and turning batches into tensors.

    Args:
        workers: Worker processes (each owns ``per_worker`` slots).
        per_worker: Slots per worker.
        recorder: Where the read and collate times measured in the workers go.
    """

    def __init__(self, workers: int, per_worker: int, recorder: Recorder | None = None) -> None:
        self.key = (os.getpid(), next(_tokens))
        self._recorder = recorder
        self.per_worker = per_worker
        n = workers * per_worker
        # Reentrant: a SlotBatch collected by the cyclic GC while this thread holds the
        # lock (any allocation in open() or sweep()) calls free() from its __del__.
        self._lock = threading.RLock()
        self._fds: list[int] = []
        self._finalizer = weakref.finalize(self, _close_fds, self._fds)
        flags_fd = os.memfd_create("fastfeed-slot-flags", os.MFD_CLOEXEC)
        self._fds.append(flags_fd)
        os.ftruncate(flags_fd, max(n, 1))
        self._flags_map = mmap.mmap(flags_fd, max(n, 1))
        self.flags = np.frombuffer(self._flags_map, dtype=np.uint8, count=n)
        self._slots: list[_SlotState] = []
        for i in range(n):
            fd = os.memfd_create(f"fastfeed-dl-slot-{i}", os.MFD_CLOEXEC)
            self._fds.append(fd)
            os.ftruncate(fd, _SLOT_BYTES)  # pages are allocated when first written
            self._slots.append(_SlotState(fd))
        self._out: set[int] = set()  # opened slots still marked BUSY
        _registry[self.key] = self

    def spec(self) -> dict[str, Any]:
        """What a worker needs to open the slots (picklable)."""
        return {
            "key": self.key,
            "per_worker": self.per_worker,
            "flags_fd": self._fds[0],
            "slot_fds": [s.fd for s in self._slots],
        }

    def open(self, batch: SlotBatch) -> Any:
        """The batch as tensors over its slot (no copy); the slot stays taken while used."""
        layout = batch.layout
        with self._lock:
            state = self._slots[layout.slot]
            if not state.mappings or layout.nbytes > state.mappings[-1].nbytes:
                # First batch in this slot, or a worker grew it: map it (again). An older
                # mapping lives on while anything refers to it.
                state.mappings.append(SlotMapping(state.fd, os.fstat(state.fd).st_size, False))
            base = state.mappings[-1].base
            self._out.add(layout.slot)

        if batch.times is not None and self._recorder is not None:
            start, read_end, end, n, read_cpu, read_runq, coll_cpu, coll_runq = batch.times
            self._recorder.add(Stage.READ, start, read_end, read_cpu, items=n, runq_s=read_runq)
            self._recorder.add(Stage.COLLATE, read_end, end, coll_cpu, items=n, runq_s=coll_runq)

        return slot_views(base, layout.data)

    def sweep(self) -> None:
        """Hand back to their workers the opened slots nothing refers to any more."""
        if not self._out:
            return
        with self._lock:
            for slot in list(self._out):
                state = self._slots[slot]
                if state.unreferenced():
                    del state.mappings[:-1]
                    self._out.discard(slot)
                    self.flags[slot] = _FREE

    def free(self, slot: int) -> None:
        """A received batch was dropped unopened: its slot is free at once."""
        with self._lock:
            if slot not in self._out:
                self.flags[slot] = _FREE

    def close(self) -> None:
        """Close the slots' descriptors; mapped memory lives on with its tensors."""
        self._finalizer()


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


class SlotBatch:
    """What a worker sends instead of a batch: its slot and its structure (picklable).

    Unpickled in the training process it is live: dropped without :meth:`open` (an
    abandoned epoch), it frees its slot.
    """

    __slots__ = ("__weakref__", "_live", "key", "layout", "times")

    def __init__(
        self,
        key: tuple[int, int],
        layout: Layout,
        times: Times | None = None,
        live: bool = False,
    ) -> None:
        self.key = key
        self.layout = layout
        self.times = times
        self._live = live

    def __reduce__(self) -> Any:
        return (_received, (self.key, self.layout, self.times))

    def open(self) -> Any:
        """The batch as tensors (raises if its iterator's transport is gone)."""
        transport = _registry.get(self.key)
        if transport is None:
            raise RuntimeError("fastfeed: this batch's shared-memory slots were closed")
        self._live = False
        return transport.open(self)

    def pin_memory(self, device: Any = None) -> Any:
        """torch's pin-memory thread: the batch's tensors copied into page-locked memory."""
        return _torch_pin_memory(self.open(), device)

    def __del__(self) -> None:
        if self._live:
            try:
                transport = _registry.get(self.key)
            except Exception:  # interpreter shutdown: nothing left to hand it back to
                return
            if transport is not None:
                transport.free(self.layout.slot)


def _received(key: tuple[int, int], layout: Layout, times: Times | None) -> SlotBatch:
    return SlotBatch(key, layout, times, live=True)


class _FetchClock:
    """This worker process's mark at the start of the batch being fetched."""

    started: Mark | None = None
    count = 0


_clock = _FetchClock()


def fetch_started() -> None:
    """The hook torch's workers run as each batch's fetch starts (see ``WorkerInit``)."""
    _clock.count += 1
    _clock.started = _mark() if _clock.count % _SAMPLE_EVERY == 1 else _light_mark()


def _delta(a: Mark, b: Mark, i: int) -> float | None:
    return b[i] - a[i] if a[i] >= 0 and b[i] >= 0 else None


def _times(start: Mark, mid: Mark, end: Mark, n: int) -> Times:
    return (
        start[0],
        mid[0],
        end[0],
        n,
        _delta(start, mid, 1),
        _delta(start, mid, 2),
        _delta(mid, end, 1),
        _delta(mid, end, 2),
    )


# -- the worker's side -----------------------------------------------------------------------


class _WorkerSlots:
    """One worker process's share of the slots, opened through ``/proc``."""

    def __init__(
        self,
        spec: dict[str, Any],
        parent_pid: int,
        worker_id: int,
        collate_fn: Callable[[list[Any]], Any] | None,
    ) -> None:
        self.key = spec["key"]
        self.writer = SlotWriter(parent_pid)
        self.fds: list[int] = spec["slot_fds"]
        per = spec["per_worker"]
        self.mine = range(worker_id * per, (worker_id + 1) * per)
        fd = os.open(f"/proc/{parent_pid}/fd/{spec['flags_fd']}", os.O_RDWR | os.O_CLOEXEC)
        try:
            self._map = mmap.mmap(fd, max(len(self.fds), 1))
        finally:
            os.close(fd)
        self.flags = np.frombuffer(self._map, dtype=np.uint8, count=len(self.fds))
        # The collate (default_collate's rules, or the user's), its tensors stacked
        # straight into the bound slot whatever their size, as the Loader's workers do.
        self.collator = Collator(collate_fn, slots=0)
        self.collator.ring = self.writer  # type: ignore[assignment]
        self.collator.ring_min_bytes = 0
        self._next = 0

    def take(self) -> int | None:
        flags, mine = self.flags, self.mine
        for k in range(len(mine)):
            slot = mine[(self._next + k) % len(mine)]
            if flags[slot] == _FREE:
                flags[slot] = _BUSY
                self._next = (self._next + k + 1) % len(mine)
                return slot
        return None


def _travels_by_slot(t: torch.Tensor) -> bool:
    return (
        type(t) is torch.Tensor
        and t.device.type == "cpu"
        and t.layout == torch.strided
        and not t.requires_grad
        and not t.is_conj()
        and not t.is_neg()
        and not t.is_quantized
        and t.is_contiguous()
    )


class SlotCollate:
    """The ``collate_fn`` torch's workers run: collate into a slot, send a SlotBatch.

    Args:
        collate_fn: The user's collate function, or None for ``default_collate``
            (stacked straight into the slot).
        spec: :meth:`SlotTransport.spec`.
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any] | None, spec: dict[str, Any]):
        self.collate_fn = collate_fn
        self.spec = spec
        self.parent_pid = os.getpid()
        self._slots: _WorkerSlots | None = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_slots"], state["_pid"] = None, -1
        return state

    def _plain(self, samples: list[Any]) -> Any:
        return (self.collate_fn or _default_collate)(samples)

    def _worker_slots(self) -> _WorkerSlots | None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._slots = None
            info = torch.utils.data.get_worker_info()
            if info is not None and os.getpid() != self.parent_pid:
                try:
                    self._slots = _WorkerSlots(self.spec, self.parent_pid, info.id, self.collate_fn)
                except OSError:  # /proc not readable here: torch's way for every batch
                    self._slots = None
        return self._slots

    def __call__(self, samples: list[Any]) -> Any:
        slots = self._worker_slots()
        slot = slots.take() if slots is not None else None
        if slots is None or slot is None:
            return self._plain(samples)
        started, _clock.started = _clock.started, None
        sampled = started is not None and started[1] >= 0
        mid = _mark() if sampled else _light_mark()
        try:
            writer = slots.writer
            writer.bind(slot, slots.fds[slot])
            batch = slots.collator.collate(samples)
            data = writer.pack(batch, keep=lambda t: not _travels_by_slot(t))
            layout = Layout(slot, writer.used, data, None)
        except BaseException:
            slots.flags[slot] = _FREE
            raise
        if started is None:
            return SlotBatch(slots.key, layout)
        end = _mark() if sampled else _light_mark()
        return SlotBatch(slots.key, layout, _times(started, mid, end, len(samples)))
