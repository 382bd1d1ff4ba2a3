"""Sources: random access to raw records by index (files, LMDB, an in-RAM cache)."""

from fastfeed.sources.base import Record, Source, SourceCounters
from fastfeed.sources.files import IMG_EXTENSIONS, FileSource
from fastfeed.sources.lmdb import LMDBSource
from fastfeed.sources.memory import MemoryCache

__all__ = [
    "IMG_EXTENSIONS",
    "FileSource",
    "LMDBSource",
    "MemoryCache",
    "Record",
    "Source",
    "SourceCounters",
]
