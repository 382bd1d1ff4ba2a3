"""Raw read throughput of FileSource, LMDBSource and MemoryCache, cold and warm.

Generates an ImageNet-like set of JPEGs (50-150 KB each), packs it into an LMDB, then
reads every record once in a shuffled order through ``read_many`` batches:

* ``ceiling``: a plain 16-thread ``os.open``/``os.pread`` loop over the same files;
* ``FileSource.read_many`` (its thread pool), ``LMDBSource.read_many`` with
  ``readahead=True`` and ``False``, each cold (page cache evicted with
  ``posix_fadvise(POSIX_FADV_DONTNEED)``, checked with ``mincore``) and warm;
* ``MemoryCache`` hits (preloaded).

Every row runs ``--repeat`` rounds (default 3); the table shows medians, and each round's
ratio to the ceiling measured in that round (the machine may be shared: compare ratios).

Run by hand (not a test)::

    python benchmarks/sources.py --count 2000 --json sources.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _common import pread_files
from PIL import Image

from fastfeed._procio import evict, residency
from fastfeed.packing import pack
from fastfeed.sources import FileSource, LMDBSource, MemoryCache


def _encode_unique(rng: np.random.Generator, n_unique: int) -> list[bytes]:
    """JPEGs of 50-150 KB: a gradient plus noise at ImageNet-like sizes."""
    out: list[bytes] = []
    while len(out) < n_unique:
        w, h = int(rng.integers(420, 560)), int(rng.integers(320, 420))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        img = rng.uniform(0, 255, 3) + xx[..., None] * rng.uniform(-0.5, 0.5, 3)
        img = img + yy[..., None] * rng.uniform(-0.5, 0.5, 3)
        img = img + rng.normal(0, float(rng.uniform(8, 30)), (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        if 50_000 <= len(buf.getvalue()) <= 150_000:
            out.append(buf.getvalue())
    return out


def make_dataset(root: Path, count: int, seed: int = 0) -> None:
    """``count`` files under ``root/class_xx`` (200 distinct images reused under new names)."""
    rng = np.random.default_rng(seed)
    unique = _encode_unique(rng, min(200, count))
    for i in range(count):
        d = root / f"class_{i % 10:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img_{i:06d}.jpg").write_bytes(unique[i % len(unique)])


def _batches(order: list[int], size: int) -> list[list[int]]:
    return [order[k : k + size] for k in range(0, len(order), size)]


def _time(fn: Callable[[], int]) -> tuple[float, int]:
    t0 = time.perf_counter()
    nbytes = fn()
    return time.perf_counter() - t0, nbytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=2000, help="number of JPEGs (default 2000)")
    ap.add_argument("--batch", type=int, default=256, help="records per read_many")
    ap.add_argument("--threads", type=int, default=16, help="ceiling / FileSource threads")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds of every row (a shared machine is noisy): medians are reported",
    )
    args = ap.parse_args(argv)

    work = Path(args.dir or tempfile.mkdtemp(prefix="fastfeed-bench-"))
    root, lmdb_path = work / "imgs", work / "train.lmdb"
    t0 = time.perf_counter()
    make_dataset(root, args.count)
    gen_s = time.perf_counter() - t0
    pack(root, lmdb_path, progress=False, overwrite=True)
    os.sync()  # dirty pages cannot be evicted
    files = FileSource.from_folder(root, num_threads=args.threads)
    paths = files.paths
    data_mdb = [str(lmdb_path / "data.mdb")]
    sizes = files.record_sizes()
    order = list(range(len(files)))
    random.Random(0).shuffle(order)
    batches = _batches(order, args.batch)

    evict(paths + data_mdb)
    evict_check = {"files": residency(paths).fraction, "data.mdb": residency(data_mdb).fraction}
    results: list[dict] = []
    current_round = [0]

    def run(name: str, state: str, fn: Callable[[], int], drop: list[str]) -> None:
        resident = None
        if state == "cold":
            evict(drop)
            resident = residency(drop).fraction
        dt, nbytes = _time(fn)
        results.append(
            {
                "round": current_round[0],
                "source": name,
                "state": state,
                "seconds": dt,
                "bytes": nbytes,
                "MB_per_s": nbytes / dt / 1e6,
                "records_per_s": len(order) / dt,
                "resident_before": resident,
            }
        )

    def read_all(src) -> Callable[[], int]:
        return lambda: sum(len(r.data) for b in batches for r in src.read_many(b))

    def hinted(src) -> Callable[[], int]:
        def go() -> int:
            total = 0
            for k, b in enumerate(batches):
                if k == 0:
                    src.hint(b)
                if k + 1 < len(batches):
                    src.hint(batches[k + 1])  # what a loader does: hint the next batch
                total += sum(len(r.data) for r in src.read_many(b))
            return total

        return go

    def fresh_lmdb(readahead: bool, with_hint: bool) -> Callable[[], int]:
        # A new source per run: pages mapped by an open environment cannot be evicted.
        def go() -> int:
            with LMDBSource(lmdb_path, readahead=readahead) as src:
                return (hinted(src) if with_hint else read_all(src))()

        return go

    cache = MemoryCache(files, capacity=sum(sizes) + 1, policy="static")
    cache.preload(progress=False)
    cache_lru = MemoryCache(files, capacity=sum(sizes) + 1, policy="lru")
    cache_lru.preload(progress=False)
    for k in range(args.repeat):
        current_round[0] = k
        for state in ("cold", "warm"):
            run(
                "ceiling: 16-thread pread",
                state,
                lambda: pread_files(paths, order, args.threads),
                paths,
            )
            run("FileSource.read_many", state, read_all(files), paths)
            run("FileSource.read_many+hint", state, hinted(files), paths)
            run("LMDBSource(readahead=True)", state, fresh_lmdb(True, False), data_mdb)
            run("LMDBSource(readahead=True)+hint", state, fresh_lmdb(True, True), data_mdb)
            run("LMDBSource(readahead=False)", state, fresh_lmdb(False, False), data_mdb)
            run("LMDBSource(readahead=False)+hint", state, fresh_lmdb(False, True), data_mdb)
        run("MemoryCache hits (static)", "warm", read_all(cache), [])
        run("MemoryCache hits (lru)", "warm", read_all(cache_lru), [])
    files.close()

    ceiling = {
        (r["round"], r["state"]): r["MB_per_s"]
        for r in results
        if r["source"].startswith("ceiling")
    }
    for r in results:  # each row against the ceiling of its own round
        r["vs_ceiling"] = r["MB_per_s"] / ceiling[(r["round"], r["state"])]
    summary: list[dict] = []
    for key in dict.fromkeys((r["source"], r["state"]) for r in results):
        rows = [r for r in results if (r["source"], r["state"]) == key]
        summary.append(
            {
                "source": key[0],
                "state": key[1],
                "MB_per_s_median": float(np.median([r["MB_per_s"] for r in rows])),
                "records_per_s_median": float(np.median([r["records_per_s"] for r in rows])),
                "vs_ceiling_median": float(np.median([r["vs_ceiling"] for r in rows])),
                "vs_ceiling_all": [round(r["vs_ceiling"], 3) for r in rows],
            }
        )

    print(
        f"{len(order)} JPEGs, mean {np.mean(sizes) / 1e3:.0f} KB "
        f"(min {min(sizes) / 1e3:.0f}, max {max(sizes) / 1e3:.0f}), generated in {gen_s:.1f} s; "
        f"batch {args.batch}; resident after eviction: files {evict_check['files']:.1%}, "
        f"data.mdb {evict_check['data.mdb']:.1%}; medians of {args.repeat} rounds"
    )
    print(f"{'source':36} {'state':5} {'MB/s':>9} {'records/s':>10} {'vs ceiling':>10}  rounds")
    for r in summary:
        print(
            f"{r['source']:36} {r['state']:5} {r['MB_per_s_median']:9.0f} "
            f"{r['records_per_s_median']:10.0f} {r['vs_ceiling_median']:10.2f}  "
            f"{' '.join(f'{v:.2f}' for v in r['vs_ceiling_all'])}"
        )
    if args.json:
        import torch

        env = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
        }
        payload = {
            "environment": env,
            "count": len(order),
            "mean_record_bytes": float(np.mean(sizes)),
            "batch": args.batch,
            "resident_after_eviction": evict_check,
            "summary": summary,
            "results": results,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
