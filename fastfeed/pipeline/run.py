"""One iteration over (the rest of) an epoch: the workers and the hand-off books.

:class:`EpochRun` is built from a :class:`WorkSpec` (the recipe every worker runs) and the
assembled :class:`~fastfeed.pipeline.assemble.Pipeline`, never from the loader façade, so
a parameter can be followed from the constructor down to the stage that uses it.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fastfeed.errors import FastFeedError, TooManyFailuresError
from fastfeed.pipeline.assemble import Pipeline
from fastfeed.pipeline.batch import (
    Batch,
    BatchResult,
    BatchTask,
    SkippedSample,
    describe_task,
    plan_tasks,
)
from fastfeed.pipeline.build import BatchBuilder, SampleSpec, TorchThreads
from fastfeed.pipeline.prefetch import Prefetcher
from fastfeed.pipeline.sampling import EpochProgress
from fastfeed.sources.base import Source

__all__ = ["Engine", "EpochIterator", "EpochRun", "WorkSpec"]


@dataclass(frozen=True)
class WorkSpec:
    """The work of a Loader's workers, as its constructor validated it.

    Attributes:
        source: Where records come from.
        transform: Per-sample transform, or None.
        batch_transform: Replaces collate, or None.
        sample_spec: Fixed ``(shape, dtype)`` rows the transform writes, or None.
        seed: Seed of the per-sample RNG (and of the shuffle).
        skip: ``on_error="skip"``.
        max_failures: As given (int, fraction, or None).
        failure_limit: Failures allowed per epoch, or None.
        num_threads: Worker threads (per process in process mode).
        prefetch: Batches in flight or ready, at most.
        in_order: Deliver in sampler order.
        timeout_s: Longest wait for one batch, or None.
        torch_threads: torch intra-op threads per worker thread, or None.
        read_ahead: Hint upcoming indices to the source.
    """

    source: Source
    transform: Callable[..., Any] | None
    batch_transform: Callable[[list[Any]], Any] | None
    sample_spec: SampleSpec | None
    seed: int
    skip: bool
    max_failures: int | float | None
    failure_limit: int | None
    num_threads: int
    prefetch: int
    in_order: bool
    timeout_s: float | None
    torch_threads: int | None
    read_ahead: bool

    def builder(self, collator: Any, recorder: Any, epoch: int) -> BatchBuilder:
        """The work function of one worker (thread pool or process)."""
        return BatchBuilder(
            source=self.source,
            transform=self.transform,
            batch_transform=self.batch_transform,
            collator=collator,
            spec=self.sample_spec,
            recorder=recorder,
            seed=self.seed,
            epoch=epoch,
            skip=self.skip,
        )


class Engine(Protocol):
    """Runs batch tasks somewhere and yields ``(task, result)`` (worker-process pools)."""

    def run(self, tasks: Iterator[BatchTask]) -> Iterator[tuple[BatchTask, BatchResult]]: ...


class EpochRun:
    """One iteration over (the rest of) an epoch: owns its workers and the hand-off books.

    Referenced only by the generator the consumer iterates (the loader keeps a weak
    reference), so dropping that iterator stops the workers.

    Args:
        work: The recipe.
        pipeline: The assembled wiring (collator, recorder).
        batches: The epoch's batches of indices, in sampler order.
        progress: What of this epoch was delivered already (updated on hand-over).
        skipped: Where skipped samples are listed.
        engine: A persistent worker-process pool; None runs in-process threads.
    """

    def __init__(
        self,
        work: WorkSpec,
        pipeline: Pipeline,
        batches: Sequence[np.ndarray],
        progress: EpochProgress,
        skipped: list[SkippedSample],
        engine: Engine | None = None,
    ) -> None:
        self.progress = progress
        self.epoch = progress.epoch
        self.work = work
        self.skipped = skipped
        self.failures = progress.failures
        todo = progress.remaining(len(batches))
        lookahead = work.prefetch if work.read_ahead else 0
        tasks = plan_tasks(batches, todo, lookahead, self.epoch)
        recorder = pipeline.spec.recorder
        self._close: Callable[[float | None], None]
        self.source: Iterator[tuple[BatchTask, BatchResult]]
        if engine is not None:
            it = engine.run(tasks)
            self.source = it
            self._close = lambda join_s: it.close(join_s)  # type: ignore[attr-defined]
        else:
            threads = work.num_threads
            torch_init = None
            if threads > 0 and work.torch_threads is not None:
                torch_init = TorchThreads(work.torch_threads, threads)
            prefetcher: Prefetcher[BatchTask, BatchResult] = Prefetcher(
                tasks,
                work.builder(pipeline.collator, recorder, self.epoch),
                num_threads=threads,
                depth=work.prefetch,
                in_order=work.in_order,
                timeout_s=work.timeout_s,
                describe=describe_task,
                recorder=recorder,
                thread_init=None if torch_init is None else torch_init.init_worker,
                role="loader",
            )
            if torch_init is not None:
                torch_init.restore()
            self.source = prefetcher
            self._close = prefetcher.close
        # Per yielded batch: (batch numbers it settles, failures it settles). A batch whose
        # samples all failed is not yielded; it settles with the next yielded one.
        self.pending: collections.deque[tuple[list[int], int]] = collections.deque()
        self._unyielded: list[int] = []
        self._unyielded_failures = 0
        #: Why the run was stopped from outside (a new iteration, ``close()``), or None.
        self.stopped: str | None = None

    def results(self) -> Generator[Batch, None, None]:
        """Batches in hand-off order; applies the skip policy."""
        limit = self.work.failure_limit
        yielded = 0
        for _task, res in self.source:
            if res.failures:
                self.skipped.extend(res.failures)
                self.failures += len(res.failures)
                if limit is not None and self.failures > limit:
                    last = res.failures[-1]
                    raise TooManyFailuresError(
                        f"{self.failures} samples failed in epoch {self.epoch}, more than "
                        f"max_failures={self.work.max_failures!r} allows ({limit}); "
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
            yielded += 1
            yield Batch(res.data, res.labels, res.indices)
        if yielded == 0 and self.stopped is None and self.work.max_failures is None:
            self._check_not_all_failed()

    def _check_not_all_failed(self) -> None:
        """Raise when the whole epoch ran and every one of its samples failed.

        Skipping is for the odd bad sample; an epoch of nothing but failures is a broken
        source or transform, which must not pass as an empty epoch (an explicit
        ``max_failures`` opts out).
        """
        progress = self.progress
        if self.failures == 0 or progress.position > 0 or progress.ahead:
            return  # nothing failed, or an earlier iteration delivered part of the epoch
        shown = ""
        if self.skipped:
            first = self.skipped[0]
            shown = (
                f"; first: sample {first.index} ({first.where}) in stage '{first.stage}': "
                f"{first.message}"
            )
        raise TooManyFailuresError(
            f"every sample of epoch {self.epoch} failed ({self.failures} skipped, none "
            f"delivered): this is not a few bad samples but a broken source or transform"
            f"{shown}. Pass max_failures=1.0 to allow it"
        )

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

    def close(self, join_s: float | None = None, *, reason: str | None = None) -> None:
        """Stop the workers; ``reason`` (stopped from outside) makes the consumer raise."""
        if reason is not None and self.stopped is None:
            self.stopped = reason
        self._close(join_s)


class EpochIterator(Iterator[Batch]):
    """What ``iter(loader)`` returns: the delivering generator's batches, never a silent end.

    A generator that raised is finished: its next ``next()`` would raise StopIteration,
    and a loop that caught the error and went on would lose the rest of the epoch
    unnoticed. Here every later ``next()`` raises :class:`FastFeedError` naming it.

    Args:
        batches: The delivering generator.
        epoch: Its epoch (for the message).
    """

    def __init__(self, batches: Generator[Batch, None, None], epoch: int) -> None:
        self._batches = batches
        self._epoch = epoch
        self._failed: str | None = None

    def __iter__(self) -> EpochIterator:
        return self

    def __next__(self) -> Batch:
        if self._failed is not None:
            raise FastFeedError(
                f"this iteration over epoch {self._epoch} already stopped at an error "
                f"({self._failed}) and delivers no more batches. iter(loader) starts the "
                "next epoch; loader.load_state_dict(loader.state_dict()) first resumes "
                "this one after its last delivered batch"
            )
        try:
            return next(self._batches)
        except StopIteration:
            raise
        except BaseException as exc:
            self._failed = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            raise

    def close(self) -> None:
        """Stop this iteration's workers now (what dropping the iterator does later)."""
        self._batches.close()
