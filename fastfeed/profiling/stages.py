"""The names of the pipeline's stages and queues, one enum each instead of shared strings.

Both are ``str`` enums whose members hash and compare like their values, so a
:class:`~fastfeed.profiling.Recorder` keyed by ``Stage.READ`` is read back with
``stats.stages["read"]`` and JSON holds the plain names. Stages outside the enum (a
user's own ``recorder.span("augment")``) stay plain strings.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["ORDER", "WORKER_EXCLUDED", "Queue", "Stage"]


class Stage(str, Enum):
    """A stage of the data path, in flow order (what :meth:`Recorder.span` is given)."""

    READ = "read"  #: source.read_many / dataset[i]
    DECODE = "decode"  #: image decode when timed apart from the transform
    TRANSFORM = "transform"  #: per-sample transform
    COLLATE = "collate"  #: collate / batch_transform
    COPY = "copy"  #: host-to-device copy (the stager's side stream)
    WAIT = "wait"  #: the training loop blocked waiting for a batch (timeline only)

    __hash__ = str.__hash__  # hash like the plain name: dict lookups by "read" work

    def __str__(self) -> str:
        return self.value


class Queue(str, Enum):
    """A queue between stages."""

    BATCHES = "batches"  #: workers -> training loop (or stager)
    STAGED = "staged"  #: stager -> training loop

    __hash__ = str.__hash__

    def __str__(self) -> str:
        return self.value


#: Stages that are not worker time: the copy runs on the stager, the wait is the loop's.
WORKER_EXCLUDED = frozenset({Stage.COPY, Stage.WAIT})

#: Flow order of the known stages, for tables and plots (unknown names sort last).
ORDER = {s.value: i for i, s in enumerate(Stage)}
