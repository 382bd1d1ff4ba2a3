"""``fastfeed.Loader``: the native prefetching pipeline over a source.

Stages, one batch at a time::

    EpochSampler ──batch of indices──▶ worker thread:                       ──▶ consumer
    (seed, epoch,                        source.hint(upcoming batch)             Batch(data, labels)
     rank, resume)                       source.read_many(indices)   "read"      .indices
                                         transform each sample       "transform"
                                         collate / batch_transform   "collate"

Each worker thread does a whole batch (read, transform every sample, collate), so a batch
costs one hand-off between threads, not one per sample. At most ``prefetch`` batches are in
flight or waiting, so memory is bounded however slow the training loop is. Output order is
the sampler's order (deterministic for any thread count) unless ``in_order=False``.

Epochs. ``set_epoch(e)`` chooses the epoch of the next iteration. Without it, every new
``iter(loader)`` moves to the next epoch (the first is epoch 0), so two plain ``for``
loops see two different shuffles, as with torch's ``DataLoader``. Starting a new iteration
stops the previous one (one active iteration per loader).

Resume. ``state_dict()`` is a tiny JSON-serializable dict (seed, epoch, position, batches
delivered past the position with ``in_order=False``, failures so far) describing the
batches handed to the consumer. ``load_state_dict(state)`` makes the next iteration yield
exactly the batches of that epoch that were not delivered. A state saved at the very end
of an epoch resumes at the start of the next epoch, as the uninterrupted loader would.
``set_epoch(e)`` after ``load_state_dict`` keeps the resume point when ``e`` is the saved
(unfinished) epoch, and starts ``e`` from scratch otherwise.

Threads and torch. Worker threads that run torch ops would also use torch's intra-op
thread pool, oversubscribing the cores. Measured with torch 2.13 (OpenMP build):
``torch.set_num_threads`` called in a worker thread changes that thread's intra-op width
*and* the process-wide default that threads pick up when they first use torch; the main
thread's own width is not changed. So each worker sets ``torch_threads`` (default 1) for
itself, and once all workers have done so the loader restores the process-wide default to
the consumer thread's setting: the training loop's threads are never changed.
"""

from __future__ import annotations

import collections
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from fastfeed._rng import set_sample_key
from fastfeed.collate import Collator
from fastfeed.errors import (
    ConfigError,
    CorruptSourceError,
    DecodeError,
    FastFeedError,
    LoaderTimeoutError,
    ResourceLimitError,
    SampleError,
    TooManyFailuresError,
)
from fastfeed.prefetch import Prefetcher
from fastfeed.profiling import Mark, Recorder
from fastfeed.report import LoaderStats
from fastfeed.sampling import EpochProgress, EpochSampler, prepare_block_order
from fastfeed.sources.base import Record, Source
from fastfeed.staging import DeviceStager

__all__ = ["Batch", "Loader", "SkippedSample"]

_INIT_WAIT_S = 5.0  # longest wait for worker threads to apply torch_threads, seconds


class Batch(tuple):
    """One batch: unpacks as ``data, labels = batch``; ``batch.indices`` lists its samples.

    Attributes:
        data: The batch's data (a tensor, whatever ``collate_fn`` / ``batch_transform``
            returned, or a list of raw record bytes when there is no transform).
        labels: int64 tensor of labels, or None when the source has no labels.
        indices: Dataset indices of the samples, in row order (skipped samples absent).
    """

    indices: list[int]

    def __new__(cls, data: Any, labels: torch.Tensor | None, indices: list[int]) -> Batch:
        obj = super().__new__(cls, (data, labels))
        obj.indices = indices
        return obj

    @property
    def data(self) -> Any:
        return self[0]

    @property
    def labels(self) -> torch.Tensor | None:
        return self[1]

    def __reduce__(self) -> tuple[Any, ...]:
        return (Batch, (self[0], self[1], self.indices))


class SkippedSample(NamedTuple):
    """A sample left out with ``on_error="skip"``.

    Attributes:
        index: Dataset index.
        where: Path or key, as the source describes it.
        stage: ``read``, ``decode``, ``transform`` or ``collate``.
        message: ``"ExceptionType: message"`` of the original error.
    """

    index: int
    where: str
    stage: str
    message: str


