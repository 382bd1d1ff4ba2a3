"""The thread engine of the drop-in DataLoader: a worker pool and one epoch's iterator.

How it keeps torch's semantics:

- The sampler (batch sampler) is advanced only in the consumer's thread, exactly as
  torch's main process does: ``prefetch_factor * num_workers`` batches of indices queued
  ahead at ``iter()``, one more per batch handed over; with ``num_workers=0`` the
  sampler advances inside ``next()`` only.
- Each worker thread has torch's :class:`WorkerInfo` (``id``, ``num_workers``,
  ``seed = base_seed + id``, ``dataset``) answered by ``torch.utils.data.get_worker_info()``
  in that thread only (:mod:`fastfeed._torch_compat.torch_private`).
- An IterableDataset gets one stream per worker, tasks assigned round-robin over the
  workers still active, as torch assigns them to worker processes: the same batches in
  the same order when the dataset shards itself by worker id.
- Several live iterators over one loader each get their own pool (torch's
  non-persistent iterators do the same); a persistent pool serves one iterator at a
  time and is re-used by the next ``iter()`` once its iterator is finished or dropped.
- ``worker_init_fn`` runs once at the start of each worker thread. Threads share the
  process's RNGs: a ``worker_init_fn`` that reseeds them would reseed the training loop
  (and repeat the same augmentations every epoch), so fastfeed restores what it changed
  and warns, naming the fix (:data:`RNG_WARNING`).
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from fastfeed._torch_compat.fetch import END, STALE, Failed, Fetch, Task, describe
from fastfeed._torch_compat.rngstate import rng_changes, rng_restore, rng_save
from fastfeed._torch_compat.torch_private import THREAD_INFO, WorkerInfo
from fastfeed.errors import FastFeedError, LoaderTimeoutError
from fastfeed.pipeline.prefetch import Prefetcher
from fastfeed.profiling import Recorder

__all__ = ["RNG_WARNING", "Pool", "ThreadIter"]

_POLL_S = 0.05  # how often a worker waiting for indices looks at the closed flag, seconds
_INIT_WAIT_S = 60.0  # longest iter() waits for worker_init_fn in every thread, seconds

RNG_WARNING = (
    "worker_init_fn changed the process-wide RNG state ({names}) in thread worker {id}. "
    "Thread workers share the training loop's RNGs, so seeding them there would reseed "
    "your training loop and repeat the same random values every epoch; fastfeed restored "
    "them. For torch's per-worker seeding pass worker_type='process' (what "
    "worker_type='auto' picks when a worker_init_fn is given), or draw per-sample "
    "randomness from fastfeed.sample_rng() / get_worker_info().seed."
)


class _Feed:
    """The queue of tasks the workers pull from; only the consumer's thread fills it.

    Iterating blocks (polling a closed flag) while empty, so the Prefetcher over it never
    sees the end of an epoch; the consumer counts outstanding tasks instead. ``close()``
    ends the iteration, which lets the workers exit. A C ``SimpleQueue`` rather than a
    ``Condition`` over a deque: put and get take no Python-level lock (about 6 us a batch
    less between the consumer and a worker thread).
    """

    def __init__(self) -> None:
        self._items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> Task:
        while not self._closed:
            try:
                item = self._items.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if item is _CLOSED:
                self._items.put(_CLOSED)  # for the next waiting worker
                break
            return item  # type: ignore[no-any-return]
        raise StopIteration

    def put(self, task: Task) -> None:
        self._items.put(task)

    def clear(self) -> None:
        try:
            while True:
                if self._items.get_nowait() is _CLOSED:
                    self._items.put(_CLOSED)
                    return
        except queue.Empty:
            pass

    def close(self) -> None:
        self._closed = True
        self._items.put(_CLOSED)  # wakes a waiting worker now, which wakes the next


_CLOSED = object()  # put by _Feed.close()


class _Inits:
    """The worker threads' start-up books: how many ran ``worker_init_fn``, what it changed."""

    def __init__(self, expected: int) -> None:
        self.lock = threading.Lock()
        self.expected = expected
        self.count = 0
        self.rng_changes: list[tuple[int, list[str]]] = []  # (worker id, RNG names)
        self.done = threading.Event()
        if expected == 0:
            self.done.set()

    def one_done(self) -> None:
        with self.lock:
            self.count += 1
            if self.count >= self.expected:
                self.done.set()


