"""Cost of the always-on profiling hooks: throughput with the Recorder enabled vs disabled.

Runs a Prefetcher pipeline (read span + transform span + collate span per batch, queue
and consumer hooks) whose batches take ``--batch-ms`` of GIL-releasing work, with the
recorder on and off in alternating rounds, and reports the throughput difference. Also
times one span, one ``add_since`` and the torch-profiler check on their own.

    python benchmarks/profiling_overhead.py --batches 400 --batch-ms 2 --rounds 5 \
        --json profiling_overhead.json

Other processes sharing the CPU make the figures noisy: alternate rounds and compare
medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import timeit
from dataclasses import dataclass

import numpy as np

from fastfeed.prefetch import Prefetcher
from fastfeed.profiling import Recorder, _torch_profiler_active


@dataclass
class _Task:
    indices: list[int]


def _pipeline(recorder: Recorder, batches: int, work: np.ndarray, threads: int) -> float:
    """Samples per second through a read/transform/collate pipeline."""

    def fn(task: _Task) -> float:
        with recorder.span("read", items=32, nbytes=32 * 1000):
            x = np.sin(work[: len(work) // 4])  # numpy releases the GIL
        m = recorder.mark()
        y = float(np.sqrt(np.abs(np.sin(work)) + 1.0).sum())
        recorder.add_since("transform", m, items=32)
        with recorder.span("collate", items=32):
            return y + float(x[0])

    tasks = [_Task(list(range(32 * i, 32 * (i + 1)))) for i in range(batches)]
    t0 = time.perf_counter()
    with Prefetcher(tasks, fn, num_threads=threads, depth=2 * threads, recorder=recorder) as pf:
        for _ in pf:
            pass
    return batches * 32 / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=400)
    ap.add_argument("--batch-ms", type=float, default=2.0, help="work per batch, ms (approx.)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default="profiling_overhead.json")
    args = ap.parse_args()

    # Size the work so one batch takes about --batch-ms on one core.
    work = np.random.default_rng(0).random(100_000)
    t = timeit.timeit(lambda: np.sqrt(np.abs(np.sin(work)) + 1.0).sum(), number=20) / 20
    n = max(1000, int(len(work) * args.batch_ms / 1e3 / t))
    work = np.random.default_rng(0).random(n)

    on, off = [], []
    for _ in range(args.rounds):
        off.append(_pipeline(Recorder(enabled=False), args.batches, work, args.threads))
        on.append(_pipeline(Recorder(), args.batches, work, args.threads))
    med_on, med_off = statistics.median(on), statistics.median(off)
    overhead = 1.0 - med_on / med_off

    rec = Recorder()

    def one_span() -> None:
        with rec.span("x"):
            pass

    def one_add_since() -> None:
        rec.add_since("y", rec.mark())

    span_us = timeit.timeit(one_span, number=20_000) / 20_000 * 1e6
    add_us = timeit.timeit(one_add_since, number=20_000) / 20_000 * 1e6
    check_ns = timeit.timeit(_torch_profiler_active, number=200_000) / 200_000 * 1e9
    off_rec = Recorder(enabled=False)

    def off_span() -> None:
        with off_rec.span("x"):
            pass

    off_us = timeit.timeit(off_span, number=20_000) / 20_000 * 1e6

    import torch

    rows = [
        ("throughput, recorder off (samples/s)", f"{med_off:,.0f}"),
        ("throughput, recorder on (samples/s)", f"{med_on:,.0f}"),
        ("overhead (1 - on/off), median of rounds", f"{100 * overhead:.2f}%"),
        ("one span, enabled (us)", f"{span_us:.2f}"),
        ("one mark + add_since, enabled (us)", f"{add_us:.2f}"),
        ("one span, disabled (us)", f"{off_us:.2f}"),
        ("torch profiler check (ns)", f"{check_ns:.0f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(
        f"profiling overhead: {args.batches} batches x {args.rounds} rounds, "
        f"~{args.batch_ms} ms work per batch, {args.threads} threads"
    )
    for k, v in rows:
        print(f"  {k:<{width}}  {v:>12}")
    result = {
        "benchmark": "profiling_overhead",
        "args": vars(args),
        "samples_per_s_off": off,
        "samples_per_s_on": on,
        "overhead_fraction": overhead,
        "span_us": span_us,
        "add_since_us": add_us,
        "span_disabled_us": off_us,
        "torch_profiler_check_ns": check_ns,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
        },
    }
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