@dataclass(frozen=True)
class _BatchTask:
    """Work item of one batch: its number in the epoch, indices, and indices to hint."""

    number: int
    indices: list[int]
    hint_next: list[int]


@dataclass
class _BatchResult:
    """A finished batch. ``data is None`` when every sample failed (skip mode)."""

    number: int
    data: Any
    labels: torch.Tensor | None
    indices: list[int]
    failures: list[SkippedSample]


def _describe_task(task: _BatchTask) -> str:
    shown = ", ".join(map(str, task.indices[:8]))
    more = f", ... ({len(task.indices)} samples)" if len(task.indices) > 8 else ""
    return f"batch {task.number} [indices {shown}{more}]"


def _tasks(batches: Sequence[Any], todo: Sequence[int], lookahead: int) -> Iterator[_BatchTask]:
    """Tasks for batch numbers ``todo``; each carries the indices the worker should hint.

    The first task hints the next ``lookahead`` batches; every later task hints the batch
    ``lookahead`` places after it, so the source always knows the next ``prefetch``
    batches. Hints are issued by the worker (outside the prefetcher's task lock).
    """
    for pos, k in enumerate(todo):
        if lookahead <= 0:
            hint: list[int] = []
        elif pos == 0:
            hint = [i for a in todo[1 : 1 + lookahead] for i in batches[a].tolist()]
        elif pos + lookahead < len(todo):
            hint = batches[todo[pos + lookahead]].tolist()
        else:
            hint = []
        yield _BatchTask(k, batches[k].tolist(), hint)


