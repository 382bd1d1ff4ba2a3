"""``fastfeed demo``: the whole pipeline on generated data, printing what each stage did.

generate JPEGs → read them back as files → pack into one LMDB → read the LMDB → cache it
in RAM → ``Loader`` with the fused image transform → a tiny model's training steps →
``LoaderStats`` table and summary. Needs no data of yours and finishes in seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from fastfeed.commands import check_output_dir

HELP = "run the whole pipeline on generated data and print what it did"

_MB = 1e6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``demo``'s arguments to ``parser``."""
    parser.add_argument(
        "--out", metavar="DIR", help="keep the generated data in DIR (default: a temp dir)"
    )
    parser.add_argument("--images", type=int, default=320, metavar="N", help="JPEGs (default 320)")
    parser.add_argument("--classes", type=int, default=4, metavar="K", help="classes (default 4)")
    parser.add_argument(
        "--epochs", type=int, default=3, metavar="E", help="training epochs (default 3)"
    )
    parser.add_argument("--batch-size", type=int, default=32, metavar="B")
    parser.add_argument(
        "--threads", type=int, default=None, metavar="T", help="loader threads (default: CPUs)"
    )
    parser.add_argument("--size", type=int, default=64, metavar="S", help="crop size, pixels")


def _read_all(source: Any, batch: int = 64) -> tuple[int, int, float]:
    """Read every record of ``source`` in index order: (records, bytes, seconds)."""
    n, nbytes = len(source), 0
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        for rec in source.read_many(range(start, min(n, start + batch))):
            nbytes += len(rec.data)
    return n, nbytes, time.perf_counter() - t0


def _row(name: str, what: str, records: int, nbytes: int, seconds: float) -> dict[str, Any]:
    return {
        "step": name,
        "what": what,
        "records": records,
        "MB": nbytes / _MB,
        "seconds": seconds,
        "MB/s": nbytes / _MB / seconds if seconds > 0 else float("inf"),
    }


def _print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'step':<10} {'what':<34} {'records':>7} {'MB':>7} {'seconds':>8} {'MB/s':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['step']:<10} {r['what']:<34} {r['records']:>7} {r['MB']:>7.2f} "
            f"{r['seconds']:>8.3f} {r['MB/s']:>9.1f}"
        )


def run(args: argparse.Namespace) -> int:
    """Run the demo; return the exit code."""
    from fastfeed import ConfigError

    if args.images < args.classes or args.classes < 1:
        raise ConfigError(f"need --images >= --classes >= 1, got {args.images}, {args.classes}")
    check_output_dir(args.out, "--out")
    if args.out is not None:
        root = os.path.abspath(args.out)
        os.makedirs(root, exist_ok=True)
        try:
            return _demo(root, args)
        finally:
            print(f"data kept in {root}")
    root = tempfile.mkdtemp(prefix="fastfeed-demo-")
    try:
        return _demo(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _demo(root: str, args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from fastfeed import FileSource, LMDBSource, Loader, MemoryCache, image
    from fastfeed.packing import pack
    from fastfeed.synthetic import make_image_folder

    per_class = args.images // args.classes
    folder = os.path.join(root, "images")
    db = os.path.join(root, "images.lmdb")
    rows: list[dict[str, Any]] = []
    print(f"fastfeed demo in {root}", flush=True)

    t0 = time.perf_counter()
    make_image_folder(folder, args.classes, per_class, seed=0)
    files = FileSource(folder)
    total = sum(os.path.getsize(p) for p in files.paths)
    rows.append(_row("generate", f"{args.classes} classes of JPEGs", len(files), total,
                     time.perf_counter() - t0))  # fmt: skip
    rows.append(_row("files", "FileSource.read_many", *_read_all(files)))

    report = pack(folder, db, overwrite=True, progress=False)
    rows.append(_row("pack", "fastfeed pack -> one LMDB", report.records, report.bytes_out,
                     report.seconds))  # fmt: skip
    lmdb_src = LMDBSource(db)
    rows.append(_row("lmdb", "LMDBSource.read_many", *_read_all(lmdb_src)))

    cache = MemoryCache(lmdb_src, capacity="256MiB")
    t0 = time.perf_counter()
    cache.preload(progress=False)
    rows.append(_row("cache", "MemoryCache.preload (from LMDB)", cache.cache_stats()["entries"],
                     cache.cache_stats()["bytes_cached"], time.perf_counter() - t0))  # fmt: skip
    rows.append(_row("ram", "MemoryCache.read_many (all hits)", *_read_all(cache)))
    cache.reset_stats()
    _print_table(rows)
    print(flush=True)

    transform = image.Compose(
        [image.RandomResizedCrop(args.size, scale=(0.35, 1.0)), image.RandomHorizontalFlip()]
    )
    loader = Loader(
        cache,
        transform=transform,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_threads=args.threads,
    )
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, args.classes),
    )  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    shape = None
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        correct = seen = 0
        loss_sum = 0.0
        for images, labels in loader:
            shape = (tuple(images.shape), images.dtype)
            logits = model(images.float().div_(255))
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += labels.numel()
            correct += int((logits.argmax(1) == labels).sum())
            loss_sum += loss.item() * labels.numel()
        print(
            f"train epoch {epoch + 1}/{args.epochs}: {seen} samples, loss "
            f"{loss_sum / max(1, seen):.3f}, accuracy {correct / max(1, seen):.1%}",
            flush=True,
        )
    loader.close()
    if shape is not None:
        print(f"batches: {shape[0]} {str(shape[1]).replace('torch.', '')} (N, C, H, W)")
    stats = loader.stats()
    print()
    print(
        f"Loader: {len(cache)} records from a RAM cache, {loader.num_threads} threads, "
        f"batch {args.batch_size}; profile:"
    )
    print(stats.table())
    print()
    print(stats.summary(details=True))
    sys.stdout.flush()
    cache.close()
    files.close()
    return 0
