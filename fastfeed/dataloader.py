"""``fastfeed.DataLoader``: a drop-in for :class:`torch.utils.data.DataLoader` on threads.

``from fastfeed import DataLoader`` and nothing else changes: the constructor has
torch's signature, defaults, validation (the same exception types and messages, since
it *is* a subclass whose ``__init__`` runs torch's), attributes, ``len()`` and batches.
What changes is how ``num_workers`` run: as threads of this process by default
(no pickled dataset copies, no shared-memory IPC of batches, instant start), or as
torch's own worker processes with ``worker_type="process"`` for transforms that hold
the GIL.

How the thread mode keeps torch's semantics:

- The sampler (batch sampler) is advanced only in the consumer's thread, exactly as
  torch's main process does: ``iter(sampler)`` then one base-seed draw from
  ``generator`` (or the global RNG) per iterator, ``prefetch_factor * num_workers``
  batches of indices queued ahead at ``iter()``, one more per batch consumed. The same
  ``generator`` therefore gives the same order, epoch after epoch, and the RNG stream
  stays in step with torch's. With ``persistent_workers=True`` the seed is drawn once,
  as torch's persistent iterator does.
- Map-style batches are fetched (``__getitems__`` when the dataset has it, else
  ``dataset[i]`` per index) and collated on a worker thread; ``in_order`` is honoured.
- An :class:`~torch.utils.data.IterableDataset` is iterated once, by one worker thread
  (never split or duplicated across threads): it yields each sample once, as torch
  with ``num_workers=0`` does. ``get_worker_info()`` from torch is None there, so a
  self-sharding dataset yields everything once.

Differences from torch, each explicit:

- Thread workers share one dataset object (torch gives each worker process a copy):
  ``__getitem__`` / ``__getitems__`` must be safe to call from several threads at once
  (open per-thread handles lazily, e.g. in ``threading.local``), or use
  ``worker_type="process"``.
- Thread workers share the process: ``torch.utils.data.get_worker_info()`` is None
  in them (torch's ``default_collate`` uses it to switch to shared memory, which
  threads do not need). :func:`get_worker_info` in this module returns a thread-local
  :class:`~torch.utils.data._utils.worker.WorkerInfo` (``worker_method="thread"``,
  ``seed = base_seed + id``) in a worker thread and torch's answer elsewhere.
  Threads cannot be seeded separately: random transforms running on several worker
  threads draw from the shared global RNGs in a nondeterministic interleaving.
- ``worker_init_fn(worker_id)`` is called once at the start of each worker thread
  (ids ``0..num_workers-1``). An IterableDataset runs on one thread, so only id 0.
- Errors raised by the dataset or ``collate_fn`` arrive as
  :class:`~fastfeed.errors.SampleError` naming the index and stage, the original
  chained, and the error is *also* an instance of the original type (``except
  KeyError`` keeps working as with torch) whenever that type can be combined. With
  ``worker_type="process"`` torch does not report the index: the error names the
  batch's position in the epoch, stage ``"worker"``, and chains torch's exception,
  whose message holds the worker's traceback.
- ``timeout`` raises :class:`~fastfeed.errors.LoaderTimeoutError`, which is both a
  ``TimeoutError`` and the ``RuntimeError`` torch raises.
- Raised as :class:`~fastfeed.errors.ConfigError` (a ValueError) at construction,
  where torch fails later or cannot apply: ``timeout > 0`` with ``num_workers=0``
  (torch asserts on ``iter()``), ``prefetch_factor=0`` with workers (torch asserts
  on ``iter()``), ``multiprocessing_context`` with thread workers, an unknown
  ``worker_type``, an unusable ``device``.
- ``pin_memory=True`` without an accelerator warns once per loader (torch warns once
  per epoch). The torch warning that ``num_workers`` exceeds the CPU count is only
  given for process workers: more threads than cores is fine for work that releases
  the GIL.
- One live iterator per loader: ``iter(loader)`` stops the threads of the previous
  iterator; advancing that superseded iterator afterwards raises ConfigError instead
  of silently ending (torch's persistent-worker iterator has the same one-at-a-time
  rule; torch's non-persistent one would keep a second worker set running).
"""

