"""Consumer-side hooks: measure how long a training loop waits on ANY data loader.

The first question before switching loaders is whether the current one holds training
back. :func:`watch` wraps an existing iterable (a ``torch.utils.data.DataLoader``,
fastfeed's own loaders, a generator) without changing what it yields::

    from fastfeed.hooks import watch

    loader = watch(torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=4))
    for epoch in range(epochs):
        for images, labels in loader:          # same batches, same order
            ...                                # the training step
        print(loader.stats().summary())        # "input-bound: 41% of step time waiting ..."

It times, on the consumer's side only, each ``next()`` (the *wait*: the loop is blocked
on the loader) and the time between two hand-overs (the *step*: wait + the loop's own
work), and reports both to a :class:`~fastfeed.profiling.Recorder` exactly as fastfeed's
loaders do. :meth:`Watched.stats` turns that into a
:class:`~fastfeed.stats.LoaderStats`: stall fraction, step and wait percentiles,
samples/s and the verdict (compute-bound below 5% stall, partially input-bound below
20%, input-bound from 20%). Which *stage* of an opaque loader is slow cannot be seen
from outside; fastfeed's own loaders record their stages and name it.

The wait for each epoch's first batch (worker start-up, prefetch fill) is start-up cost,
reported as ``startup_wait_s`` and kept out of the steady-state stall fraction.

fastfeed's own loaders have the same ``stats()`` method, with per-stage figures too.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

import torch

from fastfeed.pipeline.tap import Tap
from fastfeed.profiling import Recorder
from fastfeed.stats import LoaderStats

__all__ = ["Watched", "watch"]

_T = TypeVar("_T")


def _batch_len(batch: Any) -> int:
    """Samples in a batch: the leading dimension of its first tensor (1 when unknown)."""
    if torch.is_tensor(batch):
        return int(batch.shape[0]) if batch.dim() > 0 else 1
    if isinstance(batch, Mapping):
        for value in batch.values():
            return _batch_len(value)
        return 1
    if isinstance(batch, (list, tuple)) and batch:
        first = batch[0]
        if torch.is_tensor(first) or isinstance(first, (Mapping, list, tuple)):
            return _batch_len(first)
        return len(batch)
    return 1


class Watched(Generic[_T]):
    """An iterable that yields exactly what ``loader`` yields and times the hand-overs.

    Create with :func:`watch`. Each ``iter()`` starts one pass over ``loader`` (an epoch).

    Attributes:
        loader: The wrapped iterable.
        recorder: Where the waits and steps are reported.
        batches: Batches handed to the training loop so far.
        samples: Samples in them (leading dimension of each batch's first tensor).
    """

    def __init__(
        self, loader: Iterable[_T], recorder: Recorder, num_threads: int | None = None
    ) -> None:
        self.loader = loader
        self.recorder = recorder
        self.num_threads = num_threads
        self.batches = 0
        self.samples = 0

    def __iter__(self) -> Iterator[_T]:
        # The first wait includes iter(): starting worker processes is start-up cost too.
        start = time.perf_counter()
        for batch in Tap(iter(self.loader), self.recorder, started_s=start):
            self.batches += 1
            self.samples += _batch_len(batch)
            yield batch

    def __len__(self) -> int:
        """``len(loader)`` (TypeError when the wrapped iterable has no length)."""
        return len(self.loader)  # type: ignore[arg-type]

    def reset(self) -> None:
        """Forget everything measured so far (e.g. after a warm-up epoch)."""
        self.recorder.reset()
        self.batches = 0
        self.samples = 0

    def stats(self, *, gather: bool = False) -> LoaderStats:
        """What was measured, with a verdict (see the module docstring).

        Args:
            gather: Also gather every rank's figures under ``torch.distributed`` and name
                the slowest rank (a collective: every rank must call it).
        """
        stats = LoaderStats.collect(
            self.recorder,
            batch_size=None,
            num_threads=self.num_threads,
            source_kind="opaque",
            gather=gather,
        )
        # An opaque loader reports no stages, from which LoaderStats estimates samples.
        if stats.samples == 0 and self.samples:
            stats.samples = self.samples
            stats.samples_per_s = self.samples / stats.elapsed_s
        return stats

    def __repr__(self) -> str:
        return f"watch({self.loader!r})"


def watch(
    loader: Iterable[_T], *, recorder: Recorder | None = None, num_threads: int | None = None
) -> Watched[_T]:
    """Wrap ``loader`` so the training loop's waits on it are measured.

    Args:
        loader: Any iterable of batches, typically a ``torch.utils.data.DataLoader``.
        recorder: Report into this recorder (default: a new one).
        num_threads: The loader's parallelism, for the report (default:
            ``loader.num_workers`` when it has one).

    Returns:
        A :class:`Watched` iterable yielding the same batches.
    """
    if num_threads is None:
        workers = getattr(loader, "num_workers", None)
        num_threads = workers if isinstance(workers, int) else None
    return Watched(loader, recorder if recorder is not None else Recorder(), num_threads)
