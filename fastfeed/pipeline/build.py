"""Building one batch on a worker: read → transform each sample → collate.

:class:`BatchBuilder` is the work function every execution mode runs (in-process worker
threads, or the threads of a worker process): it holds no reference to a loader, only the
recipe (source, transforms, collator, seed, error policy), so it pickles to a worker
process and a prefetcher whose consumer went away can be garbage collected.

Random transforms draw from :func:`fastfeed.rng.sample_rng`, keyed ``(seed, epoch,
index)`` here, so a batch is the same whichever thread or process builds it.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Callable
from itertools import chain
from typing import Any

import torch

from fastfeed.errors import (
    ConfigError,
    CorruptSourceError,
    DecodeError,
    ResourceLimitError,
    SampleError,
    SourceNotFoundError,
    describe_indices,
)
from fastfeed.pipeline.batch import BatchResult, BatchTask, SkippedSample
from fastfeed.pipeline.collate import Collator
from fastfeed.profiling import Recorder, Stage
from fastfeed.profiling.recorder import ChainSpan, ChainTime
from fastfeed.profiling.spans import STAGE_CODE
from fastfeed.rng import set_sample_key
from fastfeed.sources.base import Record, Source

__all__ = ["BatchBuilder", "SampleSpec", "TorchThreads", "sample_spec"]

# The stages' codes in the recorder's chain records (numbers only, see Recorder.chain).
_READ, _TRANSFORM, _COLLATE = (STAGE_CODE[s] for s in (Stage.READ, Stage.TRANSFORM, Stage.COLLATE))

# Failures that are never skipped as one bad sample (see BatchBuilder._fail).
_UNSKIPPABLE = (ResourceLimitError, CorruptSourceError, SourceNotFoundError, ConfigError)

_INIT_WAIT_S = 5.0  # longest wait for worker threads to apply torch_threads, seconds

#: Shape and dtype of one sample, from a fixed-shape transform's ``sample_spec()``.
SampleSpec = tuple[tuple[int, ...], torch.dtype]


class BatchBuilder:
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
        spec: SampleSpec | None,
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
        if isinstance(exc, DecodeError) and stage == Stage.TRANSFORM:
            stage = Stage.DECODE
        where = self._where(index) if index is not None else "batch"
        # Not the sample's fault, so never skipped: an open-file limit (the record is
        # fine), a source broken or gone as a whole (every later read fails the same
        # way), or a transform configured wrong (every sample fails the same way).
        unskippable = isinstance(exc, _UNSKIPPABLE)
        if not self.skip or index is None or unskippable:
            raise SampleError(index, where, stage, exc) from exc
        failures.append(SkippedSample(index, where, stage, f"{type(exc).__name__}: {exc}"))

    def _labels(self, labels: list[Any], kept: list[int]) -> torch.Tensor | None:
        """The batch's labels as a tensor; a label that is not an int names its sample."""
        try:
            return self.collator.labels(labels)
        except (TypeError, ValueError, OverflowError) as exc:
            for index, label in zip(kept, labels, strict=True):
                try:
                    operator.index(label)  # ints, numpy integers; not None, str, float
                except TypeError:
                    problem = TypeError(
                        f"its label is {label!r}: labels must be ints for every record "
                        "(or None for every record)"
                    )
                    raise SampleError(index, self._where(index), Stage.READ, problem) from exc
            raise

    def _read(
        self, indices: list[int], failures: list[SkippedSample]
    ) -> tuple[list[int], list[Record]]:
        src = self.source
        try:
            records = src.read_many(indices)
        except Exception:
            pass  # find which index failed: retry one by one below
        else:
            if len(records) != len(indices):  # a bug of the source, not a bad sample
                raise CorruptSourceError(
                    f"{type(src).__name__}.read_many() returned {len(records)} records for "
                    f"{len(indices)} indices ({describe_indices(indices)})"
                )
            return indices, records
        ok: list[int] = []
        read: list[Record] = []
        for i in indices:
            try:
                rec = src.read(i)
            except Exception as exc:
                self._fail(i, Stage.READ, exc, failures)
            else:
                ok.append(i)
                read.append(rec)
        return ok, read

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
        raise SampleError(
            None,
            f"batch {number} (indices {describe_indices(indices)}; "
            f"first at {self._where(indices[0])})",
            stage,
            first_exc,
        ) from first_exc

    def __call__(self, task: BatchTask) -> BatchResult:
        if task.epoch != self.epoch:
            # A persistent worker (process mode) serving the next epoch: same recipe.
            self.epoch = task.epoch
        rec = self.recorder
        failures: list[SkippedSample] = []
        # One call into the recorder per batch, C functions after it: on tiny records
        # the hooks cost per call (profiling/recorder.py, Recorder.chain).
        clock, record = rec.chain()
        start = clock()
        spans: list[ChainSpan] = []
        try:
            indices, records = self._read(task.indices, failures)
            if task.hint_next:
                # After this batch's own reads: on a disk that counts operations, hinted
                # reads queued first delayed the first batch (1.2 s instead of 0.4 s at
                # 400 IO/s, `fastfeed bench --cold`).
                try:
                    self.source.hint(task.hint_next)
                except Exception:  # advisory only: a real problem shows up in the read
                    pass
            # Plain comprehensions and map(len): for tiny records these per-record steps
            # are a large share of the batch's cost.
            datas = [r.data for r in records]
            labels = [r.label for r in records]
            spans.append((_READ, clock(), len(task.indices), sum(map(len, datas))))
            if self.spec is not None:
                data, labels_t, kept = self._fill(clock, spans, indices, datas, labels, failures)
            else:
                data, labels_t, kept = self._generic(
                    clock, spans, task.number, indices, datas, labels, failures
                )
        finally:
            if spans:
                record([len(spans), start, *chain.from_iterable(spans)])
        return BatchResult(task.number, data, labels_t, kept, failures)

    def _generic(
        self,
        clock: Callable[[], ChainTime],
        spans: list[ChainSpan],
        number: int,
        indices: list[int],
        datas: list[Any],
        all_labels: list[int | None],
        failures: list[SkippedSample],
    ) -> tuple[Any, torch.Tensor | None, list[int]]:
        """Generic path: transform each sample, then collate (or batch_transform) the list."""
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
                    self._fail(i, Stage.TRANSFORM, exc, failures)
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
                    self.batch_transform, Stage.TRANSFORM, kept, samples, failures, number
                )
            finally:
                set_sample_key(None)
            labels, kept = _select(labels, kept, kept2), kept2
        if transform is not None or self.batch_transform is not None:
            spans.append((_TRANSFORM, clock(), len(datas), 0))
        if kept and self.batch_transform is None:
            if transform is None:
                data = samples  # raw record bytes: a list (documented)
            else:
                data, kept2 = self._run_batch_fn(
                    self.collator.collate, Stage.COLLATE, kept, samples, failures, number
                )
                labels, kept = _select(labels, kept, kept2), kept2
        labels_t = self._labels(labels, kept) if kept else None
        spans.append((_COLLATE, clock(), len(kept), 0))
        return (data if kept else None), labels_t, kept

    def _fill(
        self,
        clock: Callable[[], ChainTime],
        spans: list[ChainSpan],
        indices: list[int],
        datas: list[Any],
        all_labels: list[int | None],
        failures: list[SkippedSample],
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, list[int]]:
        """Fixed-shape path: each transform writes its sample straight into a batch row."""
        assert self.spec is not None and self.transform is not None
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
                self._fail(i, Stage.TRANSFORM, exc, failures)
                continue  # the next sample overwrites this row
            kept.append(i)
            labels.append(lab)
            row += 1
        set_sample_key(None)
        spans.append((_TRANSFORM, clock(), len(datas), 0))
        if not kept:
            if out is not None:
                self.collator.release(out)
            spans.append((_COLLATE, clock(), 0, 0))
            return None, None, []
        assert out is not None
        if row < len(datas):
            out = out[:row]  # a view: skipped samples shrink the batch, never substituted
        labels_t = self._labels(labels, kept)
        spans.append((_COLLATE, clock(), row, 0))
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


class TorchThreads:
    """Gives each worker thread its own torch intra-op width, restoring the global default.

    Measured with torch 2.13 (OpenMP build): ``torch.set_num_threads`` called in a worker
    thread changes that thread's intra-op width *and* the process-wide default that threads
    pick up when they first use torch; the main thread's own width is not changed. So each
    worker sets ``per_worker`` for itself, and once all workers have done so the
    process-wide default is restored to the consumer thread's setting: the training loop's
    threads are never changed.
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


def sample_spec(transform: Any) -> SampleSpec | None:
    """The fixed ``(shape, dtype)`` a transform writes rows of, or None (generic path).

    Raises:
        ConfigError: ``transform.sample_spec()`` exists but does not return (shape, dtype).
    """
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
