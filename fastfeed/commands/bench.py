"""``fastfeed bench PATH``: loader throughput on your data against torch's DataLoader.

Both loaders get the same records (a fixed random subset of ``--samples`` of them, in the
same order), the same transform (fastfeed's fused ``RandomResizedCrop`` + flip, to uint8
CHW) and the same batch size; fastfeed runs ``--threads`` worker threads, torch
``num_workers=--threads`` worker processes. The records are read once before either
run so both read from the page cache: the comparison is of the loaders, not of a cold
disk. ``--cold`` instead drops the records from the page cache before each loader's run
(``posix_fadvise(DONTNEED)``, no root needed): the comparison on your disk, with its
reads/s and bytes per read (``/proc/diskstats``, machine-wide). Reported per loader:
samples/s, MB/s of record bytes, the ratio to torch, the peak resident memory of the
process tree (workers included) and the time to the first batch (worker start-up
included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from fastfeed.commands import check_output_file

HELP = "loader throughput on your data against torch's DataLoader"

_MB = 1e6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``bench``'s arguments to ``parser``."""
    parser.add_argument("path", help="ImageFolder root, file list or LMDB")
    parser.add_argument(
        "--vs", choices=("torch", "none"), default="torch", help="baseline (default torch)"
    )
    parser.add_argument("--batch-size", type=int, default=64, metavar="B")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="T",
        help="fastfeed threads = torch num_workers (default: CPUs)",
    )
    parser.add_argument(
        "--samples", type=int, default=1024, metavar="N", help="records per loader (default 1024)"
    )
    parser.add_argument(
        "--size", type=int, default=224, metavar="S", help="RandomResizedCrop size (default 224)"
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="drop the records from the page cache before each loader's run (your disk's "
        "figures, not the page cache's)",
    )
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


class _TorchDataset:
    """Map-style dataset for torch's DataLoader: (transform(record bytes), label)."""

    def __init__(self, source: Any, transform: Callable[[Any], Any]) -> None:
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        rec = self.source.read(index)
        return self.transform(rec.data), -1 if rec.label is None else rec.label


def _measure(
    name: str, batches: Iterable[Any], total: int, nbytes: int, progress: bool
) -> dict[str, Any]:
    """Iterate ``batches`` to the end; samples/s, MB/s, peak RSS and first-batch time."""
    from fastfeed._diskstats import disk_snapshot, storage_delta
    from fastfeed._peakmem import PeakRSS
    from fastfeed._progress import progress_bar

    samples = 0
    first_s = None
    disk0 = disk_snapshot()
    with (
        PeakRSS(interval_s=0.02) as rss,
        progress_bar(total=total, unit="img", desc=name, enabled=progress) as bar,
    ):
        t0 = time.perf_counter()
        it = iter(batches)
        for data, _labels in it:
            if first_s is None:
                first_s = time.perf_counter() - t0
            samples += int(data.shape[0])
            bar.update(int(data.shape[0]))
        seconds = time.perf_counter() - t0
        disk = storage_delta(disk0, disk_snapshot())
        close = getattr(it, "close", None)
        if close is not None:
            close()
    return {
        "disk": disk,
        "loader": name,
        "samples": samples,
        "seconds": seconds,
        "samples_per_s": samples / seconds if seconds > 0 else 0.0,
        "mb_per_s": nbytes / _MB / seconds if seconds > 0 else 0.0,
        "peak_rss_bytes": rss.peak_bytes,
        "first_batch_s": first_s if first_s is not None else float("nan"),
    }