from __future__ import annotations

import functools
import itertools
import threading
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import torch
from torch.utils.data import DataLoader as _TorchDataLoader
from torch.utils.data import IterableDataset
from torch.utils.data._utils.worker import WorkerInfo

from fastfeed.errors import ConfigError, FastFeedError, LoaderTimeoutError, SampleError
from fastfeed.pipeline.assemble import Pipeline, PipelineSpec, assemble
from fastfeed.pipeline.collate import Collator
from fastfeed.pipeline.prefetch import Prefetcher
from fastfeed.pipeline.staging import resolve_device
from fastfeed.profiling import Recorder, Stage
from fastfeed.stats import LoaderStats

__all__ = ["DataLoader", "get_worker_info"]

_T_co = TypeVar("_T_co", covariant=True)

_POLL_S = 0.05  # how often a worker waiting for indices looks at the closed flag, seconds
_WORKER_TYPES = ("thread", "process")
_SHOWN_INDICES = 8  # indices shown in error messages before "..."


# -- worker info ----------------------------------------------------------------------

_local = threading.local()


def get_worker_info() -> WorkerInfo | None:
    """Worker information for the calling thread, like torch's ``get_worker_info``.

    In a fastfeed worker thread: a :class:`WorkerInfo` with ``id`` (0..num_workers-1),
    ``num_workers``, ``seed`` (base seed + id), ``dataset`` (the shared dataset object)
    and ``worker_method="thread"``. Elsewhere (the main thread, or a torch worker
    process with ``worker_type="process"``): ``torch.utils.data.get_worker_info()``.
    """
    info = getattr(_local, "info", None)
    if info is not None:
        return info
    return torch.utils.data.get_worker_info()


# -- errors ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _dual_class(cause_type: type[BaseException]) -> type[SampleError] | None:
    """A SampleError subclass that is also ``cause_type``; None if they cannot combine."""
    if issubclass(cause_type, SampleError) or not issubclass(cause_type, Exception):
        return None

    def __new__(cls: type, *args: Any, **kwargs: Any) -> Any:
        # The cause type's own __new__ may interpret SampleError's arguments (OSError
        # would take the index for an errno): build a bare instance instead.
        return cause_type.__new__(cls)

    try:
        cls = type(
            "SampleError",
            (SampleError, cause_type),
            {
                "__new__": __new__,
                "__str__": BaseException.__str__,  # not KeyError's repr() or OSError's errno form
                "__module__": __name__,
                "__qualname__": f"SampleError[{cause_type.__qualname__}]",
            },
        )
    except TypeError:  # instance layout conflict
        return None
    return cls


def _sample_error(index: int | None, where: str, stage: str, cause: Exception) -> SampleError:
    """A SampleError for ``cause``, also an instance of ``type(cause)`` when feasible."""
    cls = _dual_class(type(cause))
    if cls is not None:
        try:
            return cls(index, where, stage, cause)
        except Exception:  # the cause type's __init__ wants other arguments
            pass
    return SampleError(index, where, stage, cause)


def _short(indices: Any) -> str:
    if not isinstance(indices, (list, tuple)):
        return repr(indices)
    shown = ", ".join(repr(i) for i in indices[:_SHOWN_INDICES])
    more = f", ... ({len(indices)} in all)" if len(indices) > _SHOWN_INDICES else ""
    return f"[{shown}{more}]"


# -- tasks and outcomes -----------------------------------------------------------------


