"""What one worker thread does for one task of the drop-in DataLoader: fetch, collate.

A task is one batch of indices (map-style) or one batch's worth of samples from one
worker's stream (an :class:`~torch.utils.data.IterableDataset`). Map-style batches are
fetched with ``__getitems__`` when the dataset has it, else ``dataset[i]`` per index, as
torch's fetcher does. Iterable datasets get one stream per worker, as torch gives each
worker process its own ``iter(dataset)``: each stream's ``iter()`` and ``next()`` run with
that worker's :class:`WorkerInfo` visible to ``torch.utils.data.get_worker_info()``, so a
dataset that shards itself by worker id is sharded across threads exactly as across
processes (and one that does not is repeated per worker, as with torch). A stream's tasks
run strictly in order, whichever thread takes them.

Failures keep the user's exception object (see :mod:`fastfeed._torch_compat.errors`) and
travel to the consumer as a :class:`Failed` value.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from fastfeed._torch_compat.errors import add_context, sample_note
from fastfeed._torch_compat.torch_private import THREAD_INFO, WorkerInfo, default_collate
from fastfeed.errors import describe_indices
from fastfeed.pipeline.collate import Collator
from fastfeed.profiling import Recorder, Stage
from fastfeed.profiling.clocks import _torch_profiler_active
from fastfeed.profiling.spans import STAGE_CODE, chain_seconds

__all__ = ["END", "STALE", "Failed", "Fetch", "Task", "describe"]

_POLL_S = 0.05  # how often a stream task waiting for its turn looks at the stop flag, s
_READ, _COLLATE = STAGE_CODE[Stage.READ], STAGE_CODE[Stage.COLLATE]


class Task:
    """One batch of indices (or one index without auto-batching) of one epoch.

    Attributes:
        gen: The epoch generation the task belongs to; results of an older generation
            (a persistent pool reset mid-epoch) are dropped by the consumer.
        index: What the index sampler yielded (a list of indices, or one index).
        worker: The stream (worker id) of an IterableDataset task, else None.
        seq: The task's position in its stream.
    """

    __slots__ = ("gen", "index", "seq", "worker")

    def __init__(self, gen: int, index: Any, worker: int | None = None, seq: int = 0) -> None:
        self.gen = gen
        self.index = index
        self.worker = worker
        self.seq = seq

    @property
    def indices(self) -> list[int]:
        """Dataset indices of the task (empty for an IterableDataset)."""
        if self.worker is not None:
            return []
        idx = self.index if isinstance(self.index, (list, tuple)) else [self.index]
        return [i for i in idx if isinstance(i, int)]


def describe(task: Task) -> str:
    """A task as timeouts name it."""
    if task.worker is None:
        if isinstance(task.index, (list, tuple)):
            return f"batch {describe_indices(task.index)}"
        return f"sample {task.index!r}"
    n = len(task.index) if isinstance(task.index, (list, tuple)) else 1
    return f"a batch of {n} sample(s) from worker {task.worker}'s IterableDataset iterator"


class Failed:
    """An exception raised by a task, carried to the consumer as a value."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _WorkerEnded:
    """A stream (worker) is exhausted; the consumer marks that worker inactive."""

    __slots__ = ("worker",)

    def __init__(self, worker: int) -> None:
        self.worker = worker


END = _WorkerEnded  # the type of "this worker's stream ended"
STALE = object()  # a task of an older generation (nothing was read)


class _Stream:
    """One worker's iterator over an IterableDataset, for one epoch."""

    def __init__(self, info: WorkerInfo | None, it: Iterator[Any] | None) -> None:
        self.info = info
        self.it = it  # None until the worker's first task calls iter(dataset)
        self.ended = False
        self.count = 0  # samples taken so far (names a failing sample)
        self.next_seq = 0
        self.cond = threading.Condition()


def _who() -> str:
    info = getattr(THREAD_INFO, "info", None)
    return "the calling thread" if info is None else f"DataLoader thread worker {info.id}"


