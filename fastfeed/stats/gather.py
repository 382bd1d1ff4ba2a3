"""Every rank's headline figures under ``torch.distributed``: the slowest rank, stragglers.

:func:`gather` is a collective (``all_gather_object``): every rank must call it.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from fastfeed.stats.model import LoaderStats, RankSummary

__all__ = ["dist_world", "gather", "rank_summary", "stragglers"]


def dist_world() -> int:
    """World size of the initialized process group; 1 without one (or without torch)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return 1
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def gather(stats: LoaderStats) -> None:
    """Fill ``stats.rank``, ``world_size``, ``ranks``, ``slowest_rank``, ``stragglers``."""
    import torch.distributed as dist

    mine = stats.to_dict(include_ranks=False)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    stats.rank = dist.get_rank()
    stats.world_size = len(everyone)
    stats.ranks = [rank_summary(r, d) for r, d in enumerate(everyone)]
    stats.slowest_rank, stats.stragglers = stragglers(stats.ranks)


def rank_summary(rank: int, d: Mapping[str, Any]) -> RankSummary:
    """One rank's headline figures from its :meth:`LoaderStats.to_dict`."""
    steps = int(d.get("steps", 0))
    return RankSummary(
        rank=rank,
        stall_fraction=float(d.get("stall_fraction", 0.0)),
        wait_per_step_s=float(d.get("wait_s", 0.0)) / steps if steps else 0.0,
        step_mean_s=float(d.get("step_s", 0.0)) / steps if steps else 0.0,
        samples_per_s=float(d.get("samples_per_s", 0.0)),
        bound=str(d.get("verdict", {}).get("bound", "unknown")),
        bottleneck=str(d.get("verdict", {}).get("bottleneck", "none")),
    )


def stragglers(ranks: Sequence[RankSummary]) -> tuple[int | None, list[int]]:
    """The rank that waits most per step, and ranks waiting markedly more than the median.

    Under synchronous data parallelism every rank's step takes as long as the slowest;
    the rank starved of input is the one whose training loop *waits for data*, while
    the others wait inside the gradient all-reduce (counted as compute).
    """
    if not ranks:
        return None, []
    slowest = max(ranks, key=lambda r: r.wait_per_step_s).rank
    med = statistics.median(r.wait_per_step_s for r in ranks)
    step = statistics.median(r.step_mean_s for r in ranks)
    margin = max(0.5 * med, 0.05 * step, 1e-4)
    late = [r.rank for r in ranks if r.wait_per_step_s > med + margin]
    return slowest, late
