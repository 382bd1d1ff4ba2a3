"""Sources: random access to raw records by index (files, LMDB, an in-RAM cache).

:func:`open_source` turns any supported path into the right source.
"""

from fastfeed.sources.base import Record, Source, SourceCounters
from fastfeed.sources.files import IMG_EXTENSIONS, FileSource
from fastfeed.sources.lmdb import LMDBSource
from fastfeed.sources.memory import MemoryCache
from fastfeed.sources.open import is_lmdb, open_source

__all__ = [
    "IMG_EXTENSIONS",
    "FileSource",
    "LMDBSource",
    "MemoryCache",
    "Record",
    "Source",
    "SourceCounters",
    "is_lmdb",
    "open_source",
]