class _Task:
    """One batch of indices (or one index without auto-batching) of one epoch.

    Attributes:
        gen: The epoch generation the task belongs to; results of an older generation
            (a persistent pool reset mid-epoch) are dropped by the consumer.
        index: What the index sampler yielded (a list of indices, or one index).
    """

    __slots__ = ("gen", "index")

    def __init__(self, gen: int, index: Any) -> None:
        self.gen = gen
        self.index = index

    @property
    def indices(self) -> list[int]:
        """Dataset indices of the task (empty for an IterableDataset)."""
        idx = self.index if isinstance(self.index, (list, tuple)) else [self.index]
        return [i for i in idx if isinstance(i, int)]


def _describe(task: _Task) -> str:
    if task.indices:
        return f"batch {_short(task.index)}"
    n = len(task.index) if isinstance(task.index, (list, tuple)) else 1
    return f"a batch of {n} sample(s) from the IterableDataset"


class _Failed:
    """An exception raised by a task, carried to the consumer as a value."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_END = object()  # the IterableDataset is exhausted
_STALE = object()  # a task of an older generation (nothing was read)


class _Feed:
    """The queue of tasks the workers pull from; only the consumer's thread fills it.

    Iterating blocks (polling a closed flag) while empty, so the Prefetcher over it never
    sees the end of an epoch; the consumer counts outstanding tasks instead. ``close()``
    ends the iteration, which lets the workers exit.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: deque[_Task] = deque()
        self._closed = False

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> _Task:
        with self._cond:
            while True:
                if self._closed:
                    raise StopIteration
                if self._items:
                    return self._items.popleft()
                self._cond.wait(_POLL_S)

    def put(self, task: _Task) -> None:
        with self._cond:
            self._items.append(task)
            self._cond.notify()

    def clear(self) -> None:
        with self._cond:
            self._items.clear()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class _Stream:
    """One epoch's iterator over an IterableDataset."""

    __slots__ = ("count", "ended", "it")

    def __init__(self, it: Iterator[Any]) -> None:
        self.it = it
        self.ended = False
        self.count = 0  # samples taken so far (names a failing sample)


