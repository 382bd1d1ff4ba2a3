"""``fastfeed profile``: measure which stage (IO, CPU, copy, model) bounds a pipeline.

Runs differential phases on a random subset of PATH (an LMDB, an ImageFolder, or a
text file listing paths), no root needed:

1. raw read, cold: the subset's files are evicted from the page cache first
   (``posix_fadvise(DONTNEED)``; ``mincore`` says how much really left);
2. raw read, warm: the same reads again, now from the page cache;
3. read + transform on one thread: the decode/augment cost per batch;
4. the full loader with ``--threads`` threads, consuming as fast as it can;
5. the full loader with a model step: ``--step-ms`` of sleep, or ``--script``.

Phases 4-5 read from the page cache (phases 1-2 filled it) unless ``--cold`` drops the
subset's pages before each: then the verdict describes the disk, and names an IOPS-bound
one (reads/s at the cgroup's quota, or a disk busy with small reads) with the advice to
pack and read in runs (``shuffle="block"``). Phase 1 always reports the disk's reads/s,
MB/s and bytes per read, from ``/proc/diskstats``.

From these it derives the fetch stall vs the prep stall per batch, the threads needed,
and the predicted throughput with 0-100% of the dataset cached in RAM, then prints a
table, the verdict and the next actions.

``--script train.py`` contract: the file defines ``step(batch)``, called once per
batch with what the loader yields (``(data, labels)``); it may define ``setup()``,
called once before the first batch. Nothing else is imported from it.

Exit codes: 0, 1 on errors, 3 when ``--assert-not`` matches the verdict.
"""

from __future__ import annotations

import argparse
import math
import random
import runpy
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastfeed.commands import check_input_file, check_output_file, drop_cached, storage_files
from fastfeed.errors import ConfigError

if TYPE_CHECKING:
    from fastfeed import LoaderStats
    from fastfeed.sources import Source

HELP = "measure which stage (IO, CPU, copy, model) bounds a pipeline"
EXIT_ASSERT = 3


def _assertable() -> list[str]:
    """The verdict names ``--assert-not`` accepts."""
    from fastfeed.stats import Bottleneck, Bound

    return [b.value for b in Bound if b is not Bound.UNKNOWN] + [
        b.value for b in Bottleneck if b is not Bottleneck.NONE
    ]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Declare the ``profile`` options."""
    p.add_argument("path", metavar="PATH", help="an LMDB, an ImageFolder root, or a file list")
    p.add_argument("--batch-size", type=int, default=64, help="samples per batch (default 64)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="loader worker threads (default: the CPUs available, at most 16)",
    )
    p.add_argument(
        "--transform",
        choices=["rrc224", "decode", "none"],
        default="rrc224",
        help="rrc224: RandomResizedCrop(224)+flip (default); decode: full decode only; "
        "none: raw bytes",
    )
    step = p.add_mutually_exclusive_group()
    step.add_argument("--step-ms", type=float, default=None, help="simulated model step, ms")
    step.add_argument(
        "--script",
        default=None,
        help="a Python file defining step(batch) (and optionally setup()) run per batch",
    )
    p.add_argument(
        "--samples", type=int, default=1024, help="samples in the measured subset (default 1024)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the subset choice")
    p.add_argument("--trace", default=None, help="write a Chrome trace JSON here")
    p.add_argument("--plot", default=None, help="write a PNG summary here (needs matplotlib)")
    p.add_argument("--json", default=None, help="write all figures as JSON here")
    p.add_argument(
        "--assert-not",
        action="append",
        default=[],
        metavar="VERDICT",
        help=f"exit {EXIT_ASSERT} when the verdict matches: {', '.join(_assertable())} "
        "(repeatable)",
    )
    p.add_argument(
        "--no-evict", action="store_true", help="skip the page-cache eviction (cold read)"
    )
    p.add_argument(
        "--cold",
        action="store_true",
        help="also run the full loader (phases 4-5) with the subset dropped from the page "
        "cache first, so the verdict sees the disk (IOPS- or bandwidth-bound)",
    )


def _progress(msg: str) -> None:
    print(f"[fastfeed profile] {msg}", file=sys.stderr, flush=True)


def make_transform(name: str) -> Callable[..., Any] | None:
    """The ``--transform`` choices as loader transforms."""
    if name == "none":
        return None
    if name == "rrc224":
        from fastfeed.image import Compose, RandomHorizontalFlip, RandomResizedCrop

        return Compose([RandomResizedCrop(224), RandomHorizontalFlip()])
    if name == "decode":
        return _decode_only
    raise ConfigError(f"unknown transform {name!r}: choose rrc224, decode or none")


def _decode_only(data: Any) -> Any:
    """Decode fully and keep only the size: measures decode cost, collates to (B, 2)."""
    import torch

    from fastfeed.image import decode_image

    img = decode_image(data)
    return torch.tensor(img.size)


def _load_step(args: argparse.Namespace) -> tuple[Callable[[Any], None] | None, str]:
    if args.script:
        ns = runpy.run_path(args.script, run_name="__fastfeed_profile__")
        step = ns.get("step")
        if not callable(step):
            raise ConfigError(f"--script {args.script} must define a function step(batch)")
        setup = ns.get("setup")
        if callable(setup):
            setup()
        return step, f"script {args.script}"
    if args.step_ms is not None:
        if args.step_ms < 0:
            raise ConfigError(f"--step-ms must be >= 0, got {args.step_ms}")
        delay = args.step_ms / 1e3
        return (lambda batch: time.sleep(delay)), f"{args.step_ms:g} ms sleep"
    return None, "none"


def _timed_reads(
    source: Source, batches: list[list[int]]
) -> tuple[float, int, Any, dict[str, Any] | None]:
    """Seconds, record bytes, ``/proc/self/io`` delta and the disk's figures of the reads."""
    from fastfeed._diskstats import disk_snapshot, storage_delta
    from fastfeed._procio import read_proc_io

    io0, disk0 = read_proc_io(), disk_snapshot()
    t0 = time.perf_counter()
    nbytes = 0
    for b in batches:
        nbytes += sum(len(r.data) for r in source.read_many(b))
    dt = time.perf_counter() - t0
    io1, disk1 = read_proc_io(), disk_snapshot()
    io = (io1 - io0) if io0 is not None and io1 is not None else None
    return dt, nbytes, io, storage_delta(disk0, disk1)