class _BatchWorker:
    """Runs one batch on a worker thread: read, transform each sample, collate.

    Holds no reference to the :class:`Loader` or its iteration, so a prefetcher whose
    consumer went away can be garbage collected (and its threads stopped).
    """

    def __init__(
        self,
        *,
        source: Source,
        transform: Callable[..., Any] | None,
        batch_transform: Callable[[list[Any]], Any] | None,
        collator: Collator,
        spec: tuple[tuple[int, ...], torch.dtype] | None,
        recorder: Recorder,
        seed: int,
        epoch: int,
        skip: bool,
    ) -> None:
        self.source = source
        self.transform = transform
        self.batch_transform = batch_transform
        self.collator = collator
        self.spec = spec
        self.recorder = recorder
        self.seed = seed
        self.epoch = epoch
        self.skip = skip

    # -- failures -------------------------------------------------------------------------

    def _where(self, index: int) -> str:
        try:
            return self.source.describe(index)
        except Exception:  # a broken describe must not hide the real error
            return f"index {index}"

    def _fail(
        self, index: int | None, stage: str, exc: BaseException, failures: list[SkippedSample]
    ) -> None:
        """Raise SampleError (raise mode) or record the failure (skip mode)."""
        if isinstance(exc, DecodeError) and stage == "transform":
            stage = "decode"
        where = self._where(index) if index is not None else "batch"
        # Not the sample's fault, so never skipped: an open-file limit (the record is
        # fine) or a source broken as a whole (every later read fails the same way).
        unskippable = isinstance(exc, (ResourceLimitError, CorruptSourceError))
        if not self.skip or index is None or unskippable:
            raise SampleError(index, where, stage, exc) from exc
        failures.append(SkippedSample(index, where, stage, f"{type(exc).__name__}: {exc}"))

    # -- stages ---------------------------------------------------------------------------

    def _read(
        self, indices: list[int], failures: list[SkippedSample]
    ) -> tuple[list[int], list[Record]]:
        src = self.source
        try:
            return indices, src.read_many(indices)
        except Exception:
            pass  # find which index failed: retry one by one below
        ok: list[int] = []
        records: list[Record] = []
        for i in indices:
            try:
                rec = src.read(i)
            except Exception as exc:
                self._fail(i, "read", exc, failures)
            else:
                ok.append(i)
                records.append(rec)
        return ok, records

    def _run_batch_fn(
        self,
        fn: Callable[[list[Any]], Any],
        stage: str,
        indices: list[int],
        samples: list[Any],
        failures: list[SkippedSample],
        number: int,
    ) -> tuple[Any, list[int]]:
        """Call ``fn(samples)``; on failure, find the culprit sample(s) one by one."""
        try:
            return fn(samples), indices
        except Exception as batch_exc:
            first_exc = batch_exc
        bad = []
        for j, s in enumerate(samples):
            try:
                fn([s])
            except Exception as exc:
                self._fail(indices[j], stage, exc, failures)  # raises in raise mode
                bad.append(j)
        if bad:
            bad_set = set(bad)
            keep = [j for j in range(len(samples)) if j not in bad_set]
            indices = [indices[j] for j in keep]
            samples = [samples[j] for j in keep]
            if not samples:
                return None, []
            try:
                return fn(samples), indices
            except Exception as exc:
                first_exc = exc
        # Only the combination fails (e.g. mismatched shapes): no single sample to blame.
        shown = ", ".join(map(str, indices[:8])) + (", ..." if len(indices) > 8 else "")
        raise SampleError(
            None,
            f"batch {number} (indices {shown}; first at {self._where(indices[0])})",
            stage,
            first_exc,
        ) from first_exc

    def __call__(self, task: _BatchTask) -> _BatchResult:
        rec = self.recorder
        failures: list[SkippedSample] = []
        if task.hint_next:
            try:
                self.source.hint(task.hint_next)
            except Exception:  # advisory only: a real problem shows up in the read
                pass

        mark = rec.mark()
        indices, records = self._read(task.indices, failures)
        # Plain comprehensions and map(len): for tiny records these per-record steps are
        # a large share of the batch's cost.
        datas = [r.data for r in records]
        labels = [r.label for r in records]
        mark = rec.add_since("read", mark, items=len(task.indices), nbytes=sum(map(len, datas)))

        if self.spec is not None:
            data, labels_t, kept = self._fill(mark, indices, datas, labels, failures)
        else:
            data, labels_t, kept = self._generic(
                mark, task.number, indices, datas, labels, failures
            )
        return _BatchResult(task.number, data, labels_t, kept, failures)

    def _generic(
        self,
        mark: Mark,
        number: int,
        indices: list[int],
        datas: list[Any],
        all_labels: list[int | None],
        failures: list[SkippedSample],
    ) -> tuple[Any, torch.Tensor | None, list[int]]:
        """Generic path: transform each sample, then collate (or batch_transform) the list."""
        rec = self.recorder
        seed, epoch, transform = self.seed, self.epoch, self.transform
        if transform is None:
            samples, kept, labels = datas, indices, all_labels
        else:
            samples = []
            kept = []
            labels = []
            for i, d, lab in zip(indices, datas, all_labels, strict=True):
                set_sample_key((seed, epoch, i))
                try:
                    samples.append(transform(d))
                except Exception as exc:
                    self._fail(i, "transform", exc, failures)
                    continue
                kept.append(i)
                labels.append(lab)
            set_sample_key(None)
        data: Any = None
        if kept and self.batch_transform is not None:
            # One key per batch, so random batch transforms are reproducible too.
            set_sample_key((seed, epoch, -(number + 1)))
            try:
                data, kept2 = self._run_batch_fn(
                    self.batch_transform, "transform", kept, samples, failures, number
                )
            finally:
                set_sample_key(None)
            labels, kept = _select(labels, kept, kept2), kept2
        if transform is not None or self.batch_transform is not None:
            mark = rec.add_since("transform", mark, items=len(datas))
        if kept and self.batch_transform is None:
            if transform is None:
                data = samples  # raw record bytes: a list (documented)
            else:
                data, kept2 = self._run_batch_fn(
                    self.collator.collate, "collate", kept, samples, failures, number
                )
                labels, kept = _select(labels, kept, kept2), kept2
        labels_t = self.collator.labels(labels) if kept else None
        rec.add_since("collate", mark, items=len(kept))
        return (data if kept else None), labels_t, kept

    def _fill(
        self,
        mark: Mark,
        indices: list[int],
        datas: list[Any],
        all_labels: list[int | None],
        failures: list[SkippedSample],
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, list[int]]:
        """Fixed-shape path: each transform writes its sample straight into a batch row."""
        assert self.spec is not None and self.transform is not None
        rec = self.recorder
        shape, dtype = self.spec
        # Taking the (ring) buffer counts as transform time: the rows are written there.
        out = self.collator.new_batch(len(datas), shape, dtype) if datas else None
        seed, epoch, transform = self.seed, self.epoch, self.transform
        row = 0
        kept: list[int] = []
        labels: list[int | None] = []
        for i, d, lab in zip(indices, datas, all_labels, strict=True):
            assert out is not None
            dst = out[row]
            set_sample_key((seed, epoch, i))
            try:
                res = transform(d, out=dst)
                if isinstance(res, torch.Tensor) and res.data_ptr() != dst.data_ptr():
                    dst.copy_(res)  # a transform that returned a new tensor instead
            except Exception as exc:
                self._fail(i, "transform", exc, failures)
                continue  # the next sample overwrites this row
            kept.append(i)
            labels.append(lab)
            row += 1
        set_sample_key(None)
        mark = rec.add_since("transform", mark, items=len(datas))
        if not kept:
            if out is not None:
                self.collator.release(out)
            rec.add_since("collate", mark, items=0)
            return None, None, []
        assert out is not None
        if row < len(datas):
            out = out[:row]  # a view: skipped samples shrink the batch, never substituted
        labels_t = self.collator.labels(labels)
        rec.add_since("collate", mark, items=row)
        return out, labels_t, kept


