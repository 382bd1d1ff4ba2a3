"""Sources: random access to raw records by index (files, LMDB, an in-RAM cache)."""

from fastfeed.sources.base import Record, Source, SourceCounters

__all__ = ["Record", "Source", "SourceCounters"]