def _run_loader(
    source: Source,
    transform: Callable[..., Any] | None,
    args: argparse.Namespace,
    threads: int,
    step: Callable[[Any], None] | None,
) -> tuple[LoaderStats, float]:
    from fastfeed import Loader, LoaderStats

    loader = Loader(
        source,
        transform=transform,
        batch_size=args.batch_size,
        shuffle=False,
        num_threads=threads,
        drop_last=False,
    )
    try:
        t0 = time.perf_counter()
        for batch in loader:
            if step is not None:
                step(batch)
        wall = time.perf_counter() - t0
        skipped = [getattr(s, "index", s) for s in loader.skipped]
        if step is None:
            # No model: the loop only takes batches, so its "steps" say nothing about a
            # model. Analyze the loader alone (every batch counted, no step figures).
            rec = loader.recorder
            snap = rec.snapshot()
            snap.update(
                first_batches=snap["steps"] + snap["first_batches"],
                steps=0,
                step_s=0.0,
                step_wait_s=0.0,
            )
            events, counters = rec.timeline()
            stats = LoaderStats.from_snapshot(
                snap,
                batch_size=args.batch_size,
                source=source,
                num_threads=threads,
                skipped=skipped,
                events=events,
            )
            stats._events, stats._counters, stats._t0 = events, counters, rec.started_at
        else:
            stats = LoaderStats.collect(
                loader.recorder,
                batch_size=args.batch_size,
                source=source,
                num_threads=threads,
                skipped=skipped,
                gather=False,
            )
    finally:
        loader.close()
    return stats, wall