class Pool:
    """Worker threads (a Prefetcher) over a task feed, for one or many epochs.

    Args:
        fetch: The work function.
        num_threads: Worker threads (0: run inline in the consumer's thread).
        depth: Batches in flight or ready, at most.
        in_order: Yield in sampler order.
        timeout_s: Longest wait for one batch (None: no limit).
        recorder: Receives the queue figures.
        worker_init_fn: The user's, called with the worker id in each thread.
        base_seed: This pool's base seed (worker ``seed = base_seed + id``).
    """

    def __init__(
        self,
        fetch: Fetch,
        *,
        num_threads: int,
        depth: int,
        in_order: bool,
        timeout_s: float | None,
        recorder: Recorder,
        worker_init_fn: Callable[[int], None] | None,
        base_seed: int,
    ) -> None:
        self.fetch = fetch
        self.feed = _Feed()
        self.gen = 0
        self.pid = os.getpid()
        self.base_seed = base_seed
        self.num_threads = num_threads
        # Shared with the threads' init; never a reference to the pool itself (running
        # threads are GC roots: the pool could then never be collected and stopped).
        inits = _Inits(num_threads)
        self._inits = inits
        ids = itertools.count()
        dataset = fetch.dataset

        def thread_init() -> None:
            try:
                with inits.lock:
                    worker_id = next(ids)
                THREAD_INFO.info = WorkerInfo(
                    id=worker_id,
                    num_workers=num_threads,
                    seed=base_seed + worker_id,
                    dataset=dataset,
                    worker_method="thread",
                )
                if worker_init_fn is not None:
                    before = rng_save()
                    worker_init_fn(worker_id)
                    changed = rng_changes(before)
                    if changed:
                        rng_restore(before, changed)
                        with inits.lock:
                            inits.rng_changes.append((worker_id, changed))
            finally:
                inits.one_done()

        self.prefetcher: Prefetcher[Task, Any] = Prefetcher(
            self.feed,
            fetch,
            num_threads=num_threads,
            depth=depth,
            in_order=in_order,
            timeout_s=timeout_s,
            describe=describe,
            recorder=recorder,
            thread_init=thread_init if num_threads > 0 else None,
            role="dataloader",
        )
        # Close the feed first: a worker waiting in it for indices then exits at once.
        self._finalizer = weakref.finalize(self, _close_pool, fetch, self.feed, self.prefetcher)

    def wait_inits(self) -> list[tuple[int, list[str]]]:
        """Wait (bounded) until every thread ran ``worker_init_fn``; RNG changes seen."""
        self._inits.done.wait(_INIT_WAIT_S)
        with self._inits.lock:
            return list(self._inits.rng_changes)

    def close(self) -> None:
        """Stop and join the worker threads. Idempotent."""
        self._finalizer()

    def abandon(self) -> None:
        """Forget a pool inherited across ``fork``: its threads do not exist here, and
        its locks may have been held by them, so nothing of it is touched."""
        self._finalizer.detach()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    @property
    def forked(self) -> bool:
        """True in a child process that inherited this pool (its threads are gone)."""
        return os.getpid() != self.pid


def _close_pool(fetch: Fetch, feed: _Feed, prefetcher: Prefetcher[Task, Any]) -> None:
    fetch.stopped = True
    feed.close()
    prefetcher.close()


