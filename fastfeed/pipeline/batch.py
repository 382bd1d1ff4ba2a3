"""What travels along the pipeline: batch tasks, finished batches, skipped samples.

A :class:`BatchTask` is one batch of the sampler's order (its number in the epoch, its
indices, and the indices the worker should hint to the source); a worker turns it into a
:class:`BatchResult`, and the epoch's books turn results into the :class:`Batch` objects
the training loop unpacks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from fastfeed.errors import describe_indices
from fastfeed.pipeline.buffers import compact

__all__ = ["Batch", "BatchResult", "BatchTask", "SkippedSample", "describe_task", "plan_tasks"]


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
        # Pickled (or torch.save'd) with its own rows only, never a whole ring slot.
        return (Batch, (compact(self[0]), compact(self[1]), self.indices))


class SkippedSample(NamedTuple):
    """A sample left out with ``on_error="skip"``.

    Attributes:
        index: Dataset index.
        where: Path or key, as the source describes it.
        stage: ``read``, ``decode``, ``transform`` or ``collate``.
        message: ``"ExceptionType: message"`` of the original error.
    """

    index: int  # type: ignore[assignment]  # the field shadows tuple.index, by design
    where: str
    stage: str
    message: str


@dataclass(frozen=True)
class BatchTask:
    """Work item of one batch: its number in the epoch, indices, indices to hint, epoch."""

    number: int
    indices: list[int]
    hint_next: list[int]
    epoch: int = 0


@dataclass
class BatchResult:
    """A finished batch. ``data is None`` when every sample failed (skip mode)."""

    number: int
    data: Any
    labels: torch.Tensor | None
    indices: list[int]
    failures: list[SkippedSample]


def describe_task(task: BatchTask) -> str:
    """``batch 3 [indices 7, 1, ...]``: a task as timeouts and errors name it."""
    return f"batch {task.number} indices {describe_indices(task.indices)}"


def plan_tasks(
    batches: Sequence[Any], todo: Sequence[int], lookahead: int, epoch: int = 0
) -> Iterator[BatchTask]:
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
        yield BatchTask(k, batches[k].tolist(), hint, epoch)