def run(args: argparse.Namespace) -> int:
    """Run the phases, print the table and verdict, write the requested files."""
    import importlib.util

    from fastfeed.pipeline.assemble import default_threads
    from fastfeed.sources import open_source

    assertable = _assertable()
    for name in args.assert_not:
        if name.strip().lower() not in assertable:
            raise ConfigError(f"--assert-not {name!r}: choose from {', '.join(assertable)}")
    # Every file the run will write or read is checked before the (long) run starts.
    for option in ("json", "trace", "plot"):
        check_output_file(getattr(args, option), f"--{option}")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("--plot needs matplotlib: pip install matplotlib")
    check_input_file(args.script, "--script")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {args.samples}")
    threads = args.threads if args.threads is not None else default_threads()
    if threads < 0:
        raise ConfigError(f"--threads must be >= 0, got {threads}")
    step, step_desc = _load_step(args)
    transform = make_transform(args.transform)

    base = open_source(args.path)
    try:
        stats, phases = _measure(args, base, threads, step, step_desc, transform)
    finally:
        base.close()  # stops a FileSource's read pool
    _print_report(stats, phases)
    if args.json:
        stats.save_json(args.json)
        _progress(f"wrote {args.json}")
    if args.trace:
        stats.save_trace(args.trace)
        _progress(f"wrote {args.trace} (open in https://ui.perfetto.dev or chrome://tracing)")
    if args.plot:
        stats.plot(args.plot)
        _progress(f"wrote {args.plot}")
    for name in args.assert_not:
        if stats.verdict.matches(name):
            print(
                f"fastfeed profile: assertion failed: verdict is {name}: {stats.verdict.sentence}",
                file=sys.stderr,
            )
            return EXIT_ASSERT
    return 0


def _measure(
    args: argparse.Namespace,
    base: Source,
    threads: int,
    step: Callable[[Any], None] | None,
    step_desc: str,
    transform: Callable[..., Any] | None,
) -> tuple[LoaderStats, dict[str, Any]]:
    """Run the five phases on a subset of ``base``; return the stats and phase figures."""
    n = min(args.samples, len(base))
    chosen = sorted(random.Random(args.seed).sample(range(len(base)), n))
    order = chosen[:]
    random.Random(args.seed + 1).shuffle(order)  # random access, as in training
    from fastfeed.sources.subset import Subset
    from fastfeed.stats import cache_whatif
    from fastfeed.stats.storage import storage_summary

    sub = Subset(base, order)
    bs = args.batch_size
    batches = [list(range(i, min(i + bs, n))) for i in range(0, n, bs)]
    nb = len(batches)
    _progress(f"{args.path}: {len(base):,} records; profiling {n} in {nb} batches of {bs}")

    # 1. cold raw read
    files = storage_files(base, chosen)
    evicted = None
    if files and not args.no_evict:
        evicted = drop_cached(files, base)
        _progress(
            f"phase 1/5 raw read, cold: evicted, {100 * evicted.fraction:.0f}% of "
            f"{evicted.total_bytes / 1e6:.1f} MB still in the page cache"
        )
    else:
        _progress("phase 1/5 raw read, cold: no files to evict (reading as is)")
    cold_s, nbytes, cold_io, cold_disk = _timed_reads(sub, batches)
    # 2. warm raw read
    _progress(f"phase 2/5 raw read, warm ({cold_s:.2f} s cold, {nbytes / 1e6 / cold_s:.0f} MB/s)")
    warm_s, _, _, _ = _timed_reads(sub, batches)
    # 3. read + transform on one thread
    _progress(
        f"phase 3/5 read + {args.transform} on one thread ({nbytes / 1e6 / warm_s:.0f} MB/s warm)"
    )
    prep_s, prep_cpu = _one_thread_prep(sub, batches, transform)
    # 4. full loader, no model
    cold = " (page cache dropped first)" if args.cold and files else ""
    _progress(f"phase 4/5 full loader, {threads} threads, no model step{cold}")
    if cold:
        drop_cached(files, base)
    alone, alone_wall = _run_loader(sub, transform, args, threads, None)
    # 5. with a model step
    if step is not None:
        _progress(f"phase 5/5 full loader with model step ({step_desc}){cold}")
        if cold:
            drop_cached(files, base)
        stats, _ = _run_loader(sub, transform, args, threads, step)
    else:
        _progress("phase 5/5 skipped: no --step-ms or --script (the verdict is the loader alone)")
        stats = alone

    fetch_cold, fetch_warm, prep = cold_s / nb, warm_s / nb, prep_s / nb
    compute = stats.compute_per_step_s if step is not None else 0.0
    t = max(1, threads)
    stall_cold = max(0.0, (fetch_cold + prep) / t - compute)
    stall_warm = max(0.0, (fetch_warm + prep) / t - compute)
    phases: dict[str, Any] = {
        "records": len(base),
        "samples": n,
        "batch_size": bs,
        "threads": threads,
        "step": step_desc,
        "transform": args.transform,
        "bytes": nbytes,
        "evicted_resident_fraction": evicted.fraction if evicted else None,
        "read_cold_s_per_batch": fetch_cold,
        "read_cold_mb_per_s": nbytes / 1e6 / cold_s if cold_s > 0 else None,
        "read_cold_storage_bytes": cold_io.read_bytes if cold_io else None,
        "read_cold_disk": cold_disk,
        "loader_cold": bool(cold),
        "read_warm_s_per_batch": fetch_warm,
        "read_warm_mb_per_s": nbytes / 1e6 / warm_s if warm_s > 0 else None,
        "prep_s_per_batch": prep,
        "prep_cpu_per_wall": prep_cpu,
        "loader_alone_samples_per_s": n / alone_wall if alone_wall > 0 else None,
        "compute_s_per_step": compute,
        "fetch_stall_s_per_batch": max(0.0, stall_cold - stall_warm),
        "prep_stall_s_per_batch": stall_warm,
        "threads_needed_cold": math.ceil((fetch_cold + prep) / compute) if compute else None,
        "threads_needed_warm": math.ceil((fetch_warm + prep) / compute) if compute else None,
    }
    stats.extra["phases"] = phases
    disk = storage_summary(cold_disk)
    bound = disk is not None and (disk.iops_bound or disk.bandwidth_bound)
    stats.whatif = cache_whatif(
        disk_s=fetch_cold if bound else None,
        read_storage_s=fetch_cold,
        read_memory_s=fetch_warm,
        other_s=prep,
        threads=threads,
        batch_size=bs,
        compute_s=compute,
        fractions=[i / 10 for i in range(11)],
    )
    return stats, phases