class ThreadIter:
    """One epoch over a :class:`Pool`; advances the sampler in the consumer's thread.

    Args:
        pool: The pool that runs the tasks.
        sampler_iter: The index sampler's iterator for this epoch.
        owns_pool: Close the pool when the epoch ends (not for a persistent pool).
        ahead: Tasks kept queued ahead (``prefetch_factor * num_workers``).
        timeout: The loader's ``timeout``, seconds (for the message).
        sampler_len: ``len()`` of the index sampler (the iterator's ``len``).
        iterable: The dataset is an IterableDataset.
        main_iter: ``iter(dataset)`` made in the caller's thread (``num_workers=0``).
        len_called: What ``len(loader)`` reported for an IterableDataset (warning).
        dataset: For the over-length warning's text.
    """

    def __init__(
        self,
        pool: Pool,
        sampler_iter: Iterator[Any],
        *,
        owns_pool: bool,
        ahead: int,
        timeout: float,
        sampler_len: Callable[[], int],
        iterable: bool,
        main_iter: Iterator[Any] | None = None,
        len_called: int | None = None,
        dataset: Any = None,
    ) -> None:
        self._pool = pool
        self._owns_pool = owns_pool
        pool.gen += 1
        self._gen = pool.gen
        pool.feed.clear()  # tasks of a previous epoch that no worker took yet
        self._sampler_iter = sampler_iter
        self._sampler_done = False
        self._outstanding = 0  # tasks of this epoch put in the feed, result not yet taken
        threads = pool.num_threads
        self._threaded = threads > 0
        self._ahead = ahead  # tasks in flight (threads; num_workers=0 runs inline)
        self._timeout = timeout
        self._sampler_len = sampler_len
        self._done = False
        self._closed = False  # DataLoader.close() stopped it mid-epoch
        self._iterable = iterable
        self._len_called = len_called
        self._dataset = dataset
        self._num_yielded = 0
        if iterable:
            n = max(threads, 1)
            infos: list[WorkerInfo | None] = [None]
            if threads > 0:
                infos = [
                    WorkerInfo(
                        id=w,
                        num_workers=n,
                        seed=pool.base_seed + w,
                        dataset=pool.fetch.dataset,
                        worker_method="thread",
                    )
                    for w in range(n)
                ]
            pool.fetch.start_streams(self._gen, infos, main_iter)
            self._active = [True] * n
            self._cycle = itertools.cycle(range(n))
            self._seq = [0] * n
        if threads > 0:
            # torch primes prefetch_factor * num_workers batches when the iterator is made.
            self._fill()

    def __iter__(self) -> ThreadIter:
        return self

    def __len__(self) -> int:
        return self._sampler_len()

    def _fill(self) -> None:
        while not self._sampler_done and self._outstanding < self._ahead:
            worker = None
            if self._iterable:
                worker = self._next_worker()
                if worker is None:
                    return
            try:
                index = next(self._sampler_iter)
            except StopIteration:
                self._sampler_done = True
                break
            self._pool.feed.put(self._task(index, worker))
            self._outstanding += 1

    def _task(self, index: Any, worker: int | None) -> Task:
        """The task for ``index``; an IterableDataset's names its worker and sequence."""
        if worker is None:
            return Task(self._gen, index)
        seq = self._seq[worker]
        self._seq[worker] = seq + 1
        return Task(self._gen, index, worker, seq)

    def _next_worker(self) -> int | None:
        # torch's _try_put_index: the next worker in the cycle that is still active.
        for _ in range(len(self._active)):
            w = next(self._cycle)
            if self._active[w]:
                return w
        return None

    def _finish(self) -> None:
        self._done = True
        if self._owns_pool:
            self._pool.close()

    def close(self, *, by_loader: bool = False) -> None:
        """Stop this iterator (its pool too when it owns it). Idempotent.

        Args:
            by_loader: ``DataLoader.close()`` did it: a later ``next()`` says so instead
                of ending the epoch silently.
        """
        if self._done:
            return
        self._closed = by_loader
        self._finish()

    @property
    def live(self) -> bool:
        """Still delivering this epoch (not finished, not closed)."""
        return not self._done

    def __next__(self) -> Any:
        if self._done:
            if self._closed:
                # Not a silent StopIteration: that would end the epoch early unnoticed.
                raise FastFeedError(
                    "this DataLoader was closed (DataLoader.close()) during the epoch; its "
                    "iterator delivers no more batches: call iter(loader) to start a new one"
                )
            raise StopIteration
        if self._pool.forked:
            raise FastFeedError(
                f"this DataLoader iterator was created in process {self._pool.pid}, before "
                "a fork: its worker threads do not exist in this process. Call "
                "iter(loader) in this process to start new ones"
            )
        if self._pool.closed:
            self.close(by_loader=True)
            return self.__next__()
        if not self._threaded:
            return self._next_inline()
        while True:
            self._fill()
            if self._outstanding == 0:
                self._finish()
                raise StopIteration
            try:
                task, result = next(self._pool.prefetcher)
            except LoaderTimeoutError as exc:
                raise LoaderTimeoutError(
                    f"DataLoader timed out after {self._timeout} seconds: {exc}",
                    in_flight=exc.in_flight,
                ) from exc
            except StopIteration:
                if self._pool.closed:  # DataLoader.close() from another thread: say so
                    self.close(by_loader=True)
                    return self.__next__()
                self._finish()  # raised by the dataset: torch ends the epoch then too
                raise
            if task.gen != self._gen or result is STALE:
                continue  # left over from an abandoned epoch of a persistent pool
            self._outstanding -= 1
            if isinstance(result, END):
                self._active[result.worker] = False
                if not any(self._active):
                    self._sampler_done = True
                continue
            # Refill as the batch is handed over, as torch does (_try_put_index in
            # _next_data), before a failure is raised too. (num_workers=0 runs inline,
            # where torch advances the sampler only inside next().)
            self._fill()
            if isinstance(result, Failed):
                raise result.exc
            self._count_yield()
            return result

    def _next_inline(self) -> Any:
        # num_workers=0: the task runs right here, as torch's single-process fetcher
        # does; no feed, no prefetcher, no locks (about 9 us a batch less).
        fetch = self._pool.fetch
        while True:
            worker = self._next_worker() if self._iterable else None
            if self._sampler_done or (self._iterable and worker is None):
                self._finish()
                raise StopIteration
            try:
                index = next(self._sampler_iter)
            except StopIteration:
                self._sampler_done = True
                continue
            try:
                result = fetch(self._task(index, worker))
            except StopIteration:
                self._finish()  # raised by the dataset: torch ends the epoch too
                raise
            if isinstance(result, END):
                self._active[result.worker] = False
                continue
            if isinstance(result, Failed):
                raise result.exc
            self._count_yield()
            return result

    def _count_yield(self) -> None:
        # torch's warning when an IterableDataset yields more than the len() it reported.
        self._num_yielded += 1
        if self._iterable and self._len_called is not None and self._num_yielded > self._len_called:
            import warnings

            msg = (
                f"Length of IterableDataset {self._dataset} was reported to be "
                f"{self._len_called}(when accessing len(dataloader)), but "
                f"{self._num_yielded} samples have been fetched. "
            )
            if self._threaded:  # torch's text with workers (threads stand in for processes)
                msg += (
                    "For multiprocessing data-loading, this could be caused by not properly "
                    "configuring the IterableDataset replica at each worker. Please see "
                    "https://pytorch.org/docs/stable/data.html#torch.utils.data.IterableDataset "
                    "for examples."
                )
            warnings.warn(msg, stacklevel=4)
