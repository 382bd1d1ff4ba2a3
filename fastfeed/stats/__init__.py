"""LoaderStats: what a loader measured, and the verdict on what bounds training.

The result types, the analysis of a :class:`~fastfeed.profiling.Recorder` snapshot, the
diagnosis rules, the rendering (summary, table, JSON, trace, plot) and the distributed
gather live in the modules of this package; users import from here.
"""

from __future__ import annotations

from fastfeed.stats.report import (
    Action,
    Bottleneck,
    Bound,
    LoaderStats,
    Verdict,
    cache_whatif,
)

__all__ = ["Action", "Bottleneck", "Bound", "LoaderStats", "Verdict", "cache_whatif"]