def bench(
    path: str,
    *,
    vs: str = "torch",
    batch_size: int = 64,
    threads: int | None = None,
    samples: int = 1024,
    size: int = 224,
    progress: bool = True,
    cold: bool = False,
) -> dict[str, Any]:
    """Run the benchmark (what ``fastfeed bench`` prints); returns a JSON-ready dict.

    Args:
        cold: Drop the records from the page cache before each loader's run (else both
            read from the page cache, warmed once first).

    Raises:
        ConfigError: A count below 1.
        SourceNotFoundError, CorruptSourceError, EmptySourceError: ``path`` is unusable.
        SampleError: A record failed to decode (names the index and path/key).
    """
    import numpy as np
    import torch
    from torch.utils.data import DataLoader as TorchDataLoader

    from fastfeed import ConfigError, Loader, image
    from fastfeed.commands import drop_cached, storage_files
    from fastfeed.pipeline.assemble import default_threads
    from fastfeed.sources import open_source
    from fastfeed.sources.subset import Subset

    for name, value in (("batch-size", batch_size), ("samples", samples), ("size", size)):
        if value < 1:
            raise ConfigError(f"--{name} must be >= 1, got {value}")
    threads = default_threads() if threads is None else threads
    if threads < 0:
        raise ConfigError(f"--threads must be >= 0, got {threads}")
    source = open_source(path)
    try:
        n = min(samples, len(source))
        order = np.random.default_rng(0).permutation(len(source))[:n].tolist()
        subset = Subset(source, order)
        t0 = time.perf_counter()
        nbytes = sum(len(r.data) for r in subset.read_many(range(n)))  # warm the page cache
        warm_s = time.perf_counter() - t0
        transform = image.Compose([image.RandomResizedCrop(size), image.RandomHorizontalFlip()])

        files = storage_files(source, order) if cold else []
        if cold and not files:
            raise ConfigError(f"--cold: the records of {path} are not in files fastfeed can name")

        def prepare() -> float | None:
            """Drop the records from the page cache (--cold); what stayed, 0..1."""
            return drop_cached(files, source).fraction if cold else None

        rows = []
        loader = Loader(subset, transform=transform, batch_size=batch_size, num_threads=threads)
        try:
            left = prepare()
            rows.append({**_measure("fastfeed", loader, n, nbytes, progress), "cached": left})
        finally:
            loader.close()
        if vs == "torch":
            torch_loader: TorchDataLoader[Any] = TorchDataLoader(
                _TorchDataset(subset, transform),  # type: ignore[arg-type]
                batch_size=batch_size,
                num_workers=threads,
            )
            left = prepare()
            rows.append({**_measure("torch", torch_loader, n, nbytes, progress), "cached": left})
            base = rows[-1]["samples_per_s"]
            for r in rows:
                r["ratio"] = r["samples_per_s"] / base if base > 0 else float("nan")
        return {
            "path": os.path.abspath(path),
            "source": type(source).__name__,
            "records": len(source),
            "samples": n,
            "record_bytes": nbytes,
            "warm_read_s": warm_s,
            "cold": cold,
            "batch_size": batch_size,
            "threads": threads,
            "size": size,
            "results": rows,
            "environment": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
            },
        }
    finally:
        source.close()


def format_table(result: dict[str, Any]) -> str:
    """The results as a text table (one row per loader)."""
    head = (
        f"{'loader':<9} {'samples':>7} {'samples/s':>10} {'MB/s':>8} {'ratio':>6} "
        f"{'peak RSS':>10} {'1st batch':>10}"
    )
    from fastfeed._size import format_size

    cold = bool(result.get("cold"))
    if cold:
        head += f" {'disk reads/s':>12} {'KB/read':>8}"
    lines = [head, "-" * len(head)]
    for r in result["results"]:
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
        line = (
            f"{r['loader']:<9} {r['samples']:>7} {r['samples_per_s']:>10,.0f} "
            f"{r['mb_per_s']:>8.1f} {ratio:>6} {format_size(r['peak_rss_bytes']):>10} "
            f"{r['first_batch_s'] * 1e3:>7.0f} ms"
        )
        if cold:
            d = r.get("disk")
            line += (
                f" {d['reads_per_s']:>12,.0f} {d['bytes_per_read'] / 1e3:>8,.0f}"
                if d
                else f" {'-':>12} {'-':>8}"
            )
        lines.append(line)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Benchmark ``args.path``, print the table (and write JSON); return the exit code."""
    check_output_file(args.json, "--json")
    from fastfeed._size import format_size

    result = bench(
        args.path,
        vs=args.vs,
        batch_size=args.batch_size,
        threads=args.threads,
        samples=args.samples,
        size=args.size,
        progress=not args.quiet,
        cold=args.cold,
    )
    cache = (
        "page cache dropped before each loader"
        if result["cold"]
        else "read once first: page cache warm"
    )
    print(
        f"{result['path']} ({result['source']}): {result['samples']} of {result['records']} "
        f"records, {format_size(result['record_bytes'])} ({cache}), "
        f"RandomResizedCrop({result['size']}) + flip -> uint8, batch {result['batch_size']}, "
        f"{result['threads']} threads (fastfeed) / num_workers={result['threads']} (torch)"
    )
    print(format_table(result))
    sys.stdout.flush()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0