def _select(values: list[Any], kept: list[int], kept2: list[int]) -> list[Any]:
    """``values`` (aligned with ``kept``) restricted to ``kept2``, a subsequence of ``kept``."""
    if len(kept2) == len(kept):
        return values
    out, j = [], 0
    for i, v in zip(kept, values, strict=True):
        if j < len(kept2) and kept2[j] == i:
            out.append(v)
            j += 1
    return out


class _TorchThreads:
    """Gives each worker thread its own torch intra-op width, restoring the global default.

    See the module docstring for what ``torch.set_num_threads`` does from a thread.
    """

    def __init__(self, per_worker: int, workers: int) -> None:
        self.per_worker = per_worker
        self.workers = workers
        self.consumer_threads = torch.get_num_threads()
        self._lock = threading.Lock()
        self._done = 0
        self._all_done = threading.Event()

    def init_worker(self) -> None:
        try:
            # Run torch's lazy per-thread initialisation first: it would otherwise later
            # reset this thread from the (restored) process-wide default.
            torch.get_num_threads()
            torch.set_num_threads(self.per_worker)
        finally:
            with self._lock:
                self._done += 1
                if self._done >= self.workers:
                    self._all_done.set()

    def restore(self) -> None:
        """Wait (bounded) for every worker's init, then restore the process-wide default."""
        self._all_done.wait(_INIT_WAIT_S)
        torch.set_num_threads(self.consumer_threads)


