"""Chrome trace export: open the file in https://ui.perfetto.dev or chrome://tracing.

The format is the Trace Event Format's JSON object form::

    {"traceEvents": [...], "displayTimeUnit": "ms", "otherData": {...}}

- one ``"ph": "X"`` complete event per stage span (``ts``/``dur`` in microseconds from
  the recorder's start, ``pid`` = rank, ``tid`` = a small integer per thread);
- ``"ph": "M"`` metadata events naming the process and every thread
  (``thread_name``, ``process_name``);
- ``"ph": "C"`` counter events: the depth of every queue (``queue <name>``) and the
  bytes per second through the read stage (``read MB/s``, in windows of ``window_s``).

The consumer's waits show as ``wait`` slices on the training loop's thread.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from fastfeed.profiling.rings import TraceEvent

__all__ = ["chrome_trace", "write_chrome_trace"]


def chrome_trace(
    events: Sequence[TraceEvent],
    counters: Sequence[tuple[str, float, float]] = (),
    *,
    t0: float | None = None,
    pid: int = 0,
    process_name: str = "fastfeed",
    window_s: float = 0.1,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build a Chrome trace dict from recorder events.

    Args:
        events: ``(name, thread_name, start_s, end_s, args)`` spans (``perf_counter`` times).
        counters: ``(queue_name, time_s, depth)`` samples.
        t0: Time zero (``perf_counter``), seconds; the earliest event when None.
        pid: Process id to write (the rank under torch.distributed).
        process_name: Shown as the process's name.
        window_s: Width of the windows the read MB/s counter averages over, seconds.
        metadata: Extra key/values for ``otherData``.

    Returns:
        A JSON-serializable dict with ``traceEvents``.
    """
    if t0 is None:
        starts = [e[2] for e in events] + [c[1] for c in counters]
        t0 = min(starts) if starts else 0.0

    def us(t: float) -> float:
        return round((t - t0) * 1e6, 3)

    tids: dict[str, int] = {}
    out: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": process_name}}
    ]
    spans: list[dict[str, Any]] = []
    read_bytes: dict[int, float] = {}
    for name, thread, start, end, args in sorted(events, key=lambda e: e[2]):
        tid = tids.get(thread)
        if tid is None:
            tid = tids[thread] = len(tids) + 1
        spans.append(
            {
                "ph": "X",
                "name": name,
                "cat": "fastfeed",
                "pid": pid,
                "tid": tid,
                "ts": us(start),
                "dur": round(max(0.0, end - start) * 1e6, 3),
                "args": dict(args),
            }
        )
        nbytes = args.get("bytes", 0) if name == "read" else 0
        if nbytes and end >= start:
            # Spread the span's bytes over the windows it covers.
            dur = max(end - start, 1e-9)
            w = int((start - t0) // window_s)
            while True:
                lo = max(start, t0 + w * window_s)
                hi = min(end, t0 + (w + 1) * window_s)
                if hi > lo or dur <= 1e-9:
                    read_bytes[w] = read_bytes.get(w, 0.0) + nbytes * (hi - lo) / dur
                if t0 + (w + 1) * window_s >= end:
                    break
                w += 1
    for thread, tid in tids.items():
        out.append(
            {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": thread}}
        )
        out.append(
            {
                "ph": "M",
                "name": "thread_sort_index",
                "pid": pid,
                "tid": tid,
                "args": {"sort_index": tid},
            }
        )
    out.extend(spans)
    for name, t, depth in counters:
        out.append(
            {
                "ph": "C",
                "name": f"queue {name}",
                "pid": pid,
                "tid": 0,
                "ts": us(t),
                "args": {"depth": depth},
            }
        )
    if read_bytes:
        last = max(read_bytes)
        for w in range(min(read_bytes), last + 2):  # close with a zero after the last window
            out.append(
                {
                    "ph": "C",
                    "name": "read MB/s",
                    "pid": pid,
                    "tid": 0,
                    "ts": round(w * window_s * 1e6, 3),
                    "args": {"MB/s": round(read_bytes.get(w, 0.0) / window_s / 1e6, 3)},
                }
            )
    return {
        "traceEvents": out,
        "displayTimeUnit": "ms",
        "otherData": {"generator": "fastfeed", **dict(metadata or {})},
    }


def write_chrome_trace(
    path: str | os.PathLike[str],
    events: Sequence[TraceEvent],
    counters: Sequence[tuple[str, float, float]] = (),
    **kwargs: Any,
) -> None:
    """Write :func:`chrome_trace` to ``path`` as JSON (keyword arguments pass through)."""
    trace = chrome_trace(events, counters, **kwargs)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(trace, f, separators=(",", ":"))