class _Fetch:
    """Runs one task on a worker thread: read the samples, collate them.

    Holds no reference to the DataLoader or its iterator, so dropping those lets the
    garbage collector stop the threads.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        iterable: bool,
        auto_collation: bool,
        drop_last: bool,
        collator: Collator,
        recorder: Recorder,
    ) -> None:
        self.dataset = dataset
        self.name = type(dataset).__name__
        self.iterable = iterable
        self.auto_collation = auto_collation
        self.drop_last = drop_last
        self.collator = collator
        self.recorder = recorder
        getitems = getattr(dataset, "__getitems__", None)
        self.getitems = getitems if getitems else None  # torch's truthiness test
        self._lock = threading.Lock()
        self._streams: dict[int, _Stream] = {}

    def start_stream(self, gen: int, it: Iterator[Any]) -> None:
        """Begin generation ``gen`` of an IterableDataset with iterator ``it``."""
        with self._lock:
            self._streams = {gen: _Stream(it)}

    def __call__(self, task: _Task) -> Any:
        try:
            if self.iterable:
                return self._iterable(task)
            return self._map(task)
        except StopIteration:
            raise  # torch semantics: StopIteration from the dataset ends the epoch
        except Exception as exc:
            return _Failed(exc)

    def _get(self, i: Any) -> Any:
        try:
            return self.dataset[i]
        except (StopIteration, SampleError):
            raise
        except Exception as exc:
            raise _sample_error(_as_int(i), f"{self.name}[{i!r}]", Stage.READ, exc) from exc

    def _map(self, task: _Task) -> Any:
        index = task.index
        rec = self.recorder
        if not self.auto_collation:
            with rec.span(Stage.READ, items=1):
                data = self._get(index)
            return self._collate(data, index, 1)
        n = len(index)
        with rec.span(Stage.READ, items=n):
            if self.getitems is not None:
                try:
                    data = self.getitems(index)
                except (StopIteration, SampleError):
                    raise
                except Exception as exc:
                    where = f"{self.name}.__getitems__({_short(index)})"
                    raise _sample_error(None, where, Stage.READ, exc) from exc
            else:
                data = [self._get(i) for i in index]
        return self._collate(data, index, n)

    def _iterable(self, task: _Task) -> Any:
        with self._lock:
            stream = self._streams.get(task.gen)
        if stream is None:
            return _STALE
        if stream.ended:
            return _END
        rec = self.recorder
        if not self.auto_collation:
            with rec.span(Stage.READ, items=1):
                data = self._next_sample(stream)
            if data is _END:
                return _END
            return self._collate(data, stream.count - 1, 1)
        n = len(task.index)
        samples: list[Any] = []
        with rec.span(Stage.READ, items=n):
            for _ in range(n):
                sample = self._next_sample(stream)
                if sample is _END:
                    break
                samples.append(sample)
        if not samples or (self.drop_last and len(samples) < n):
            stream.ended = True
            return _END
        first = stream.count - len(samples)
        return self._collate(samples, f"samples {first}..{stream.count - 1}", len(samples))

    def _next_sample(self, stream: _Stream) -> Any:
        try:
            sample = next(stream.it)
        except StopIteration:
            stream.ended = True
            return _END
        except SampleError:
            raise
        except Exception as exc:
            where = f"{self.name} iterator, sample {stream.count}"
            raise _sample_error(stream.count, where, Stage.READ, exc) from exc
        stream.count += 1
        return sample

    def _collate(self, data: Any, index: Any, n: int) -> Any:
        with self.recorder.span(Stage.COLLATE, items=n):
            try:
                return self.collator.collate(data)
            except (StopIteration, SampleError):
                raise
            except Exception as exc:
                where = f"batch {_short(index)}" if not isinstance(index, str) else index
                raise _sample_error(None, where, Stage.COLLATE, exc) from exc


def _as_int(i: Any) -> int | None:
    try:
        return int(i)
    except (TypeError, ValueError):
        return None


# -- the worker pool --------------------------------------------------------------------


class _Pool:
    """Worker threads (a Prefetcher) over a task feed, for one or many epochs."""

    def __init__(
        self,
        fetch: _Fetch,
        *,
        num_threads: int,
        depth: int,
        in_order: bool,
        timeout_s: float | None,
        recorder: Recorder,
        worker_init_fn: Callable[[int], None] | None,
        base_seed: int,
        num_workers: int,
    ) -> None:
        self.fetch = fetch
        self.feed = _Feed()
        self.gen = 0
        ids = itertools.count()
        ids_lock = threading.Lock()
        dataset = fetch.dataset

        def thread_init() -> None:
            with ids_lock:
                worker_id = next(ids)
            _local.info = WorkerInfo(
                id=worker_id,
                num_workers=num_workers,
                seed=base_seed + worker_id,
                dataset=dataset,
                worker_method="thread",
            )
            if worker_init_fn is not None:
                worker_init_fn(worker_id)

        self.prefetcher: Prefetcher[_Task, Any] = Prefetcher(
            self.feed,
            fetch,
            num_threads=num_threads,
            depth=depth,
            in_order=in_order,
            timeout_s=timeout_s,
            describe=_describe,
            recorder=recorder,
            thread_init=thread_init if num_threads > 0 else None,
            role="dataloader",
        )
        # Close the feed first: a worker waiting in it for indices then exits at once.
        self._finalizer = weakref.finalize(self, _close_pool, self.feed, self.prefetcher)

    def close(self) -> None:
        """Stop and join the worker threads. Idempotent."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive


def _close_pool(feed: _Feed, prefetcher: Prefetcher[_Task, Any]) -> None:
    feed.close()
    prefetcher.close()


# -- iterators ------------------------------------------------------------------------


