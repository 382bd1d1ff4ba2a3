"""The process adapter of the drop-in DataLoader: torch's own worker processes.

``worker_type="process"`` runs torch's ``_MultiProcessingDataLoaderIter`` unchanged
(per-worker dataset copies, seeding, ``multiprocessing_context``, shared-memory batches),
with three additions:

- worker exceptions reach the loop as the original object (type, args, attributes), the
  worker's traceback added as a note (:class:`~fastfeed._torch_compat.torch_private.WorkerInit`
  installs the carrier in each worker);
- a timeout raises :class:`~fastfeed.errors.LoaderTimeoutError` (also the RuntimeError
  torch raises);
- several iterators may be live at once: each non-persistent iterator has its own
  workers (torch's semantics); none is shut down because another one started.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any

from torch.utils.data import default_collate as _default_collate

from fastfeed._torch_compat import torch_private as _tp
from fastfeed._torch_compat.errors import add_context
from fastfeed._torch_compat.torch_private import shutdown_torch_iterator
from fastfeed._torch_compat.transport import (
    SlotBatch,
    SlotCollate,
    SlotTransport,
    enabled,
    fetch_started,
    slots_per_worker,
)
from fastfeed.errors import FastFeedError, LoaderTimeoutError

__all__ = ["ProcessIter", "start_process_iter"]


class ProcessIter:
    """Wraps torch's multiprocessing iterator: typed timeouts, the batch named on errors.

    Args:
        inner: torch's iterator.
        persistent: It is the loader's persistent iterator (the loader shuts it down).
    """

    def __init__(
        self, inner: Iterator[Any], persistent: bool, transport: SlotTransport | None = None
    ) -> None:
        self._inner = inner
        self._persistent = persistent
        self._transport = transport
        self._batches = 0
        self._done = False
        self._pid = os.getpid()
        self._closed = False  # DataLoader.close() stopped it

    def __iter__(self) -> ProcessIter:
        return self

    def __getattr__(self, name: str) -> Any:
        # torch's iterator attributes (``_workers``, ``_shutdown``...), read by scripts.
        if name.startswith("__") or name == "_inner":
            raise AttributeError(name)
        return getattr(self._inner, name)

    def __len__(self) -> int:
        return len(self._inner)  # type: ignore[arg-type]

    @property
    def live(self) -> bool:
        return not self._done

    def close(self, *, by_loader: bool = False) -> None:
        """Stop this epoch's worker processes (not the persistent ones: the loader's)."""
        self._done = True
        self._closed = self._closed or by_loader
        if not self._persistent:
            shutdown_torch_iterator(self._inner)
            if self._transport is not None:
                self._transport.close()

    def __next__(self) -> Any:
        if os.getpid() != self._pid:
            raise FastFeedError(
                f"this DataLoader iterator was created in process {self._pid}, before a "
                "fork: its worker processes belong to that process. Call iter(loader) in "
                "this process to start new ones"
            )
        if self._closed:
            raise FastFeedError(
                "this DataLoader was closed (DataLoader.close()) during the epoch; its "
                "iterator delivers no more batches: call iter(loader) to start a new one"
            )
        if self._transport is not None:
            self._transport.sweep()
        try:
            batch = next(self._inner)
            if type(batch) is SlotBatch:  # pin_memory=False (torch's pin thread opens it)
                batch = batch.open()
        except StopIteration:
            self._done = True
            raise
        except RuntimeError as exc:
            if str(exc).startswith("DataLoader timed out"):
                raise LoaderTimeoutError(str(exc)) from exc
            add_context(exc, self._note())
            raise
        except Exception as exc:
            add_context(exc, self._note())
            raise
        self._batches += 1
        return batch

    def _note(self) -> str:
        return f"fastfeed: while loading batch #{self._batches} of the epoch (worker processes)"


def start_process_iter(loader: Any, tracked: Any) -> ProcessIter:
    """Start torch's own worker-process iterator for ``loader`` (a fastfeed DataLoader).

    For the duration of this call only, torch's iterator reads the tracked sampler
    (``tracked``; None: the loader's own) and fastfeed's worker init, set straight into
    the loader's ``__dict__`` past torch's ``__setattr__`` guard.
    """
    persistent = bool(loader.persistent_workers)
    user_init = loader.worker_init_fn
    user_collate = loader.collate_fn
    batch_attr = "batch_sampler" if _tp.auto_collation(loader) else "sampler"
    original = loader.__dict__[batch_attr]
    transport = None
    reused = persistent and getattr(loader, "_iterator", None) is not None
    if _tp.auto_collation(loader) and enabled() and not reused:
        transport = SlotTransport(
            loader.num_workers,
            slots_per_worker(getattr(loader, "prefetch_factor", None)),
            getattr(loader, "recorder", None),
        )
        wrapped = None if user_collate is _default_collate else user_collate
        loader.__dict__["collate_fn"] = SlotCollate(wrapped, transport.spec())
    hook = fetch_started if transport is not None else None
    loader.__dict__["worker_init_fn"] = _tp.WorkerInit(user_init, hook)
    if tracked is not None:
        loader.__dict__[batch_attr] = tracked
        _tp.set_persistent_index_sampler(loader, tracked)
    try:
        with warnings.catch_warnings():
            # Given once at construction already; torch would repeat it every epoch.
            warnings.filterwarnings("ignore", message="'pin_memory' argument is set as true")
            warnings.filterwarnings("ignore", message="pin_memory_device is deprecated")
            inner = _torch_class(loader).__iter__(loader)
    except BaseException:
        if transport is not None:
            transport.close()
        raise
    finally:
        loader.__dict__["worker_init_fn"] = user_init
        loader.__dict__["collate_fn"] = user_collate
        loader.__dict__[batch_attr] = original
    if transport is not None:
        inner._fastfeed_transport = transport  # type: ignore[attr-defined]
    return ProcessIter(inner, persistent, getattr(inner, "_fastfeed_transport", None))


def _torch_class(loader: Any) -> Any:
    """torch's own ``DataLoader`` class among ``loader``'s bases.

    Found in the class hierarchy, not by name: a script that makes fastfeed's class the
    global default (``torch.utils.data.DataLoader = fastfeed.DataLoader``, as PyTorch's
    own test file can be run against it) would otherwise have this call itself forever.
    """
    for cls in type(loader).__mro__:
        if cls.__module__ == "torch.utils.data.dataloader" and cls.__name__ == "DataLoader":
            return cls
    raise TypeError(f"{type(loader).__name__} does not derive from torch's DataLoader")