class Fetch:
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
        # torch's default_collate stacks into shared memory whenever get_worker_info() is
        # not None; threads need no shared memory, so the info is hidden while it runs.
        self.hide_info = collator.collate_fn is default_collate
        self._lock = threading.Lock()
        self._gen = -1
        self._streams: dict[int, _Stream] = {}
        self.stopped = False

    def start_streams(
        self, gen: int, infos: list[WorkerInfo | None], main_iter: Iterator[Any] | None = None
    ) -> None:
        """Begin generation ``gen`` of an IterableDataset: one stream per worker.

        Args:
            gen: The epoch generation.
            infos: Each stream's worker info (None: no worker, the calling thread).
            main_iter: The iterator made in the caller's thread (``num_workers=0``).
        """
        with self._lock:
            self._gen = gen
            self._streams = {w: _Stream(info, main_iter) for w, info in enumerate(infos)}

    def __call__(self, task: Task) -> Any:
        try:
            if self.iterable:
                return self._iterable(task)
            return self._map(task)
        except StopIteration:
            raise  # torch semantics: StopIteration from the dataset ends the epoch
        except Exception as exc:
            return Failed(exc)

    # -- map-style --------------------------------------------------------------------

    def _map(self, task: Task) -> Any:
        index = task.index
        rec = self.recorder
        if not self.auto_collation:
            with rec.span(Stage.READ, items=1):
                try:
                    data = self.dataset[index]
                except Exception as exc:
                    where = f"{self.name}[{index!r}]"
                    add_context(exc, sample_note(index, where, Stage.READ, _who()))
                    raise
            return self._collate(data, index, 1)
        n = len(index)
        if _torch_profiler_active():  # spans: fastfeed/read and /collate in its trace
            with rec.span(Stage.READ, items=n):
                data = self._read_batch(index)
            return self._collate(data, index, n)
        # One call into the recorder per batch, C functions after it (Recorder.chain):
        # two spans cost ~3.5 us a batch, a share of a tiny-record batch worth keeping.
        clock, record = rec.chain()
        start = clock()
        try:
            data = self._read_batch(index)
        except BaseException:
            end = chain_seconds(clock())
            rec.add(Stage.READ, chain_seconds(start), end, None, items=n, failed=True)
            raise
        read_end = clock()
        try:
            out = self._collate_now(data, index)
        except BaseException:
            record([1, start, _READ, read_end, n, 0])
            end = chain_seconds(clock())
            rec.add(Stage.COLLATE, chain_seconds(read_end), end, None, items=n, failed=True)
            raise
        record([2, start, _READ, read_end, n, 0, _COLLATE, clock(), n, 0])
        return out

    def _read_batch(self, index: Any) -> Any:
        """The samples of a batch of indices: ``__getitems__``, else ``dataset[i]`` each."""
        if self.getitems is not None:
            try:
                return self.getitems(index)
            except Exception as exc:
                where = f"{self.name}.__getitems__({describe_indices(index)})"
                add_context(exc, sample_note(None, where, Stage.READ, _who()))
                raise
        # One loop without a helper call per index: on tiny records the per-sample cost
        # is what separates a loader from torch's num_workers=0.
        data: list[Any] = []
        append = data.append
        dataset = self.dataset
        try:
            for i in index:
                append(dataset[i])
        except Exception as exc:
            i = index[len(data)]
            add_context(exc, sample_note(i, f"{self.name}[{i!r}]", Stage.READ, _who()))
            raise
        return data

    def _collate(self, data: Any, index: Any, n: int) -> Any:
        with self.recorder.span(Stage.COLLATE, items=n):
            return self._collate_now(data, index)

    def _collate_now(self, data: Any, index: Any) -> Any:
        hidden = None
        if self.hide_info:
            hidden = getattr(THREAD_INFO, "info", None)
            THREAD_INFO.info = None
        try:
            return self.collator.collate(data)
        except Exception as exc:
            where = index if isinstance(index, str) else f"batch {describe_indices(index)}"
            if not isinstance(index, (list, tuple, str)):
                where = f"sample {index!r}"
            add_context(exc, sample_note(None, where, Stage.COLLATE, _who()))
            raise
        finally:
            if hidden is not None:
                THREAD_INFO.info = hidden

    # -- iterable-style ---------------------------------------------------------------

    def _iterable(self, task: Task) -> Any:
        with self._lock:
            stream = self._streams.get(task.worker) if task.gen == self._gen else None  # type: ignore[arg-type]
        if stream is None:
            return STALE
        with stream.cond:  # a stream's tasks run in order, whichever thread takes them
            while stream.next_seq != task.seq:
                if self.stopped or task.gen != self._gen:
                    return STALE
                stream.cond.wait(_POLL_S)
        own = getattr(THREAD_INFO, "info", None)
        if stream.info is not None:
            THREAD_INFO.info = stream.info
        try:
            return self._stream_batch(stream, task)
        finally:
            THREAD_INFO.info = own
            with stream.cond:
                stream.next_seq += 1
                stream.cond.notify_all()

    def _stream_batch(self, stream: _Stream, task: Task) -> Any:
        worker = task.worker if task.worker is not None else 0
        if stream.ended:
            return _WorkerEnded(worker)
        if stream.it is None:
            try:
                stream.it = iter(self.dataset)
            except Exception as exc:
                stream.ended = True
                where = f"iter({self.name}) in worker {worker}"
                add_context(exc, sample_note(None, where, Stage.READ, _who()))
                raise
        rec = self.recorder
        if not self.auto_collation:
            with rec.span(Stage.READ, items=1):
                got = self._next_sample(stream, worker)
            if got is None:
                return _WorkerEnded(worker)
            return self._collate(got[0], stream.count - 1, 1)
        n = len(task.index)
        samples: list[Any] = []
        with rec.span(Stage.READ, items=n):
            for _ in range(n):
                got = self._next_sample(stream, worker)
                if got is None:
                    break
                samples.append(got[0])
        if not samples or (self.drop_last and len(samples) < n):
            stream.ended = True
            return _WorkerEnded(worker)
        first = stream.count - len(samples)
        return self._collate(samples, f"samples {first}..{stream.count - 1}", len(samples))

    def _next_sample(self, stream: _Stream, worker: int) -> tuple[Any] | None:
        try:
            sample = next(stream.it)  # type: ignore[arg-type]
        except StopIteration:
            stream.ended = True
            return None
        except Exception as exc:
            where = f"{self.name} iterator of worker {worker}, sample {stream.count}"
            add_context(exc, sample_note(stream.count, where, Stage.READ, _who()))
            raise
        stream.count += 1
        return (sample,)