class _ThreadIter:
    """One epoch over a :class:`_Pool`; advances the sampler in the consumer's thread."""

    def __init__(self, loader: DataLoader[Any], pool: _Pool, sampler_iter: Iterator[Any]) -> None:
        self._pool = pool
        self._owns_pool = not loader._persistent_threads
        pool.gen += 1
        self._gen = pool.gen
        pool.feed.clear()  # tasks of a previous epoch that no worker took yet
        self._sampler_iter = sampler_iter
        self._sampler_done = False
        self._outstanding = 0  # tasks of this epoch put in the feed, result not yet taken
        threads = pool.prefetcher.num_threads
        self._threaded = threads > 0
        self._ahead = loader.prefetch_factor * loader.num_workers if threads > 0 else 1
        self._timeout = loader.timeout
        self._done = False
        # Why this iterator stopped early: "superseded" (a later iter(loader)) or
        # "closed" (DataLoader.close()); None while running or after a normal end.
        self._stopped: str | None = None
        self._iterable = pool.fetch.iterable
        self._len_called = loader._IterableDataset_len_called
        self._num_workers = loader.num_workers
        self._num_yielded = 0
        self._dataset = loader.dataset
        self._index_sampler = loader._index_sampler
        if self._iterable:
            # Like torch's single-process fetcher: iter(dataset) in the caller's thread.
            pool.fetch.start_stream(self._gen, iter(loader.dataset))
        if threads > 0:
            # torch primes prefetch_factor * num_workers batches when the iterator is made.
            self._fill()

    def __iter__(self) -> _ThreadIter:
        return self

    def __len__(self) -> int:
        return len(self._index_sampler)

    def _fill(self) -> None:
        while not self._sampler_done and self._outstanding < self._ahead:
            try:
                index = next(self._sampler_iter)
            except StopIteration:
                self._sampler_done = True
                break
            self._pool.feed.put(_Task(self._gen, index))
            self._outstanding += 1

    def _finish(self) -> None:
        self._done = True
        if self._owns_pool:
            self._pool.close()

    def _supersede(self, *, closed: bool = False) -> None:
        """A newer ``iter(loader)`` took over, or the loader was closed (``closed``).

        Stops this iterator's threads if it owns them.
        """
        if self._done:
            return
        self._stopped = "closed" if closed else "superseded"
        self._done = True
        if self._owns_pool:
            self._pool.close()

    def __next__(self) -> Any:
        if self._done:
            if self._stopped == "superseded":
                raise ConfigError(
                    "this DataLoader iterator was superseded by a later iter(loader), which "
                    "stopped its workers; fastfeed runs one iterator per DataLoader at a time"
                )
            if self._stopped == "closed":
                # Not a silent StopIteration: that would end the epoch early unnoticed.
                raise FastFeedError(
                    "this DataLoader was closed (DataLoader.close()) during the epoch; its "
                    "iterator delivers no more batches: call iter(loader) to start a new one"
                )
            raise StopIteration
        if self._pool.closed:
            self._supersede(closed=True)
            return self.__next__()
        if self._pool.gen != self._gen:
            self._supersede()
            return self.__next__()
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
                # Raised by the dataset (torch ends the epoch then too), or the pool closed.
                self._finish()
                raise
            if task.gen != self._gen or result is _STALE:
                continue  # left over from an abandoned epoch of a persistent pool
            self._outstanding -= 1
            if result is _END:
                self._finish()
                raise StopIteration
            if self._threaded:
                # Refill as the batch is handed over, as torch does (_try_put_index in
                # _next_data): while the training step runs, prefetch_factor *
                # num_workers batches are queued, not one fewer. Before a failure is
                # raised too, like torch. Not with num_workers=0, where torch advances
                # the sampler only inside next().
                self._fill()
            if isinstance(result, _Failed):
                raise result.exc
            self._count_yield()
            return result

    def _count_yield(self) -> None:
        # torch's warning when an IterableDataset yields more than the len() it reported.
        self._num_yielded += 1
        if self._iterable and self._len_called is not None and self._num_yielded > self._len_called:
            msg = (
                f"Length of IterableDataset {self._dataset} was reported to be "
                f"{self._len_called}(when accessing len(dataloader)), but "
                f"{self._num_yielded} samples have been fetched. "
            )
            warnings.warn(msg, stacklevel=3)


