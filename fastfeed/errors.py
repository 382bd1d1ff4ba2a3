"""The one exception tree of fastfeed.

Every error fastfeed raises derives from :class:`FastFeedError`, and every error
about data names *where* it happened: the index, the path or key, and the stage::

    FastFeedError
    ├── ConfigError (ValueError)            an argument or combination fastfeed cannot honour
    ├── SourceError                         a source could not be opened or read
    │   ├── SourceNotFoundError (FileNotFoundError)   missing root, path or LMDB
    │   ├── EmptySourceError                          a folder / list / DB with no records
    │   ├── CorruptSourceError                        not an LMDB, random bytes, truncated data.mdb
    │   │   └── SourceChangedError                    replaced or rewritten under an open source
    │   ├── RecordReadError (OSError)                 one record: zero-byte, permission, deleted
    │   │   └── ResourceLimitError                    too many open files: the record is fine
    │   └── SourceIndexError (IndexError)             index outside 0..len-1
    ├── PackError                           writing an LMDB failed
    │   └── OutputExistsError (FileExistsError)       refusing to overwrite
    ├── DecodeError                         bytes that are not a valid image / array
    ├── SampleError                         a sample failed inside the loader (index, key, stage)
    ├── TooManyFailuresError                on_error="skip" passed max_failures
    ├── WorkerError (RuntimeError)          a worker process died (signal, segfault, OOM)
    └── LoaderTimeoutError (TimeoutError, RuntimeError)   no batch arrived within ``timeout``

The original exception is always chained (``raise ... from exc``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "ConfigError",
    "CorruptSourceError",
    "DecodeError",
    "EmptySourceError",
    "FastFeedError",
    "LoaderTimeoutError",
    "OutputExistsError",
    "PackError",
    "RecordReadError",
    "ResourceLimitError",
    "SampleError",
    "SourceChangedError",
    "SourceError",
    "SourceIndexError",
    "SourceNotFoundError",
    "TooManyFailuresError",
    "WorkerError",
]


class FastFeedError(Exception):
    """Base class of every error fastfeed raises."""


class ConfigError(FastFeedError, ValueError):
    """An argument, or a combination of arguments, that fastfeed cannot honour."""


class SourceError(FastFeedError):
    """A source could not be opened or a record could not be read.

    Attributes:
        path: The file, folder or LMDB path involved, when known.
        index: The record index involved, when known.
    """

    def __init__(self, message: str, *, path: str | None = None, index: int | None = None):
        # Pass only the message to the base, so OSError subclasses do not reinterpret it.
        super().__init__(message)
        self.path = path
        self.index = index

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(self):  # keep path/index across pickling (process workers)
        return (_rebuild_source_error, (type(self), str(self), self.path, self.index))


def _rebuild_source_error(cls, message, path, index):
    return cls(message, path=path, index=index)


class SourceNotFoundError(SourceError, FileNotFoundError):
    """The root folder, file or LMDB path does not exist."""


class EmptySourceError(SourceError):
    """The folder, file list or database holds no records."""


class CorruptSourceError(SourceError):
    """The path exists but is not a readable source (not an LMDB, truncated, random bytes)."""


class SourceChangedError(CorruptSourceError):
    """The data changed under an open source: the file was replaced, or rewritten in place.

    Reading on would pair new records with the labels and count read at open, so the
    loaders never skip it (it is a :class:`CorruptSourceError`): open a new source.
    """


class RecordReadError(SourceError, OSError):
    """One record could not be read (zero-byte file, permission denied, deleted after indexing)."""


class ResourceLimitError(RecordReadError):
    """A process or system limit stopped a read (``EMFILE`` / ``ENFILE``: too many open files).

    The record itself is fine, so the loaders raise it even with ``on_error="skip"``:
    skipping would drop good samples for as long as the limit is hit.
    """


class SourceIndexError(SourceError, IndexError):
    """An index outside ``0..len(source)-1``."""


class PackError(FastFeedError):
    """Packing records into an LMDB failed."""


class OutputExistsError(PackError, FileExistsError):
    """The pack output already exists and ``overwrite`` was not given."""


class DecodeError(FastFeedError):
    """Record bytes could not be decoded (not an image, truncated, decompression bomb)."""


class SampleError(FastFeedError):
    """A sample failed inside the loader.

    The message names the index, where the record lives (path or key) and the stage
    (``read``, ``decode``, ``transform``, ``collate``, ``copy``); the original
    exception is chained as ``__cause__``.

    Attributes:
        index: Dataset index of the sample.
        where: Path or key of the record, as the source describes it.
        stage: Pipeline stage that failed.
    """

    def __init__(self, index: int | None, where: str, stage: str, cause: BaseException):
        self.index = index
        self.where = where
        self.stage = stage
        self.cause_repr = f"{type(cause).__name__}: {cause}"
        super().__init__(_sample_message(index, where, stage, self.cause_repr))

    def __reduce__(self):
        return (_rebuild_sample_error, (self.index, self.where, self.stage, self.cause_repr))


def _sample_message(index: int | None, where: str, stage: str, cause_repr: str) -> str:
    # index None: a failure of a whole batch (a batched fetch or collate), named by ``where``.
    what = where if index is None else f"sample {index} ({where})"
    return f"{what} failed in stage '{stage}': {cause_repr}"


def _rebuild_sample_error(index, where, stage, cause_repr):
    err = SampleError.__new__(SampleError)
    FastFeedError.__init__(err, _sample_message(index, where, stage, cause_repr))
    err.index, err.where, err.stage, err.cause_repr = index, where, stage, cause_repr
    return err


def describe_indices(indices: Sequence[Any], shown: int = 8) -> str:
    """``[3, 9, 4, ... (64 in all)]``: the first ``shown`` indices of a batch, for messages.

    The one place this text is made, so every error and timeout names batches alike.
    """
    head = ", ".join(repr(i) for i in list(indices[:shown]))
    more = f", ... ({len(indices)} in all)" if len(indices) > shown else ""
    return f"[{head}{more}]"


class TooManyFailuresError(FastFeedError):
    """With ``on_error="skip"``, more samples failed than ``max_failures`` allows."""


class WorkerError(FastFeedError, RuntimeError):
    """A worker process died (a signal, a segfault in a codec, the OOM killer, an exit).

    Attributes:
        worker: The worker's number (its process is named ``fastfeed-worker-<n>``).
        pid: Its process id.
        exitcode: Its exit code; negative: killed by that signal.
        in_flight: The dataset indices it was working on.
    """

    def __init__(
        self,
        message: str,
        *,
        worker: int = -1,
        pid: int | None = None,
        exitcode: int | None = None,
        in_flight: Sequence[int] = (),
    ):
        super().__init__(message)
        self.worker = worker
        self.pid = pid
        self.exitcode = exitcode
        self.in_flight = list(in_flight)

    def __reduce__(self):
        return (
            _rebuild_worker_error,
            (str(self), self.worker, self.pid, self.exitcode, self.in_flight),
        )


def _rebuild_worker_error(message, worker, pid, exitcode, in_flight):
    return WorkerError(message, worker=worker, pid=pid, exitcode=exitcode, in_flight=in_flight)


class LoaderTimeoutError(FastFeedError, TimeoutError, RuntimeError):
    """No batch arrived within the loader's ``timeout``.

    Also a ``RuntimeError``, what torch's DataLoader raises on timeout, so existing
    ``except RuntimeError`` handlers keep working with the drop-in DataLoader.

    Attributes:
        in_flight: The dataset indices still being worked on when the timeout fired.
    """

    def __init__(self, message: str, in_flight: Sequence[int] = ()):
        super().__init__(message)
        self.in_flight = list(in_flight)
