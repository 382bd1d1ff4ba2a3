"""Facts about the environment and the source, read once when stats are collected.

Everything here may touch the outside world (``/proc``, the source's objects, a
temporary file for the IO-accounting check); :mod:`.analyze` receives the results as
plain values and stays pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastfeed._procio import io_accounting_works
from fastfeed.sources.base import source_chain

__all__ = ["SourceFacts", "io_accounted", "source_facts"]


@dataclass(frozen=True)
class SourceFacts:
    """What the analysis needs to know about the loader's source.

    Attributes:
        kind: ``"source"`` (a fastfeed Source: MemoryCache and packing apply),
            ``"dataset"`` (a plain map-style Dataset behind ``fastfeed.DataLoader``) or
            ``"opaque"`` (``fastfeed.watch`` around another loader; nothing is known).
        storage: Class name of the innermost source (``"FileSource"``, ``"LMDBSource"``...).
        counters: The source's read counters (``reads``, ``bytes``, ``time_s``...), if any.
        storage_bytes: Bytes the innermost (storage) source has read so far, if counted.
        cache: ``MemoryCache.cache_stats()`` of a cache along the chain, if any.
        dataset_bytes: Total record bytes when cheaply known (``record_sizes()``).
        packed_max_side: For a fastfeed LMDB: the ``max_side`` it was packed with
            (None: packed without resizing, or not a pack).
        is_pack: The innermost source is an LMDB written by ``fastfeed pack``.
    """

    kind: str = "opaque"
    storage: str | None = None
    counters: dict[str, Any] | None = None
    storage_bytes: int | None = None
    cache: dict[str, Any] | None = None
    dataset_bytes: int | None = None
    packed_max_side: int | None = None
    is_pack: bool = False


def _counters(obj: Any) -> dict[str, Any] | None:
    counters = getattr(obj, "counters", None)
    if counters is None:
        return None
    try:
        return dict(counters.snapshot())
    except Exception:  # duck-typed; a foreign counters object must not break stats()
        return None


def source_facts(source: Any, *, kind: str | None = None) -> SourceFacts:
    """Read what the analysis needs from ``source`` (None: nothing is known).

    Args:
        source: The loader's source or dataset.
        kind: ``"source"``, ``"dataset"`` or ``"opaque"``; None decides from ``source``
            (a fastfeed Source, something else, or nothing).
    """
    if source is None:
        return SourceFacts(kind=kind or "opaque")
    if kind is None:
        from fastfeed.sources.base import Source

        kind = "source" if isinstance(source, Source) else "dataset"
    chain = source_chain(source)
    inner = chain[-1]
    cache = None
    for obj in chain:
        stats = getattr(obj, "cache_stats", None)
        if callable(stats):
            try:
                cache = dict(stats())
            except Exception:  # duck-typed; never fail stats over it
                cache = None
            break
    dataset_bytes = None
    sizes = getattr(inner, "record_sizes", None)
    if callable(sizes):
        try:
            dataset_bytes = int(sum(sizes()))
        except Exception:  # a best-effort figure
            dataset_bytes = None
    meta = getattr(inner, "meta", None)
    is_pack = isinstance(meta, dict) and "format_version" in meta
    max_side = meta.get("max_side") if is_pack and isinstance(meta, dict) else None
    inner_counters = _counters(inner)
    return SourceFacts(
        kind=kind,
        storage=type(inner).__name__,
        counters=_counters(source),
        storage_bytes=None if inner_counters is None else int(inner_counters.get("bytes", 0)),
        cache=cache,
        dataset_bytes=dataset_bytes,
        packed_max_side=int(max_side) if isinstance(max_side, int) else None,
        is_pack=is_pack,
    )


def io_accounted(io: dict[str, int] | None) -> bool | None:
    """Whether ``read_bytes`` counts storage reads here, asked only when it matters.

    When the process fetched nothing from storage (``read_bytes == 0``) that means
    "all page-cache hits" only if the kernel accounts ``read_bytes`` at all; the check
    (:func:`fastfeed._procio.io_accounting_works`, once per process) writes, evicts and
    reads back a 1 MiB temporary file. None when not needed or inconclusive.
    """
    if io is None or int(io.get("read_bytes", 0)) > 0 or int(io.get("rchar", 0)) <= 0:
        return None
    return io_accounting_works()