def _one_thread_prep(
    source: Source, batches: list[list[int]], transform: Callable[..., Any] | None
) -> tuple[float, float]:
    """Transform time over all batches on this thread (reads excluded), and its CPU/wall."""
    if transform is None:
        return 0.0, 1.0
    from fastfeed.rng import set_sample_key

    total = cpu = 0.0
    for b in batches:
        recs = source.read_many(b)
        t0, c0 = time.perf_counter(), time.thread_time()
        for i, r in zip(b, recs, strict=True):
            set_sample_key((0, 0, i))
            transform(r.data)
        total += time.perf_counter() - t0
        cpu += time.thread_time() - c0
    return total, cpu / total if total > 0 else 1.0


def _print_report(stats: LoaderStats, ph: dict[str, Any]) -> None:
    from fastfeed.stats.storage import storage_summary

    ms = 1e3
    print(stats.table())
    print()
    cold, warm = ph["read_cold_s_per_batch"] * ms, ph["read_warm_s_per_batch"] * ms
    print(
        f"per batch of {ph['batch_size']}: read {cold:.1f} ms cold / {warm:.1f} ms warm, "
        f"prep {ph['prep_s_per_batch'] * ms:.1f} ms (one thread, CPU/wall "
        f"{ph['prep_cpu_per_wall']:.2f}); model {ph['compute_s_per_step'] * ms:.1f} ms"
    )
    needed = (
        f"; threads needed: {ph['threads_needed_cold']} cold, {ph['threads_needed_warm']} warm"
        if ph["threads_needed_cold"]
        else ""
    )
    print(
        f"stall per batch with {ph['threads']} threads: fetch "
        f"{ph['fetch_stall_s_per_batch'] * ms:.1f} ms, "
        f"prep {ph['prep_stall_s_per_batch'] * ms:.1f} ms{needed}"
    )
    if ph["read_cold_storage_bytes"] is not None:
        print(
            f"cold read: {ph['read_cold_storage_bytes'] / 1e6:.1f} MB fetched from storage for "
            f"{ph['bytes'] / 1e6:.1f} MB requested"
        )
    disk = storage_summary(ph.get("read_cold_disk"))
    if disk is not None:
        print(f"cold read: {disk.line()} ({disk.reason})")
    if ph.get("loader_cold"):
        print("phases 4-5 read cold (page cache dropped first): the verdict is for this disk")
    curve = ", ".join(f"{100 * f:.0f}% -> {r:,.0f}/s" for f, r in stats.whatif[::2])
    print(f"RAM cache what-if (samples/s): {curve}")
