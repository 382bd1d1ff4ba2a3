"""fastfeed: keep GPUs fed during PyTorch training.

Sources (files, LMDB, an in-RAM cache) → a multithreaded prefetcher → collation into
pinned buffers → a side-stream device stager, with a profiler watching every boundary.
"""

from __future__ import annotations

from fastfeed.errors import (
    ConfigError,
    CorruptSourceError,
    DecodeError,
    EmptySourceError,
    FastFeedError,
    LoaderTimeoutError,
    OutputExistsError,
    PackError,
    RecordReadError,
    SampleError,
    SourceError,
    SourceIndexError,
    SourceNotFoundError,
    TooManyFailuresError,
)
from fastfeed.sources.base import Record, Source

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "CorruptSourceError",
    "DecodeError",
    "EmptySourceError",
    "FastFeedError",
    "LoaderTimeoutError",
    "OutputExistsError",
    "PackError",
    "Record",
    "RecordReadError",
    "SampleError",
    "Source",
    "SourceError",
    "SourceIndexError",
    "SourceNotFoundError",
    "TooManyFailuresError",
    "__version__",
]