class _Run:
    """One iteration over (the rest of) an epoch: owns the prefetcher and the hand-off books.

    Referenced only by the generator the consumer iterates (the loader keeps a weak
    reference), so dropping that iterator stops the threads.
    """

    def __init__(self, loader: Loader, progress: EpochProgress) -> None:
        self.progress = progress
        self.epoch = progress.epoch
        self.loader_ref = weakref.ref(loader)
        sampler = loader.sampler
        self.batches = sampler.batches(self.epoch)
        todo = progress.remaining(sampler.num_batches)
        worker = _BatchWorker(
            source=loader.source,
            transform=loader.transform,
            batch_transform=loader.batch_transform,
            collator=loader.collator,
            spec=loader._spec,
            recorder=loader.recorder,
            seed=loader.seed,
            epoch=self.epoch,
            skip=loader.on_error == "skip",
        )
        threads = loader.num_threads
        torch_init = None
        if threads > 0 and loader.torch_threads is not None:
            torch_init = _TorchThreads(loader.torch_threads, threads)
        self.failures = progress.failures
        self.failure_limit = loader._failure_limit()
        self.max_failures = loader.max_failures
        self.skipped = loader.skipped
        self.collator = loader.collator
        self.prefetcher: Prefetcher[_BatchTask, _BatchResult] = Prefetcher(
            _tasks(self.batches, todo, loader.prefetch if loader.read_ahead else 0),
            worker,
            num_threads=threads,
            depth=loader.prefetch,
            in_order=loader.in_order,
            timeout_s=loader.timeout,
            describe=_describe_task,
            recorder=loader.recorder,
            thread_init=None if torch_init is None else torch_init.init_worker,
            role="loader",
            report_consumer=loader._reports_consumer(),
        )
        if torch_init is not None:
            torch_init.restore()
        # Per yielded batch: (batch numbers it settles, failures it settles). A batch whose
        # samples all failed is not yielded; it settles with the next yielded one.
        self.pending: collections.deque[tuple[list[int], int]] = collections.deque()
        self._unyielded: list[int] = []
        self._unyielded_failures = 0

    def results(self) -> Iterator[Batch]:
        """Batches in hand-off order; applies the skip policy."""
        for _task, res in self.prefetcher:
            if res.failures:
                self.skipped.extend(res.failures)
                self.failures += len(res.failures)
                if self.failure_limit is not None and self.failures > self.failure_limit:
                    last = res.failures[-1]
                    raise TooManyFailuresError(
                        f"{self.failures} samples failed in epoch {self.epoch}, more than "
                        f"max_failures={self.max_failures!r} allows ({self.failure_limit}); "
                        f"last: sample {last.index} ({last.where}) in stage '{last.stage}': "
                        f"{last.message}"
                    )
            if res.data is None:
                self._unyielded.append(res.number)
                self._unyielded_failures += len(res.failures)
                continue
            numbers = [*self._unyielded, res.number]
            self.pending.append((numbers, self._unyielded_failures + len(res.failures)))
            self._unyielded, self._unyielded_failures = [], 0
            yield Batch(res.data, res.labels, res.indices)

    def commit(self) -> None:
        """The consumer is being handed the oldest pending batch: mark it delivered."""
        numbers, failures = self.pending.popleft()
        self.progress.mark(numbers)
        self.progress.failures += failures

    def finish(self) -> None:
        """The epoch ended: settle trailing batches that had nothing to yield."""
        self.progress.mark(self._unyielded)
        self.progress.failures += self._unyielded_failures
        self._unyielded, self._unyielded_failures = [], 0

    def close(self, join_s: float | None = None) -> None:
        self.prefetcher.close(join_s)


def _default_threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus))


def _check_device(device: str | torch.device | None) -> torch.device | None:
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"invalid device {device!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={str(device)!r} but CUDA is not available in this process")
    return dev


