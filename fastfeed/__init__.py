"""fastfeed: keep GPUs fed during PyTorch training.

Sources (files, LMDB, an in-RAM cache) → a multithreaded prefetcher → collation into
pinned buffers → a side-stream device stager, with a profiler watching every boundary.

Names are imported on first use (PEP 562), so ``import fastfeed`` and the CLI's ``--help``
do not pay for importing torch until a loader, a source or a stats object is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it (the one place the public face is wired).
_EXPORTS: dict[str, str] = {
    "Batch": "fastfeed.pipeline.batch",
    "Bottleneck": "fastfeed.stats",
    "Bound": "fastfeed.stats",
    "ConfigError": "fastfeed.errors",
    "CorruptSourceError": "fastfeed.errors",
    "DataLoader": "fastfeed.dataloader",
    "DecodeError": "fastfeed.errors",
    "DeviceStager": "fastfeed.pipeline.staging",
    "EmptySourceError": "fastfeed.errors",
    "FastFeedError": "fastfeed.errors",
    "FileSource": "fastfeed.sources",
    "LMDBSource": "fastfeed.sources",
    "Loader": "fastfeed.loader",
    "LoaderStats": "fastfeed.stats",
    "LoaderTimeoutError": "fastfeed.errors",
    "MemoryCache": "fastfeed.sources",
    "OutputExistsError": "fastfeed.errors",
    "PackError": "fastfeed.errors",
    "PackReport": "fastfeed.packing",
    "Record": "fastfeed.sources",
    "RecordReadError": "fastfeed.errors",
    "ResourceLimitError": "fastfeed.errors",
    "SampleError": "fastfeed.errors",
    "SourceChangedError": "fastfeed.errors",
    "SkippedSample": "fastfeed.pipeline.batch",
    "Source": "fastfeed.sources",
    "SourceError": "fastfeed.errors",
    "SourceIndexError": "fastfeed.errors",
    "SourceNotFoundError": "fastfeed.errors",
    "TooManyFailuresError": "fastfeed.errors",
    "Verdict": "fastfeed.stats",
    "WorkerError": "fastfeed.errors",
    "get_worker_info": "fastfeed.dataloader",
    "open_source": "fastfeed.sources",
    "pack": "fastfeed.packing",
    "sample_rng": "fastfeed.rng",
    "watch": "fastfeed.hooks",
}
_SUBMODULES = frozenset({"image"})

__all__ = [
    "Batch",
    "Bottleneck",
    "Bound",
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
    "SkippedSample",
    "Source",
    "SourceChangedError",
    "SourceError",
    "SourceIndexError",
    "SourceNotFoundError",
    "TooManyFailuresError",
    "Verdict",
    "WorkerError",
    "__version__",
    "get_worker_info",
    "image",
    "open_source",
    "pack",
    "sample_rng",
    "watch",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"fastfeed.{name}")
    else:
        raise AttributeError(f"module 'fastfeed' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # static checkers and IDEs see the real names
    from fastfeed import image
    from fastfeed.dataloader import DataLoader, get_worker_info
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
        WorkerError,
    )
    from fastfeed.hooks import watch
    from fastfeed.loader import Loader
    from fastfeed.packing import PackReport, pack
    from fastfeed.pipeline.batch import Batch, SkippedSample
    from fastfeed.pipeline.staging import DeviceStager
    from fastfeed.rng import sample_rng
    from fastfeed.sources import (
        FileSource,
        LMDBSource,
        MemoryCache,
        Record,
        Source,
        open_source,
    )
    from fastfeed.stats import Bottleneck, Bound, LoaderStats, Verdict
