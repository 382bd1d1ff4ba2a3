"""fastfeed: keep GPUs fed during PyTorch training.

Sources (files, LMDB, an in-RAM cache) → a multithreaded prefetcher → collation into
pinned buffers → a side-stream device stager, with a profiler watching every boundary.
"""

from __future__ import annotations

from fastfeed import image
from fastfeed.compat import DataLoader
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
    ResourceLimitError,
    SampleError,
    SourceChangedError,
    SourceError,
    SourceIndexError,
    SourceNotFoundError,
    TooManyFailuresError,
)
from fastfeed.hooks import watch
from fastfeed.loader import Batch, Loader
from fastfeed.pack import PackReport
from fastfeed.report import LoaderStats

# The pack() function stays in fastfeed.pack: exporting it here would shadow the module.
from fastfeed.sources import FileSource, LMDBSource, MemoryCache, Record, Source
from fastfeed.staging import DeviceStager

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "ConfigError",
    "CorruptSourceError",
    "DataLoader",
    "DecodeError",
    "DeviceStager",
    "EmptySourceError",
    "FastFeedError",
    "FileSource",
    "LMDBSource",
    "Loader",
    "LoaderStats",
    "LoaderTimeoutError",
    "MemoryCache",
    "OutputExistsError",
    "PackError",
    "PackReport",
    "Record",
    "RecordReadError",
    "ResourceLimitError",
    "SampleError",
    "Source",
    "SourceChangedError",
    "SourceError",
    "SourceIndexError",
    "SourceNotFoundError",
    "TooManyFailuresError",
    "__version__",
    "image",
    "watch",
]