def _int_arg(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class Loader:
    """Iterate batches ``(data, labels)`` from a fastfeed source, prefetched on threads.

    Args:
        source: Any :class:`~fastfeed.sources.base.Source` (files, LMDB, a RAM cache...).
        transform: Called per sample on the record bytes. If it has ``sample_spec() ->
            (shape, dtype)`` (a fixed shape), it is called as ``transform(data, out=row)``
            and writes straight into a preallocated batch (no ``torch.stack``); otherwise
            its outputs are collated with ``collate_fn``. None: samples are the raw record
            bytes (bytes-like, as the source returned them) and ``data`` is a list of them.
        batch_size: Samples per batch.
        shuffle: Shuffle each epoch, seeded by ``(seed, epoch)``. ``"block"``: shuffle runs
            of consecutive records and samples within windows of a few runs, so a packed
            source reads each run with one large request (slow disks; see
            :mod:`fastfeed.sampling`).
        seed: Seed of the shuffle and of per-sample random transforms
            (``fastfeed._rng.sample_rng()`` is keyed by ``(seed, epoch, index)``).
        drop_last: Drop the incomplete last batch of each epoch (per rank).
        num_threads: Worker threads; 0 runs everything inline in the consumer's thread.
            Default: the CPUs available to this process (at most 16).
        prefetch: Batches in flight or ready, at most (default ``2 * num_threads``, >= 2).
        in_order: Yield batches in sampler order (deterministic). False yields them as
            they finish (higher throughput when batch costs vary).
        on_error: ``"raise"``: a failing sample raises :class:`SampleError` in the training
            loop. ``"skip"``: failing samples are left out and reported in
            :attr:`skipped`; batches shrink by exactly the skipped samples (never
            padded with neighbours), and a batch whose samples all failed is not yielded.
            Failures that are not the sample's fault still raise in skip mode:
            :class:`~fastfeed.errors.ResourceLimitError` (too many open files) and
            :class:`~fastfeed.errors.CorruptSourceError` (the source broke as a whole).
        max_failures: With ``on_error="skip"``, the most samples that may fail per epoch:
            an int count, or a float fraction of this rank's samples per epoch. More
            raises :class:`TooManyFailuresError`. None: no limit.
        timeout: Longest wait for the next batch, seconds, before
            :class:`LoaderTimeoutError` names the indices in flight (needs
            ``num_threads > 0``). None or 0 waits indefinitely.
        rank: This process's rank; default from ``torch.distributed`` when initialized.
        world_size: Number of ranks; default from ``torch.distributed`` when initialized.
        even_batches: ``"pad"`` repeats the first samples of the order so every rank has
            the same number of samples (like ``DistributedSampler``); ``"drop"`` drops
            the tail instead.
        collate_fn: Generic collate for samples without a fixed shape (torch's
            ``default_collate`` by default).
        device: Where batches are delivered (e.g. ``"cuda"``): a
            :class:`~fastfeed.staging.DeviceStager` thread copies each batch on its own
            CUDA stream ahead of the training loop. None keeps batches on the CPU where
            the workers built them.
        pin_memory: Collate into reusable page-locked host buffers (a pinned ring) for
            fast asynchronous copies. Default: True when ``device`` is a CUDA device.
        to_float: Convert 4-D integer image batches to float32 on ``device`` after the
            copy (4x fewer bytes cross PCIe than converting on the host).
        mean: Per-channel mean subtracted on ``device``, in the data's units (e.g.
            ``(123.7, 116.3, 103.5)`` for uint8 images); implies float32.
        std: Per-channel standard deviation divided by on ``device``, same units.
        channels_last: Deliver 4-D batches in ``torch.channels_last`` memory format.
        profile: Record per-stage timings in :attr:`recorder`. False disables it.
        batch_transform: ``batch_transform(list_of_samples) -> data`` replaces collate:
            vectorised decoding of tiny records, e.g. ``np.frombuffer(b"".join(...))``.
            Its random draws use the key ``(seed, epoch, -(batch_number + 1))``.
        torch_threads: torch intra-op threads of each worker thread (default 1, so
            ``num_threads`` workers never oversubscribe the cores); None leaves torch
            alone. The training loop's own setting is kept (module docstring).
        read_ahead: Tell the source the indices of the next ``prefetch`` batches
            (``source.hint``) so it can start reading them. Hints pay off when reads wait
            on storage; for data already in RAM or the page cache they are pure overhead
            (e.g. about 8 us per record for an LMDB, more than the read), so turn them off
            there.

    Attributes:
        recorder: The :class:`~fastfeed.profiling.Recorder` every stage reports to.
        skipped: :class:`SkippedSample` entries of the current iteration (skip mode).
        sampler: The :class:`~fastfeed.sampling.EpochSampler` that orders each epoch.
        rank: This process's rank.
        world_size: Number of ranks.
    """

    def __init__(
        self,
        source: Source,
        transform: Callable[..., Any] | None = None,
        batch_size: int = 1,
        shuffle: bool | str = False,
        seed: int = 0,
        drop_last: bool = False,
        num_threads: int | None = None,
        prefetch: int | None = None,
        in_order: bool = True,
        on_error: str = "raise",
        max_failures: int | float | None = None,
        timeout: float | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        even_batches: str = "pad",
        collate_fn: Callable[[list[Any]], Any] | None = None,
        device: str | torch.device | None = None,
        pin_memory: bool | None = None,
        profile: bool = True,
        batch_transform: Callable[[list[Any]], Any] | None = None,
        torch_threads: int | None = 1,
        read_ahead: bool = True,
        to_float: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        channels_last: bool = False,
    ) -> None:
        if not isinstance(source, Source):
            raise ConfigError(f"source must be a fastfeed Source, got {type(source).__name__}")
        if transform is not None and not callable(transform):
            raise ConfigError(f"transform must be callable, got {type(transform).__name__}")
        if batch_transform is not None and not callable(batch_transform):
            raise ConfigError(
                f"batch_transform must be callable, got {type(batch_transform).__name__}"
            )
        self.num_threads = (
            _default_threads() if num_threads is None else _int_arg("num_threads", num_threads, 0)
        )
        default_prefetch = max(2, 2 * self.num_threads)
        self.prefetch = default_prefetch if prefetch is None else _int_arg("prefetch", prefetch, 1)
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if max_failures is not None:
            if on_error != "skip":
                raise ConfigError("max_failures only applies with on_error='skip'")
            if isinstance(max_failures, bool) or not isinstance(max_failures, (int, float)):
                raise ConfigError(f"max_failures must be an int or a float, got {max_failures!r}")
            if isinstance(max_failures, float) and not 0.0 <= max_failures <= 1.0:
                raise ConfigError(
                    f"max_failures as a fraction must be in [0, 1], got {max_failures}"
                )
            if isinstance(max_failures, int) and max_failures < 0:
                raise ConfigError(f"max_failures must be >= 0, got {max_failures}")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout < 0):
            raise ConfigError(f"timeout must be a number of seconds >= 0, got {timeout!r}")
        if torch_threads is not None:
            _int_arg("torch_threads", torch_threads, 1)
        self._spec = _sample_spec(transform)
        if batch_transform is not None and self._spec is not None:
            raise ConfigError(
                "batch_transform cannot be combined with a fixed-shape transform "
                "(one with sample_spec()): that transform already writes the batch"
            )
        if batch_transform is not None and collate_fn is not None:
            raise ConfigError("give batch_transform or collate_fn, not both")

        self.source = source
        self.transform = transform
        self.batch_transform = batch_transform
        self.collate_fn = collate_fn
        self.batch_size = _int_arg("batch_size", batch_size, 1)
        self.shuffle = shuffle if isinstance(shuffle, str) else bool(shuffle)  # sampler checks
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.in_order = bool(in_order)
        self.on_error = on_error
        self.max_failures = max_failures
        self.timeout = float(timeout) if timeout else None
        self.torch_threads = torch_threads
        self.read_ahead = bool(read_ahead)
        self.device = _check_device(device)
        if self.device is None and (
            to_float or mean is not None or std is not None or channels_last
        ):
            raise ConfigError(
                "to_float, mean, std and channels_last finish batches on a device: give "
                "device= (e.g. 'cuda', or 'cpu' to finish on the host)"
            )
        self._finish = {
            "to_float": to_float,
            "mean": mean,
            "std": std,
            "channels_last": channels_last,
        }
        if pin_memory is None:
            pin_memory = self.device is not None and self.device.type == "cuda"
        self.pin_memory = bool(pin_memory)
        self.sampler = EpochSampler(
            len(source),
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            seed=seed,
            drop_last=self.drop_last,
            rank=rank,
            world_size=world_size,
            even_batches=even_batches,
            block_records=prepare_block_order(source) if self.shuffle == "block" else None,
        )
        self.rank = self.sampler.rank
        self.world_size = self.sampler.world_size
        self.even_batches = even_batches
        self.recorder = Recorder(enabled=bool(profile))
        self.collator = self._make_collator()
        self.skipped: list[SkippedSample] = []
        # The epoch of the last started (or loaded / chosen) iteration and what of it was
        # delivered; _resume: the next iteration continues it instead of moving on.
        self._progress = EpochProgress(epoch=0)
        self._resume = True
        self._active: weakref.ref[_Run] | None = None
        self._closed = False

    # -- wiring points (staging) ------------------------------------------------------------

    def _make_collator(self) -> Collator:
        """The collator the workers build batches with (the one place to build it)."""
        # Ring slots: every batch in flight, plus one with the consumer and one being copied.
        return Collator(self.collate_fn, pin_memory=self.pin_memory, slots=self.prefetch + 2)

    def _reports_consumer(self) -> bool:
        """Whether the prefetcher reports the training loop's waits (no stager after it)."""
        return self.device is None

    def _stage(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        """Route batches to :attr:`device` through the device stager (identity without one).

        The stager copies on its own CUDA stream, makes the consumer's stream wait on the
        copy's event, and releases each host slot to the collator once its copy is done.
        """
        if self.device is None:
            return batches
        return DeviceStager(
            batches,
            self.device,
            collator=self.collator,
            recorder=self.recorder,
            timeout_s=self.timeout,
            **self._finish,
        )

    # -- epochs and state -------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The epoch of the current (or last started, or chosen next) iteration."""
        return self._progress.epoch

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch of the next iteration (reshuffles with ``(seed, epoch)``).

        Keeps a loaded resume point when ``epoch`` is the loaded, unfinished epoch.
        """
        epoch = _int_arg("epoch", epoch, -(2**63))
        if not (self._resume and self._progress.epoch == epoch):
            self._progress = EpochProgress(epoch=epoch)
            self._resume = True

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self.sampler.num_batches

    def stats(self, *, gather: bool = False) -> LoaderStats:
        """What this loader measured so far, with a verdict: is training input-bound?

        Args:
            gather: Also gather every rank's figures under torch.distributed and name the
                slowest rank. A collective call: every rank must make it.

        Returns:
            A :class:`~fastfeed.report.LoaderStats` (``.stall_fraction``, ``.verdict``,
            ``.summary()``, ``.to_dict()``, ``.save_trace(path)``).
        """
        return LoaderStats.collect(
            self.recorder,
            source=self.source,
            num_threads=self.num_threads,
            skipped=self.skipped,
            device=self.device,
            gather=gather,
        )

    def state_dict(self) -> dict[str, Any]:
        """A small JSON-serializable resume state; counts batches handed to the consumer."""
        return self._progress.to_state(self.seed, self.sampler.describe())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next iteration yields exactly the rest.

        Raises:
            ConfigError: The state is malformed or from a differently configured loader.
        """
        seed, progress = EpochProgress.from_state(
            state, self.sampler.describe(), self.sampler.num_batches
        )
        self._close_active()
        self.seed = seed
        self.sampler.seed = seed
        self._progress = progress
        # A finished epoch resumes at the start of the next one, like the uninterrupted loader.
        self._resume = not progress.complete(self.sampler.num_batches)

    def _failure_limit(self) -> int | None:
        if self.max_failures is None:
            return None
        if isinstance(self.max_failures, float):
            return int(self.max_failures * self.sampler.samples_per_epoch)
        return self.max_failures

    # -- iteration --------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        if self._closed:
            raise FastFeedError("this Loader is closed; create a new one")
        self._close_active()
        if not self._resume:
            self._progress = EpochProgress(epoch=self._progress.epoch + 1)
        self._resume = False
        self.skipped = []
        run = _Run(self, self._progress)
        self._active = weakref.ref(run)
        return self._deliver(run)

    def _deliver(self, run: _Run) -> Iterator[Batch]:
        # The consumer-facing generator: the only strong owner of `run`, so dropping or
        # closing it stops the workers (finally below, or the prefetcher's finalizer).
        results = run.results()
        staged = self._stage(results)
        release = self.collator.release if staged is results else None
        try:
            for batch in staged:
                run.commit()
                yield batch
                if release is not None:
                    release(batch)  # the consumer came back: it moved past this batch
            run.finish()
        except LoaderTimeoutError:
            run.close(join_s=0.0)  # a worker is stuck: do not wait for it (daemon thread)
            raise
        finally:
            if staged is not results:
                close = getattr(staged, "close", None)
                if close is not None:
                    close()
            results.close()
            run.close()

    def _close_active(self) -> None:
        run = self._active() if self._active is not None else None
        self._active = None
        if run is not None:
            run.close()

    def close(self) -> None:
        """Stop the active iteration and join its threads (within 2 s). Idempotent.

        The source is not closed: the caller owns it (and may share it).
        """
        self._closed = True
        self._close_active()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Loader({type(self.source).__name__} of {len(self.source)}, "
            f"batch_size={self.batch_size}, num_threads={self.num_threads}, "
            f"prefetch={self.prefetch}, rank={self.rank}/{self.world_size}, "
            f"epoch={self.epoch})"
        )


def _sample_spec(transform: Any) -> tuple[tuple[int, ...], torch.dtype] | None:
    spec_fn = getattr(transform, "sample_spec", None)
    if spec_fn is None or not callable(spec_fn):
        return None
    try:
        shape, dtype = spec_fn()
        shape = tuple(int(s) for s in shape)
    except Exception as exc:
        raise ConfigError(f"transform.sample_spec() must return (shape, dtype): {exc}") from exc
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"transform.sample_spec() dtype must be a torch.dtype, got {dtype!r}")
    return shape, dtype
