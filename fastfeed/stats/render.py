"""Words and numbers for people and programs: summary, table, JSON.

The summary is at most three lines (the verdict, the next step, the noisy neighbour or
how the workers ran); ``summary(details=True)`` adds the figures behind it. The table
has a legend for its columns and says what the queues' waits mean in words.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from typing import Any

from fastfeed._size import format_size
from fastfeed.profiling.stages import ORDER, Stage
from fastfeed.stats.model import LoaderStats

__all__ = ["LEGEND", "summary", "table", "to_dict", "to_json", "trace_covers"]

LEGEND = (
    "columns: rate/s = samples per second through the stage; p50/p99 = span time "
    "(usually one batch); busy = share of the elapsed time the stage kept its threads busy; "
    "CPU/wall = computing share of the stage's time (1.00: all computing; low: waiting); "
    "core/GIL/IO = share of the stage's time waiting for a free core, for the GIL, "
    "and on IO (storage, network, sleeps, locks); fail = spans that raised; "
    "consumer = the training loop's steps"
)

_QUEUE_WORDS = {
    "batches": ("the training loop waited {get} for batches; workers waited {put} for room"),
    "staged": ("the training loop waited {get} for copied batches; the copy waited {put} for room"),
}


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _ms(x: float) -> str:
    return f"{1e3 * x:.1f} ms" if x < 10 else f"{x:.1f} s"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _execution(stats: LoaderStats) -> str:
    ex = stats.execution
    if not ex:
        return ""
    mode = ex.get("mode", "?")
    k = ex.get("processes")
    how = f"{mode}" + (f" ({k} processes)" if k else "")
    reason = ex.get("reason")
    return f"workers ran as {how}" + (f": {reason}" if reason else "")


def summary(stats: LoaderStats, details: bool = False) -> str:
    """At most three lines; ``details`` adds the figures, one topic per line."""
    v = stats.verdict
    lines = [v.sentence if v.sentence.endswith(".") else v.sentence + "."]
    if v.actions:
        lines.append(f"Next: {v.actions[0]}.")
    third = []
    if stats.neighbour is not None and stats.neighbour.sentence:
        third.append(stats.neighbour.sentence[0].upper() + stats.neighbour.sentence[1:])
    ex = _execution(stats)
    if ex:
        third.append(ex[0].upper() + ex[1:])
    if third:
        lines.append(". ".join(third) + ".")
    if details:
        lines.extend(_details(stats))
    return "\n".join(lines)


def _details(stats: LoaderStats) -> list[str]:
    out = []
    if stats.steps:
        out.append(
            f"Steps: {stats.steps} in {_ms(stats.elapsed_s)}; per step "
            f"{_ms(stats.step_s / stats.steps)} = "
            f"{_ms(stats.wait_s / stats.steps)} waiting for data + "
            f"{_ms(stats.compute_per_step_s)} computing; {stats.samples_per_s:,.0f} samples/s."
        )
    for a in stats.verdict.actions[1:]:
        out.append(f"Also: {a}.")
    shown = sorted(
        (s for n, s in stats.stages.items() if n != Stage.WAIT),
        key=lambda s: ORDER.get(s.name, 99),
    )
    for s in shown:
        split = s.split()
        shares = split.shares() if split else {}
        bits = ", ".join(f"{_pct(x)} {k}" for k, x in shares.items() if x >= 0.01)
        out.append(
            f"Stage {s.name}: {_ms(s.busy_s / max(1, s.count))} per span on {s.threads} "
            f"thread(s): {bits or 'no time'}" + (f"; {s.failures} failed" if s.failures else "")
        )
    for q in stats.queues.values():
        out.append("Queue: " + _queue_words(q.name, q.get_wait_s, q.put_wait_s) + ".")
    if stats.io is not None and (stats.io.requested_bytes >= 1 << 20 or stats.io.read_bytes):
        if stats.io.page_cache_hit is not None:
            out.append(
                f"IO: {format_size(stats.io.requested_bytes)} requested, "
                f"{format_size(stats.io.read_bytes)} fetched from storage "
                f"(page-cache hit {_pct(stats.io.page_cache_hit)})."
            )
        else:
            out.append(f"IO: page-cache hit ratio unknown ({stats.io.note}).")
    if stats.storage is not None:
        out.append(f"Storage: {stats.storage.line()} ({stats.storage.reason}).")
    if stats.cache is not None:
        c = stats.cache
        out.append(
            f"RAM cache: {_pct(c.hit_rate)} hits ({c.hits} hits, {c.misses} misses, "
            f"{format_size(c.bytes_cached)} of {format_size(c.capacity_bytes)} used)."
        )
    host = f"Host: this process used {_pct(stats.host_busy)} of {stats.cpu_count} cores"
    if stats.others_cores is not None:
        host += f"; other processes kept {stats.others_cores:.1f} cores busy"
    if stats.gil_wait_per_acquire_s is not None:
        host += f"; one GIL acquisition cost {_ms(stats.gil_wait_per_acquire_s)}"
    out.append(host + ".")
    if stats.skipped:
        out.append(f"{stats.skipped} samples skipped (first: {stats.skipped_indices[:5]}).")
    if stats.world_size > 1 and stats.ranks:
        worst = stats.ranks[stats.slowest_rank or 0]
        med = statistics.median(r.stall_fraction for r in stats.ranks)
        out.append(
            f"Across {stats.world_size} ranks the slowest is rank {worst.rank} "
            f"({_pct(worst.stall_fraction)} stall vs median {_pct(med)})"
            + (
                f"; stragglers: {', '.join(map(str, stats.stragglers))}."
                if stats.stragglers
                else "; no stragglers."
            )
        )
    return out


def _queue_words(name: str, get_s: float, put_s: float) -> str:
    words = _QUEUE_WORDS.get(name) or (f"queue {name}: consumers waited {{get}}, producers {{put}}")
    return words.format(get=_ms(get_s), put=_ms(put_s))


def table(stats: LoaderStats) -> str:
    """One row per stage, a legend, the queues in words, the verdict and actions."""
    head = (
        f"{'stage':<10} {'rate/s':>9} {'p50':>9} {'p99':>9} {'busy':>5} {'CPU/wall':>8} "
        f"{'core':>5} {'GIL':>5} {'IO':>5} {'MB/s':>8} {'fail':>5}"
    )
    lines = [head, "-" * len(head)]
    for s in sorted(stats.stages.values(), key=lambda s: ORDER.get(s.name, 99)):
        if s.name == Stage.WAIT:
            continue
        split = s.split()
        shares = split.shares() if split else {}

        def cell(key: str, shares: dict[str, float] = shares) -> str:
            return _pct(shares[key]) if key in shares else "-"

        lines.append(
            f"{s.name:<10} {s.rate_items_per_s:>9,.0f} {_ms(s.p50_s):>9} {_ms(s.p99_s):>9} "
            f"{_pct(s.utilization):>5} {_ratio(s.cpu_per_wall):>8} {cell('runq'):>5} "
            f"{cell('gil'):>5} {cell('io'):>5} {s.mb_per_s:>8.1f} {s.failures:>5}"
        )
    if stats.steps:
        lines.append(
            f"{'consumer':<10} {stats.samples_per_s:>9,.0f} {_ms(stats.step_p50_s):>9} "
            f"{_ms(stats.step_p99_s):>9}  (step time; {_pct(stats.stall_fraction)} of it "
            "waiting for data)"
        )
    lines.append(LEGEND)
    for q in stats.queues.values():
        lines.append(
            _queue_words(q.name, q.get_wait_s, q.put_wait_s)
            + f" (on average {q.mean_depth:.1f} of {q.capacity} batches ready)"
        )
    lines.append("")
    lines.append(f"verdict: {stats.verdict.sentence}")
    for i, a in enumerate(stats.verdict.actions, 1):
        lines.append(f"  {i}. {a}")
    if stats.neighbour is not None and stats.neighbour.sentence:
        lines.append(f"noisy neighbour: {stats.neighbour.sentence}")
    ex = _execution(stats)
    if ex:
        lines.append(ex)
    return "\n".join(lines)


_FIELDS = (
    "elapsed_s",
    "steps",
    "batches",
    "samples",
    "batch_size",
    "stall_fraction",
    "wait_s",
    "startup_wait_s",
    "step_s",
    "compute_per_step_s",
    "step_p50_s",
    "step_p99_s",
    "wait_p50_s",
    "wait_p99_s",
    "samples_per_s",
    "num_threads",
    "cpu_count",
    "process_cpu_s",
    "host_busy",
    "machine_busy",
    "others_cores",
    "gil_wait_per_acquire_s",
    "execution",
    "source",
    "skipped",
    "skipped_indices",
    "device",
)


def to_dict(stats: LoaderStats, include_ranks: bool = True) -> dict[str, Any]:
    """Everything as JSON-serializable plain data (no timeline)."""
    out: dict[str, Any] = {k: getattr(stats, k) for k in _FIELDS}
    out["verdict"] = stats.verdict.to_dict()
    out["workers"] = stats.workers.to_dict() if stats.workers else None
    out["neighbour"] = stats.neighbour.to_dict() if stats.neighbour else None
    out["stages"] = {k: v.to_dict() for k, v in stats.stages.items()}
    out["queues"] = {k: v.to_dict() for k, v in stats.queues.items()}
    out["io"] = stats.io.to_dict() if stats.io else None
    out["storage"] = dataclasses.asdict(stats.storage) if stats.storage else None
    out["cache"] = stats.cache.to_dict() if stats.cache else None
    out["whatif"] = [{"cache_fraction": f, "samples_per_s": r} for f, r in stats.whatif]
    if include_ranks:
        out["rank"] = stats.rank
        out["world_size"] = stats.world_size
        out["ranks"] = [r.to_dict() for r in stats.ranks]
        out["slowest_rank"] = stats.slowest_rank
        out["stragglers"] = list(stats.stragglers)
    if stats.extra:
        out["extra"] = stats.extra
    return out


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def to_json(stats: LoaderStats, indent: int | None = 2) -> str:
    """:func:`to_dict` as a JSON string (infinities written as null)."""
    return json.dumps(_finite(to_dict(stats)), indent=indent)


def trace_covers(stats: LoaderStats) -> str:
    """What the kept timeline covers, in words (for the trace's metadata)."""
    phases = stats.extra.get("phases")
    if isinstance(phases, dict):
        if phases.get("step") not in (None, "none"):
            which = "phase 5/5 (the full loader with the model step)"
        else:
            which = "phase 4/5 (the full loader, no model step)"
        return (
            f"{which} only; phases 1-3 (raw reads, one-thread transform) are not "
            "loader runs and are summarized in the 'phases' figures"
        )
    n = len(stats._events)
    return f"the latest {n} events since the recorder started or was reset"
