"""Collate samples into batches: straight into ring buffers, or generically.

Two paths, one object (:class:`Collator`), used by both :class:`fastfeed.Loader` and
:class:`fastfeed.DataLoader`:

- **Fixed shape**: :meth:`Collator.new_batch` returns an uninitialised ``(n, *shape)``
  buffer from a :class:`~fastfeed.pipeline.buffers.PinnedRing` slot and the workers write each
  sample into its row: no per-sample tensor, no ``torch.stack``, and no second copy to
  pin (the slot is already page-locked when ``pin_memory=True``).
- **Generic**: :meth:`Collator.collate` runs the user's ``collate_fn`` on ragged or nested
  samples. With the default (torch's ``default_collate`` semantics) every tensor leaf
  whose samples share shape and dtype is stacked straight into a ring slot with
  ``torch.stack(..., out=slot)``: one copy where torch's DataLoader makes two (stack,
  then ``pin_memory``). Leaves that cannot go into a slot (ragged tensors raise exactly
  as in torch; Python numbers become small tensors) and the output of a custom
  ``collate_fn`` are pinned afterwards when ``pin_memory=True``.

:meth:`Collator.release` tells the ring the consumer moved past a batch; see
:mod:`fastfeed.pipeline.buffers` for when a slot is actually rewritten (never while anything
still references it).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from fastfeed.errors import ConfigError
from fastfeed.pipeline.buffers import PinnedRing, map_tensors, tensor_leaves

try:  # the building blocks of default_collate (public since torch 2.0, module private)
    from torch.utils.data._utils.collate import collate as _torch_collate
    from torch.utils.data._utils.collate import collate_tensor_fn as _torch_collate_tensor
    from torch.utils.data._utils.collate import default_collate_fn_map as _torch_collate_map
except ImportError:  # pragma: no cover - very old or very new torch: plain default_collate
    _torch_collate = None  # type: ignore[assignment]
    _torch_collate_tensor = None  # type: ignore[assignment]
    _torch_collate_map = {}

__all__ = ["Collator"]


class Collator:
    """Builds batches for the loader's worker threads, in reusable (pinned) buffers.

    Args:
        collate_fn: Generic collate for samples that are not written into a buffer; torch's
            ``default_collate`` semantics when None (tensor leaves stacked into ring slots).
        pin_memory: Put batches in page-locked memory so host-to-device copies can be
            asynchronous (ordinary memory without CUDA; the loaders decide and warn in
            :func:`fastfeed.pipeline.assemble.decide_pin`).
        slots: Ring buffers kept per buffer shape: every batch that can hold a slot at
            once, i.e. the prefetch depth + 2 (the device stager keeps two copies in
            flight). Too few is never wrong, only slower: the ring then allocates and
            retires slots. 0 allocates a fresh buffer for every batch (pinned ones come
            from torch's caching host allocator).
    """

    def __init__(
        self,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        *,
        pin_memory: bool = False,
        slots: int = 4,
    ) -> None:
        if slots < 0:
            raise ConfigError(f"slots must be >= 0 (0 disables the buffer ring), got {slots}")
        self.collate_fn = collate_fn if collate_fn is not None else default_collate
        self._default = self.collate_fn is default_collate and _torch_collate is not None
        self.pin_memory = bool(pin_memory)
        # Whether to pin (and the warning when it is impossible) is decided by
        # fastfeed.pipeline.assemble.decide_pin; without CUDA this is simply False.
        #: True when batch buffers really are page-locked.
        self.pinned = self.pin_memory and torch.cuda.is_available()
        self.ring = PinnedRing(slots, pin_memory=self.pinned) if slots > 0 else None
        #: Unpinned buffers smaller than this are plain allocations, as torch's are: the
        #: allocator reuses freed memory of that size cheaply (10 us for 0.75 MB), and the
        #: ring's bookkeeping cost more (3 KB records, batch 256: 0.86x -> 1.03x torch's
        #: samples per CPU-second). Pinned buffers always come from the ring.
        self.ring_min_bytes = RING_MIN_BYTES
        self._collate_map: dict[Any, Callable[..., Any]] = dict(_torch_collate_map)
        self._collate_map[torch.Tensor] = self._collate_tensors
        if float in self._collate_map and int in self._collate_map:
            self._collate_map[float] = _collate_floats
            self._collate_map[int] = _collate_ints

    # -- fixed-shape path ----------------------------------------------------------------

    def new_batch(self, n: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised ``(n, *shape)`` buffer whose rows the workers fill.

        Args:
            n: Samples in the batch.
            shape: Shape of one sample.
            dtype: Element type.
        """
        if self.ring is not None and (
            self.pinned or _nbytes(n, shape, dtype) >= self.ring_min_bytes
        ):
            return self.ring.acquire(n, shape, dtype)
        return torch.empty((n, *shape), dtype=dtype, pin_memory=self.pinned)

    def labels(self, labels: Sequence[int | None]) -> torch.Tensor | None:
        """Labels as an int64 tensor (in a ring buffer), or None when the source has none."""
        if not labels or labels[0] is None:
            return None
        out = self.new_batch(len(labels), (), torch.int64)
        values = _numbers(labels, _INT64)  # 4x cheaper than torch.as_tensor for ints
        out.copy_(values if values is not None else torch.as_tensor(labels, dtype=torch.int64))
        return out

    # -- generic path --------------------------------------------------------------------

    def collate(self, samples: list[Any]) -> Any:
        """Collate samples with ``collate_fn`` (ring-backed for the default), pinned if asked."""
        if self._default:
            batch = _torch_collate(samples, collate_fn_map=self._collate_map)
        else:
            batch = self.collate_fn(samples)
        if self.pinned:
            batch = map_tensors(batch, _pin_tensor, _pin_other)
        return batch

    def _collate_tensors(
        self, batch: Sequence[torch.Tensor], *, collate_fn_map: dict[Any, Any] | None = None
    ) -> torch.Tensor:
        """``default_collate``'s tensor rule, stacking into a ring slot when shapes agree."""
        if not self.pinned and (self.ring is None or _batch_nbytes(batch) < self.ring_min_bytes):
            # An ordinary allocation either way: torch's own rule, without the checks
            # below (14 us for 256 tensors, a third of their stack).
            return _torch_collate_tensor(batch, collate_fn_map=collate_fn_map)
        if _stackable(batch) and (
            not isinstance(self.ring, PinnedRing) or torch.utils.data.get_worker_info() is None
        ):
            elem = batch[0]
            out = self.new_batch(len(batch), elem.shape, elem.dtype)
            try:
                # torch.stack itself refuses what default_collate would not stack into
                # this slot: other shapes, devices or layouts, nested tensors, autograd.
                return torch.stack(list(batch), 0, out=out)
            except RuntimeError:
                self.release(out)
        # Ragged, mixed, sparse or nested tensors, or a process-local ring in a torch
        # worker *process* (where torch stacks into shared memory itself; a worker's
        # SlotWriter is shared memory already): torch's own rule, with its own errors.
        return _torch_collate_tensor(batch, collate_fn_map=collate_fn_map)

    # -- recycling -----------------------------------------------------------------------

    def release(self, batch: Any, *, ready_event: Any = None) -> None:
        """The consumer has moved past ``batch``; its ring buffers may be reused.

        A buffer is rewritten only once nothing references it any more, so a batch the
        caller keeps never changes. Tensors that are not ring buffers are ignored, and a
        second release of the same batch does nothing.

        Args:
            batch: A batch (nested tensors) built by this collator.
            ready_event: A CUDA event recorded after the last GPU copy that reads these
                buffers, by a caller that issued every such copy itself (the device
                stager). Without it, pinned buffers are handed back to torch's caching
                host allocator instead of being reused, because the training loop may
                have issued ``non_blocking`` copies from them that fastfeed cannot see.
        """
        if self.ring is None:
            return
        for t in tensor_leaves(batch):
            if t.layout == torch.strided and t.device.type == "cpu":
                self.ring.release(t, ready_event)

    def stats(self) -> dict[str, Any]:
        """Ring counters (allocations, reuses, retired, live slots and bytes) and pinning."""
        out: dict[str, Any] = {"pinned": self.pinned}
        if self.ring is not None:
            out.update(self.ring.stats().to_dict())
        return out


#: See :attr:`Collator.ring_min_bytes`.
RING_MIN_BYTES = 4 << 20


def _nbytes(n: int, shape: Sequence[int], dtype: torch.dtype) -> int:
    size = n * dtype.itemsize
    for d in shape:
        size *= d
    return size


def _batch_nbytes(batch: Sequence[torch.Tensor]) -> int:
    """Bytes of the stacked batch if every sample is like the first (0 where unknown)."""
    try:
        return len(batch) * batch[0].nbytes
    except (IndexError, RuntimeError, NotImplementedError):  # empty, nested, sparse...
        return 0


def _stackable(batch: Sequence[Any]) -> bool:
    """True when ``torch.stack(batch, out=slot)`` may give what ``default_collate`` would.

    Plain tensors only (subclasses such as tv_tensors keep torch's path, which keeps their
    type) of one dtype (an ``out`` of the first sample's dtype could silently downcast
    where torch would promote), the first not requiring grad. Shapes, devices, layouts,
    nesting and autograd further on (``out=`` with an input that requires grad) are
    refused by ``torch.stack`` itself, which sends the batch down torch's path. Two
    C-level passes (``map``/``set``): on 256 tiny samples a comprehension reading
    ``dtype`` and ``requires_grad`` of each cost 29 us a batch, this 13.
    """
    if not batch or set(map(type, batch)) != _PLAIN or batch[0].requires_grad:
        return False
    return len(set(map(_DTYPE, batch))) == 1


_PLAIN = {torch.Tensor}
_DTYPE = operator.attrgetter("dtype")
_INT64 = np.dtype(np.int64)
_FLOAT64 = np.dtype(np.float64)


def _pin_tensor(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cpu" or t.is_pinned():
        return t
    return t.pin_memory()


def _pin_other(obj: Any) -> Any:
    # torch's pin_memory also pins custom batch types that define pin_memory().
    pin = getattr(obj, "pin_memory", None)
    return pin() if callable(pin) else obj


def _numbers(batch: Sequence[Any], dtype: np.dtype[Any]) -> torch.Tensor | None:
    """``batch`` as a 1-D tensor when numpy infers exactly ``dtype`` for it, else None.

    Where numpy infers int64 (float64) for a list of Python numbers, ``torch.tensor``
    gives the same values in the same dtype; anything else (bools only, a float among
    ints, a huge int, None, a string, a nested list) goes to torch's own rule, with its
    own result or error. The copy makes an ordinary (resizable) tensor, as torch's is.
    """
    try:
        arr = np.array(batch)
    except Exception:  # a probe: torch's rule gives its own result or error
        return None
    if arr.dtype != dtype or arr.shape != (len(batch),):
        return None
    return torch.from_numpy(arr).clone()


def _collate_ints(batch: Sequence[Any], *, collate_fn_map: dict[Any, Any] | None = None) -> Any:
    """``default_collate``'s rule for Python ints (``torch.tensor(batch)``, int64 when all
    are ints), 4x cheaper: 6 us instead of 23 for 256 labels, ~5% of a 3 KB-record batch."""
    out = _numbers(batch, _INT64)
    if out is None:
        return _torch_collate_map[int](batch, collate_fn_map=collate_fn_map)
    return out


def _collate_floats(batch: Sequence[Any], *, collate_fn_map: dict[Any, Any] | None = None) -> Any:
    """``default_collate``'s rule for Python floats (``torch.tensor(batch, dtype=float64)``)."""
    out = _numbers(batch, _FLOAT64)
    if out is None:
        return _torch_collate_map[float](batch, collate_fn_map=collate_fn_map)
    return out
