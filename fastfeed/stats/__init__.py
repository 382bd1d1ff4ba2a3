"""LoaderStats: what a loader measured, and the verdict on what bounds training.

- :mod:`.model`: the result types (:class:`LoaderStats`, :class:`Verdict`, ...);
- :mod:`.probe`: the environment and source facts, read once at collection;
- :mod:`.analyze`: a recorder snapshot -> :class:`LoaderStats` (pure: the batch size and
  thread count are passed in);
- :mod:`.diagnose`: the rules (bound, bottleneck, actions, the noisy neighbour);
- :mod:`.render`: summary, table, JSON; :mod:`.plot`: the PNG;
- :mod:`.gather`: every rank's figures under ``torch.distributed``;
- :mod:`.collect`: a live recorder -> stats (probe, analyze, gather).

Users import from here.
"""

from __future__ import annotations

from fastfeed.stats.analyze import cache_whatif
from fastfeed.stats.model import (
    Action,
    Bottleneck,
    Bound,
    LoaderStats,
    Neighbour,
    TimeSplit,
    Verdict,
)

__all__ = [
    "Action",
    "Bottleneck",
    "Bound",
    "LoaderStats",
    "Neighbour",
    "TimeSplit",
    "Verdict",
    "cache_whatif",
]
