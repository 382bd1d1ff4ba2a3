"""``Subset``: some records of another source, in a given order, renumbered ``0..n-1``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from fastfeed.sources.base import Record, Source

__all__ = ["Subset"]


class Subset(Source):
    """The records ``indices`` of ``base`` (in that order) as a source of their own.

    Reads, ``describe`` and read-ahead hints map to the base source; the base keeps
    its handles (closing the subset does not close it).

    Args:
        base: The source to take records from.
        indices: Base indices; index ``i`` of the subset is ``base[indices[i]]``.
    """

    def __init__(self, base: Source, indices: Sequence[int]) -> None:
        super().__init__()
        self.base = base
        self.indices = [int(i) for i in indices]
        self.classes = base.classes

    def __len__(self) -> int:
        return len(self.indices)

    def describe(self, index: int) -> str:
        return self.base.describe(self.indices[index])

    def _read_one(self, index: int) -> Record:
        return self.base.read(self.indices[index])

    def _read_many(self, indices: Sequence[int]) -> list[Record]:
        return self.base.read_many([self.indices[i] for i in indices])

    def identity(self) -> tuple[object, ...] | None:
        """The base's identity and the chosen indices, or None where the base has none."""
        base = self.base.identity()
        if base is None:
            return None
        return ("Subset", base, hash(tuple(self.indices)), len(self.indices))

    def hint(self, indices: Iterable[int]) -> None:
        self.base.hint([self.indices[i] for i in indices])

    @property
    def source(self) -> Source:
        """The base source (lets reports find a cache or the storage under it)."""
        return self.base