def _is_worker_error(exc: BaseException) -> bool:
    # torch re-raises a worker's exception with this message (ExceptionWrapper.reraise).
    text = str(exc.args[0]) if exc.args else ""
    return text.startswith("Caught ") and "in DataLoader worker process" in text


class _ProcessIter:
    """Wraps torch's multiprocessing iterator: typed errors (the tap times the loop)."""

    def __init__(
        self, inner: Iterator[Any], timeout: float, recorder: Recorder, persistent: bool
    ) -> None:
        self._inner = inner
        self._persistent = persistent
        self._timeout = timeout
        self._batches = 0

    def __iter__(self) -> _ProcessIter:
        return self

    def __len__(self) -> int:
        return len(self._inner)  # type: ignore[arg-type]

    def _supersede(self, *, closed: bool = False) -> None:
        """A newer ``iter(loader)`` or ``close()``: stop this epoch's worker processes.

        torch's persistent iterator is shared by every epoch; the loader shuts it down.
        """
        if not self._persistent:
            shutdown = getattr(self._inner, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def __next__(self) -> Any:
        try:
            batch = next(self._inner)
        except StopIteration:
            raise
        except RuntimeError as exc:
            if str(exc).startswith("DataLoader timed out"):
                raise LoaderTimeoutError(str(exc)) from exc
            if _is_worker_error(exc):
                raise self._worker_error(exc) from exc
            raise
        except Exception as exc:
            if _is_worker_error(exc):
                raise self._worker_error(exc) from exc
            raise
        self._batches += 1
        return batch

    def _worker_error(self, exc: Exception) -> SampleError:
        # torch does not say which index failed; the worker's traceback is in the cause.
        where = f"batch #{self._batches} of the epoch, in a worker process"
        return _sample_error(None, where, "worker", exc)


class DataLoader(_TorchDataLoader[_T_co], Generic[_T_co]):
    """:class:`torch.utils.data.DataLoader` with thread workers; a drop-in replacement.

    Every torch argument keeps its meaning, default and validation (see the module
    docstring for the few, explicit, differences). The extra arguments are keyword-only.

    Args:
        dataset: Map-style or iterable-style dataset, as torch.
        batch_size: Samples per batch; None disables auto-batching.
        shuffle: Reshuffle every epoch (map-style only).
        sampler: Index order; mutually exclusive with ``shuffle``.
        batch_sampler: Yields lists of indices; mutually exclusive with ``batch_size``,
            ``shuffle``, ``sampler`` and ``drop_last``.
        num_workers: Worker threads (processes with ``worker_type="process"``);
            0 loads in the calling thread.
        collate_fn: Merges samples into a batch (``default_collate``; ``default_convert``
            without auto-batching).
        pin_memory: Return batches in page-locked memory (needs an accelerator; without
            one: a single warning, ordinary memory).
        drop_last: Drop the last incomplete batch.
        timeout: Longest wait for one batch, seconds (0: no limit); needs workers.
            Raises :class:`LoaderTimeoutError`.
        worker_init_fn: Called with the worker id at the start of each worker.
        multiprocessing_context: Start method for ``worker_type="process"`` (fork,
            spawn, forkserver or a context); ConfigError with thread workers.
        generator: RNG of the default RandomSampler and of the base seed.
        prefetch_factor: Batches queued ahead per worker (default 2 with workers).
        persistent_workers: Keep the workers alive between epochs.
        pin_memory_device: Deprecated in torch; the current accelerator is used.
        in_order: Yield batches in sampler order; False yields them as they finish.
        device: Move each batch to this device (e.g. ``"cuda"``) before yielding it.
        worker_type: ``"thread"`` (default) or ``"process"`` (torch's own worker
            processes, for transforms that hold the GIL).
        profile: Record stage times into :attr:`recorder` (False: no timing at all).

    Attributes:
        recorder: The :class:`~fastfeed.profiling.Recorder` of this loader: "read"
            (dataset fetch, including dataset transforms) and "collate" spans per batch,
            the "batches" queue and the training loop's waits.
        worker_type: ``"thread"`` or ``"process"``.
        device: The :class:`torch.device` batches are moved to, or None.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler: Any = None,
        batch_sampler: Any = None,
        num_workers: int = 0,
        collate_fn: Callable[[Any], Any] | None = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        timeout: float = 0,
        worker_init_fn: Callable[[int], None] | None = None,
        multiprocessing_context: Any = None,
        generator: torch.Generator | None = None,
        *,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        pin_memory_device: str = "",
        in_order: bool = True,
        device: str | torch.device | None = None,
        worker_type: str = "thread",
        profile: bool = True,
    ) -> None:
        if worker_type not in _WORKER_TYPES:
            raise ConfigError(
                f"worker_type must be one of {_WORKER_TYPES}, got worker_type={worker_type!r}"
            )
        # Read by check_worker_number_rationality(), which torch's __init__ calls.
        self.worker_type = worker_type
        super().__init__(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            batch_sampler=batch_sampler,
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=pin_memory,
            drop_last=drop_last,
            timeout=timeout,
            worker_init_fn=worker_init_fn,
            multiprocessing_context=multiprocessing_context,
            generator=generator,
            prefetch_factor=prefetch_factor,
            persistent_workers=persistent_workers,
            pin_memory_device=pin_memory_device,
            in_order=in_order,
        )
        if worker_type == "thread" and multiprocessing_context is not None:
            raise ConfigError(
                f"multiprocessing_context={multiprocessing_context!r} only applies to "
                "worker_type='process'; thread workers start no processes (drop the "
                "argument, or pass worker_type='process')"
            )
        if timeout > 0 and num_workers == 0:
            raise ConfigError(
                f"timeout={timeout} needs num_workers > 0: loading in the calling thread "
                "cannot be interrupted (torch raises an AssertionError on iter() here)"
            )
        if num_workers > 0 and self.prefetch_factor == 0:
            raise ConfigError(
                "prefetch_factor=0 with num_workers > 0 would queue no batch at all; "
                "pass prefetch_factor >= 1 (torch asserts the same on iter())"
            )
        self.device = None if device is None else resolve_device(device)
        self.recorder = Recorder(enabled=profile)
        if self.pin_memory and self.pin_memory_device:
            warnings.warn(
                "pin_memory_device is deprecated (as in torch): the current accelerator is "
                f"used; ignoring pin_memory_device={self.pin_memory_device!r}",
                stacklevel=2,
            )
        self._pipeline = self._assemble(pin_warning_stacklevel=5)
        self._pool: _Pool | None = None  # the persistent pool (persistent_workers only)
        # The latest iterator, so a new iter(loader) or close() can stop its workers.
        self._current: weakref.ReferenceType[_ThreadIter | _ProcessIter] | None = None

    # -- pickling ---------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        # Like torch's, the loader pickles (spawn-based launchers do that); its running
        # state (workers, iterators, figures) does not travel.
        state = self.__dict__.copy()
        state["_pool"] = None
        state["_current"] = None
        state["_iterator"] = None
        state["recorder"] = None
        state["_pipeline"] = None
        state["_profile"] = self.recorder.enabled
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        profile = state.pop("_profile", True)
        # Bypasses torch's __setattr__ guard, which forbids setting e.g. batch_size.
        self.__dict__.update(state)
        self.__dict__["recorder"] = Recorder(enabled=profile)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # given where the loader was built already
            self.__dict__["_pipeline"] = self._assemble()

    # -- configuration --------------------------------------------------------------

    @property
    def _persistent_threads(self) -> bool:
        return bool(self.persistent_workers) and self.num_workers > 0

    def check_worker_number_rationality(self) -> None:
        """torch's warning about more worker *processes* than CPUs; processes only."""
        if getattr(self, "worker_type", "thread") == "process":
            super().check_worker_number_rationality()

    def _assemble(self, pin_warning_stacklevel: int = 4) -> Pipeline:
        """This loader's wiring, decided by the one assembly point."""
        return assemble(
            PipelineSpec(
                recorder=self.recorder,
                in_flight=self._in_flight(),
                device=self.device,
                pin_memory=bool(self.pin_memory),
                collate_fn=self.collate_fn,
                timeout_s=self.timeout or None,
                num_threads=self.num_workers,
                pin_warning_stacklevel=pin_warning_stacklevel,
            )
        )

    def _in_flight(self) -> int:
        """Batches a thread pool keeps in flight or ready (torch's prefetch_factor * workers)."""
        return (self.prefetch_factor or 1) * max(self.num_workers, 1)

    # -- iteration ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        it: _ThreadIter | _ProcessIter
        if self.worker_type == "process" and self.num_workers > 0:
            it = self._process_iter()
        else:
            it = self._thread_iter()
        return self._pipeline.deliver(it)

    def _process_iter(self) -> _ProcessIter:
        previous = self._current() if self._current is not None else None
        if previous is not None:
            previous._supersede()
        with warnings.catch_warnings():
            # Given once at construction already; torch would repeat it every epoch.
            warnings.filterwarnings("ignore", message="'pin_memory' argument is set as true")
            warnings.filterwarnings("ignore", message="pin_memory_device is deprecated")
            inner = super().__iter__()
        it = _ProcessIter(inner, self.timeout, self.recorder, bool(self.persistent_workers))
        self._current = weakref.ref(it)
        return it

    def _thread_iter(self) -> _ThreadIter:
        previous = self._current() if self._current is not None else None
        if previous is not None:
            previous._supersede()
        # torch's order: iter(index sampler), then the base-seed draw.
        sampler_iter = iter(self._index_sampler)
        pool = self._pool
        if pool is None or pool.closed:
            base_seed = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator))
            pool = self._new_pool(base_seed)
            if self._persistent_threads:
                self._pool = pool
        it = _ThreadIter(self, pool, sampler_iter)
        self._current = weakref.ref(it)
        return it

    def _new_pool(self, base_seed: int) -> _Pool:
        iterable = isinstance(self.dataset, IterableDataset)
        fetch = _Fetch(
            self.dataset,
            iterable=iterable,
            auto_collation=self._auto_collation,
            drop_last=self.drop_last,
            collator=self._pipeline.collator,
            recorder=self.recorder,
        )
        # One thread reads an IterableDataset: it is iterated once, never split.
        threads = min(self.num_workers, 1) if iterable else self.num_workers
        return _Pool(
            fetch,
            num_threads=threads,
            depth=self._in_flight(),
            in_order=self.in_order,
            timeout_s=self.timeout or None,
            recorder=self.recorder,
            worker_init_fn=self.worker_init_fn,
            base_seed=base_seed,
            num_workers=threads,
        )

    def stats(self, *, gather: bool = False) -> LoaderStats:
        """What this loader measured so far, with a verdict: is training input-bound?

        Args:
            gather: Also gather every rank's figures under torch.distributed and name the
                slowest rank. A collective call: every rank must make it.
        """
        return LoaderStats.collect(
            self.recorder,
            batch_size=self.batch_size,
            num_threads=self.num_workers,
            source=self.dataset,
            source_kind="dataset",
            device=self.device,
            gather=gather,
        )

    def close(self) -> None:
        """Stop every worker this loader runs (persistent ones included). Idempotent.

        Also happens when the loader is garbage collected and at interpreter exit.
        """
        previous = self._current() if self._current is not None else None
        if previous is not None:
            previous._supersede(closed=True)
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        torch_iter = getattr(self, "_iterator", None)
        if torch_iter is not None:  # torch's persistent multiprocessing iterator
            shutdown = getattr(torch_iter, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            self._iterator = None
