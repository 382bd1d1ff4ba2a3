"""Cost of the always-on profiling hooks: throughput with the Recorder enabled vs disabled.

Runs a Prefetcher pipeline (read span + transform span + collate span per batch, queue
and consumer hooks) whose batches take ``--batch-ms`` of GIL-releasing work, with the
recorder on and off in alternating rounds, and reports the throughput difference (noisy
on a small shared machine). Also times one span, one ``add_since`` and the
torch-profiler check on their own, and, the steadier figure, the process CPU time per
sample of an inline ``Loader`` epoch with ``profile=True`` vs ``False`` (tiny records
and JPEGs), and of ``fastfeed.DataLoader(num_workers=0)`` and ``(num_workers=2)`` over
the same 3 KB records (the way most users meet the profiler: it is on by default), with
samples per second beside; median of alternating rounds and the least-disturbed round.

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

from fastfeed.pipeline.prefetch import Prefetcher
from fastfeed.profiling.clocks import _torch_profiler_active
from fastfeed.profiling.recorder import Recorder


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


def _frombuffer(records: list[bytes]) -> np.ndarray:
    """3 KB records as one (n, 3072) uint8 batch: the tiny-record batch transform."""
    return np.frombuffer(b"".join(records), dtype=np.uint8).reshape(len(records), -1)


def _inline_loader(source, profile: bool, batch: int, transform=None, batch_transform=None):
    """A shuffled Loader that runs its batches in the calling thread (no read-ahead)."""
    from fastfeed.loader import Loader

    return Loader(
        source,
        transform=transform,
        batch_transform=batch_transform,
        batch_size=batch,
        shuffle=True,
        num_threads=0,
        profile=profile,
        read_ahead=False,
    )


def _loader_cpu_per_sample(profile: bool, source, transform, batch_transform, batch: int) -> float:
    """Process CPU seconds per sample of one inline Loader epoch (no thread scheduling noise)."""
    loader = _inline_loader(source, profile, batch, transform, batch_transform)
    c0 = time.process_time()
    n = sum(len(b.indices) for b in loader)
    cpu = time.process_time() - c0
    loader.close()
    return cpu / n


def _loader_overhead(rounds: int) -> list[dict[str, float | str]]:
    """CPU cost of the Loader's hooks, as a fraction of the CPU per sample, median of rounds."""
    import io

    import _common
    from PIL import Image

    from fastfeed.image import Compose, RandomHorizontalFlip, RandomResizedCrop

    rng = np.random.default_rng(0)
    tiny = _common.RamSource(
        [rng.bytes(3072) for _ in range(50_000)], [i % 10 for i in range(50_000)]
    )

    jpegs = []
    for _ in range(256):
        img = rng.integers(0, 255, size=(375, 500, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    cases = [
        ("tiny 3 KB records, batch 256", tiny, None, _frombuffer, 256),
        (
            "JPEG 500x375 RRC 224 + flip, batch 64",
            _common.RamSource(jpegs, [i % 10 for i in range(len(jpegs))]),
            Compose([RandomResizedCrop(224), RandomHorizontalFlip()]),
            None,
            64,
        ),
    ]
    out = []
    for name, src, tf, btf, batch in cases:
        on, off = [], []
        for _ in range(rounds):
            off.append(_loader_cpu_per_sample(False, src, tf, btf, batch))
            on.append(_loader_cpu_per_sample(True, src, tf, btf, batch))
        med_on, med_off = statistics.median(on), statistics.median(off)
        out.append(
            {
                "case": name,
                "cpu_us_per_sample_off": med_off * 1e6,
                "cpu_us_per_sample_on": med_on * 1e6,
                "overhead": med_on / med_off - 1.0,
                # The least-disturbed round of each: steadier on a shared machine.
                "overhead_min": min(on) / min(off) - 1.0,
            }
        )
    return out


def _dataloader_round(profile: bool, dataset, workers: int, batch: int) -> tuple[float, float, str]:
    """(process CPU s per sample, samples per s, worker type) of one DataLoader epoch."""
    from fastfeed import DataLoader

    loader = DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=workers, profile=profile
    )
    c0, t0 = time.process_time(), time.perf_counter()
    n = sum(len(y) for _, y in loader)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    kind = loader.worker_type
    loader.close()
    return cpu / n, n / wall, kind


def _dataloader_overhead(rounds: int, samples: int = 50_000) -> list[dict[str, float | str]]:
    """profile=True vs False of fastfeed.DataLoader on 3 KB records, alternating rounds."""
    import _common

    rng = np.random.default_rng(0)
    tiny = _common.RamArrays(
        [rng.bytes(3072) for _ in range(samples)], [i % 10 for i in range(samples)]
    )
    out = []
    for workers in (0, 2):
        runs: dict[bool, list[tuple[float, float, str]]] = {False: [], True: []}
        _dataloader_round(True, tiny, workers, 256)  # warm-up (threads, imports)
        for _ in range(rounds):
            for profile in (False, True):
                runs[profile].append(_dataloader_round(profile, tiny, workers, 256))
        cpu = {p: [r[0] for r in runs[p]] for p in runs}
        rate = {p: [r[1] for r in runs[p]] for p in runs}
        out.append(
            {
                "case": f"DataLoader(num_workers={workers}), 3 KB records, batch 256",
                "worker_type": runs[True][0][2],
                "cpu_us_per_sample_off": statistics.median(cpu[False]) * 1e6,
                "cpu_us_per_sample_on": statistics.median(cpu[True]) * 1e6,
                "overhead": statistics.median(cpu[True]) / statistics.median(cpu[False]) - 1.0,
                "overhead_min": min(cpu[True]) / min(cpu[False]) - 1.0,
                "samples_per_s_off": statistics.median(rate[False]),
                "samples_per_s_on": statistics.median(rate[True]),
                "rate_loss": 1.0 - statistics.median(rate[True]) / statistics.median(rate[False]),
            }
        )
    return out


def _per_batch_us(loader, epochs: int) -> float:
    """Wall microseconds per batch over ``epochs`` epochs of a built loader (GC off)."""
    import gc

    gc.collect()
    gc.disable()
    try:
        t0, n = time.perf_counter(), 0
        for _ in range(epochs):
            for _batch in loader:
                n += 1
        return (time.perf_counter() - t0) / n * 1e6
    finally:
        gc.enable()


def _hook_cost(rounds: int, samples: int = 20_000) -> list[dict[str, float | str]]:
    """The hooks' cost per batch, measured where nothing else varies, over a batch's time.

    The per-epoch comparisons above move by several per cent from round to round (GC,
    allocator, the other core), more than the hooks cost. Here each loader is built once,
    profile on and off, at batch size 1 over the same 3 KB records: a batch's fixed costs
    (the hooks among them) dominate, and the paired on-minus-off difference of
    alternating epochs, in microseconds per batch, is the hooks' cost. Divided by the
    wall time of a batch of 256 (the same loader, profile off), it is the overhead on
    3 KB records at batch 256.
    """
    import _common

    from fastfeed import DataLoader
    from fastfeed.profiling import gil

    rng = np.random.default_rng(0)
    payloads = [rng.bytes(3072) for _ in range(samples)]
    tiny = _common.RamArrays(payloads, [i % 10 for i in range(samples)])
    source = _common.RamSource(payloads, [i % 10 for i in range(samples)])

    def build(kind: str, batch: int, profile: bool):
        if kind == "Loader":
            return _inline_loader(source, profile, batch, batch_transform=_frombuffer)
        workers = 2 if kind.endswith("2)") else 0
        return DataLoader(
            tiny, batch_size=batch, shuffle=True, num_workers=workers, profile=profile
        )

    out = []
    for kind in ("Loader", "DataLoader(num_workers=0)", "DataLoader(num_workers=2)"):
        loaders = {p: build(kind, 1, p) for p in (False, True)}
        big = build(kind, 256, False)
        for loader in (*loaders.values(), big):
            _per_batch_us(loader, 1)  # warm-up: threads, ring slots, page faults
        diffs, big_us, probe_ms = [], [], []
        for r in range(rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            got = {}
            for p in order:
                thread = gil._STATE.thread
                c0 = _thread_cpu_s(thread) if p else None
                t0 = time.perf_counter()
                got[p] = _per_batch_us(loaders[p], 1)
                if c0 is not None and thread is gil._STATE.thread:
                    probe_ms.append(1e3 * (_thread_cpu_s(thread) - c0) / (time.perf_counter() - t0))
            diffs.append(got[True] - got[False])
            big_us.append(_per_batch_us(big, 1))
        for loader in (*loaders.values(), big):
            loader.close()
        cost, batch_us = statistics.median(diffs), statistics.median(big_us)
        q1, _, q3 = statistics.quantiles(diffs, n=4)
        out.append(
            {
                "case": kind,
                "hook_us_per_batch": cost,
                "hook_us_quartiles": [q1, q3],
                "batch256_us": batch_us,
                "overhead_at_256": cost / batch_us,
                "probe_cpu_ms_per_s": statistics.median(probe_ms) if probe_ms else None,
            }
        )
    return out


def _probe_cost(rounds: int, seconds: float = 1.0, *, steady: bool) -> dict[str, float]:
    """What the GIL probe thread costs a pure-Python loop beside it, paired rounds.

    Each round runs the loop for ``seconds`` with the probe running and without it (in
    alternating order); reported: the median slowdown and its quartiles, and the probe
    thread's CPU per second of running. ``steady``: time the loop only once the probe
    has made its first ``gil.WARM_WAKEUPS`` wake-ups (it then wakes less often), else
    from the probe's start.
    """
    from fastfeed.profiling import gil
    from fastfeed.profiling.clocks import _run_delay_s

    def loop(duration_s: float) -> float:
        t0, n = time.perf_counter(), 0
        while True:
            for _ in range(2000):
                n += 1
            now = time.perf_counter()
            gil.touch(now)  # recording activity: keeps a running probe alive
            if now - t0 > duration_s:
                return n / (now - t0)

    slow, cpu = [], []
    for r in range(rounds):
        rate = {}
        for on in (False, True) if r % 2 == 0 else (True, False):
            if on:
                gil.ensure_running(_run_delay_s)
                time.sleep(0.05)
                if steady:
                    loop(gil.WARM_WAKEUPS * gil.INTERVAL_S + 0.2)
                thread = gil._STATE.thread
                c0, t0 = _thread_cpu_s(thread), time.perf_counter()
                rate[on] = loop(seconds)
                cpu.append(1e3 * (_thread_cpu_s(thread) - c0) / (time.perf_counter() - t0))
            else:
                gil._STATE.last_activity = -1e9  # the probe exits at its next wake-up
                deadline = time.monotonic() + 2
                while gil.running() and time.monotonic() < deadline:
                    time.sleep(0.02)
                rate[on] = loop(seconds)
        slow.append(1.0 - rate[True] / rate[False])
    q1, med, q3 = statistics.quantiles(slow, n=4)
    return {
        "slowdown": med,
        "slowdown_q1": q1,
        "slowdown_q3": q3,
        "cpu_ms_per_s": statistics.median(cpu),
    }


def _thread_cpu_s(thread) -> float:
    """CPU seconds a thread of this process has run (its schedstat); 0 when unknown."""
    try:
        with open(f"/proc/self/task/{thread.native_id}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (AttributeError, OSError, ValueError):
        return 0.0


def _cpu_overhead(r: dict) -> str:
    """'off / on (us), overhead (min of rounds)' of a CPU-per-sample row."""
    return (
        f"{r['cpu_us_per_sample_off']:.2f} / {r['cpu_us_per_sample_on']:.2f}, "
        f"{100 * r['overhead']:+.2f}% (min of rounds {100 * r['overhead_min']:+.2f}%)"
    )


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
    loader_rows = _loader_overhead(args.rounds)
    for r in loader_rows:
        rows.append(
            (
                f"Loader CPU per sample, {r['case']}: off / on (us), overhead",
                _cpu_overhead(r),
            )
        )
    dl_rows = _dataloader_overhead(args.rounds)
    for r in dl_rows:
        rows.append(
            (
                f"{r['case']} ({r['worker_type']}): CPU per sample off / on (us), overhead",
                _cpu_overhead(r),
            )
        )
        rows.append(
            (
                f"{r['case']}: samples/s off / on",
                f"{r['samples_per_s_off']:,.0f} / {r['samples_per_s_on']:,.0f} "
                f"({100 * r['rate_loss']:+.2f}% slower)",
            )
        )
    hook_rows = _hook_cost(max(args.rounds, 9))
    for r in hook_rows:
        q1, q3 = r["hook_us_quartiles"]
        rows.append(
            (
                f"{r['case']}, 3 KB records: hooks per batch (us, quartiles) / batch of 256 (us)",
                f"{r['hook_us_per_batch']:.2f} ({q1:.2f}..{q3:.2f}) / {r['batch256_us']:.0f}"
                f" = {100 * r['overhead_at_256']:.2f}%",
            )
        )
        if r["probe_cpu_ms_per_s"] is not None:
            rows.append(
                (f"{r['case']}: GIL probe thread CPU (ms per s)", f"{r['probe_cpu_ms_per_s']:.1f}")
            )
    probe = {
        phase: _probe_cost(max(args.rounds, 9), steady=phase == "steady")
        for phase in ("start", "steady")
    }
    for phase, p in probe.items():
        rows.append(
            (
                f"GIL probe beside a pure-Python loop, {phase}: slowdown (quartiles), probe CPU",
                f"{100 * p['slowdown']:+.2f}% ({100 * p['slowdown_q1']:+.2f}.."
                f"{100 * p['slowdown_q3']:+.2f}), {p['cpu_ms_per_s']:.1f} ms/s",
            )
        )
    width = max(len(r[0]) for r in rows)
    print(
        f"profiling overhead: {args.batches} batches x {args.rounds} rounds, "
        f"~{args.batch_ms} ms work per batch, {args.threads} threads"
    )
    for k, v in rows:
        print(f"  {k:<{width}}  {v:>20}")
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
        "loader_cpu_overhead": loader_rows,
        "dataloader_overhead": dl_rows,
        "hook_cost": hook_rows,
        "gil_probe": probe,
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
