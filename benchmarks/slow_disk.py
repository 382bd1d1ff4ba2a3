"""One cold epoch of the ImageNet-like JPEG workload from slow storage: block order vs the rest.

Run it under the disk throttle (reads from the disk holding ``--work``), page cache
dropped before every run (``posix_fadvise(DONTNEED)`` on the dataset)::

    python benchmarks/slow_disk.py --work /tmp/ffslow --prepare-only
    ../shared/slowdisk --bps 100M --iops 400 --readahead-kb 128 -- \\
        python benchmarks/slow_disk.py --work /tmp/ffslow --json slow_disk.json

Workload: 4000 JPEGs of 500x375 (~78 KB), RandomResizedCrop 224 + flip (fastfeed.image,
the same transform in every loader; ``--transform none`` delivers the raw bytes, to
measure the storage path alone on a machine whose CPUs cannot decode at disk speed),
batch 64, one epoch, first batch included (the clock starts before the source is
opened). Every run is a child process. Rows:

* ``ceiling: 16-thread pread (files)``: reading the files, no decoding;
* ``torch DataLoader(num_workers=2)`` over the files and over the LMDB (``lmdb.open``
  per worker, ``txn.get`` per sample: the usual recipe; with LMDB's default read-ahead,
  and with ``readahead=False`` as many recipes set it);
* ``fastfeed.Loader`` over the files and over the packed LMDB with ``shuffle=True``, and
  over the LMDB with ``shuffle="block"``; the last one also with 2 ranks (gloo), each
  reading its shard (the shards are checked disjoint).

The bandwidth ceiling is ``images / (bytes / bps)`` for the ``--bps`` given (the throttle's).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

BATCH = 64


def prepare(work: Path, count: int) -> dict[str, str]:
    """The JPEG folder and its ``fastfeed pack`` LMDB under ``work`` (kept between runs)."""
    from fastfeed.packing import pack

    root, packed = work / "jpegs", work / "jpegs.lmdb"
    if not root.exists():
        payloads, labels = _common.synthetic_jpegs(count, size=(500, 375), seed=2, distinct=64)
        _common.write_jpeg_folder(root, payloads, labels)
    if not packed.exists():
        pack(str(root), packed, progress=False)
    os.sync()
    return {"root": str(root), "lmdb": str(packed)}


def _transform(kind: str = "crop") -> Any:
    """The train transform, or None (``--transform none``: raw bytes, the IO path alone)."""
    if kind == "none":
        return None
    from fastfeed.image import Compose, RandomHorizontalFlip, RandomResizedCrop

    return Compose([RandomResizedCrop(224), RandomHorizontalFlip()])


def _identity(data: bytes) -> bytes:
    return data


def _torch_dataset(kind: str, spec: dict[str, Any]) -> Any:
    from torch.utils.data import Dataset

    from fastfeed.sources.files import FileSource

    transform = _transform(spec["transform"]) or _identity
    if kind == "files":
        listing = FileSource.from_folder(spec["root"])
        paths, labels = list(listing.paths), list(listing.labels or [])
        listing.close()

        class Files(Dataset):
            def __len__(self) -> int:
                return len(paths)

            def __getitem__(self, i: int) -> tuple[Any, int]:
                with open(paths[i], "rb") as f:
                    return transform(f.read()), labels[i]

        return Files()

    from fastfeed.sources.lmdb import LMDBSource

    with LMDBSource(spec["lmdb"]) as probe:
        n, labels = len(probe), list(probe.labels or [])

    class Lmdb(Dataset):
        def __init__(self) -> None:
            self.env: Any = None

        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int) -> tuple[Any, int]:
            import lmdb

            if self.env is None:  # opened in each worker, as the usual recipe does
                self.env = lmdb.open(
                    spec["lmdb"],
                    readonly=True,
                    lock=False,
                    readahead=spec.get("readahead", True),
                    meminit=False,
                )
            with self.env.begin() as txn:
                data = txn.get(b"%010d" % i)
            return transform(data), labels[i]

    return Lmdb()


def _pread_ceiling(root: str) -> tuple[int, int]:
    from fastfeed.sources.files import FileSource

    paths = list(FileSource.from_folder(root).paths)
    order = list(range(len(paths)))
    random.Random(0).shuffle(order)
    return len(paths), _common.pread_files(paths, order, 16)


def _epoch(spec: dict[str, Any]) -> dict[str, Any]:
    """One measured epoch in this (child) process; the page cache was dropped by the parent.

    Modules are imported before the clock starts (torch alone takes ~0.8 s here, a quarter
    of a block-order epoch, and the pread ceiling imports nothing); opening the source,
    building the loader and its workers' start-up are timed.
    """
    import torch.utils.data  # noqa: F401 - imported here, outside the timed region

    import fastfeed.image
    import fastfeed.loader
    import fastfeed.sources.files
    import fastfeed.sources.lmdb  # noqa: F401

    row, t0 = spec["row"], time.perf_counter()
    first_s = None
    images = 0
    if row == "ceiling":
        images, _ = _pread_ceiling(spec["root"])
    elif row.startswith("torch"):
        from torch.utils.data import DataLoader

        ds = _torch_dataset(spec["data"], spec)
        dl = DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=2)
        for x, _ in dl:
            images += len(x)
            first_s = first_s or time.perf_counter() - t0
    else:
        from fastfeed.loader import Loader
        from fastfeed.sources.files import FileSource
        from fastfeed.sources.lmdb import LMDBSource

        rank = spec.get("rank")
        if rank is not None:
            import torch.distributed as dist

            dist.init_process_group(
                "gloo", init_method=spec["init"], rank=rank, world_size=spec["world"]
            )
            dist.barrier()
            t0 = time.perf_counter()
        source: Any = (
            FileSource.from_folder(spec["root"])
            if spec["data"] == "files"
            else LMDBSource(spec["lmdb"])
        )
        transform = _transform(spec["transform"])
        loader = Loader(source, transform, batch_size=BATCH, shuffle=spec["shuffle"])
        for x, _ in loader:
            images += len(x)
            first_s = first_s or time.perf_counter() - t0
        if rank is not None:
            order = loader.sampler.rank_order(loader.epoch)
            spec_out = {"indices": sorted(int(i) for i in order)}
            dist.barrier()
        source.close()
    seconds = time.perf_counter() - t0
    out = {"images": images, "seconds": seconds, "first_batch_s": first_s}
    if spec.get("rank") is not None:
        out.update(spec_out)
    return out


def _run(spec: dict[str, Any], drop: list[str], timeout_s: float = 600.0) -> dict[str, Any]:
    _common.drop_page_cache(drop)
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['row']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ranks(spec: dict[str, Any], drop: list[str], world: int = 2) -> dict[str, Any]:
    _common.drop_page_cache(drop)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        child = dict(spec, rank=rank, world=world, init=f"tcp://127.0.0.1:{port}")
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--child", json.dumps(child)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"rank failed:\n{stderr[-3000:]}")
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    shards = [set(o.pop("indices")) for o in outs]
    return {
        "images": sum(o["images"] for o in outs),
        "seconds": max(o["seconds"] for o in outs),
        "first_batch_s": max(o["first_batch_s"] or 0 for o in outs),
        "per_rank": outs,
        "shards_disjoint": not (shards[0] & shards[1]),
        "shards_cover": len(shards[0] | shards[1]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/fastfeed-slow-disk", help="dataset folder")
    ap.add_argument("--count", type=int, default=4000, help="JPEGs (default 4000)")
    ap.add_argument("--bps", type=float, default=100 * 1024**2, help="throttle, bytes/s")
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--prepare-only", action="store_true", help="make the data and stop")
    ap.add_argument("--rows", default=None, help="comma-separated row names to run")
    ap.add_argument(
        "--transform",
        choices=("crop", "none"),
        default="crop",
        help="crop: RandomResizedCrop 224 + flip; none: raw bytes (the IO path alone)",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_epoch(json.loads(args.child))))
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    paths = prepare(work, args.count)
    if args.prepare_only:
        return 0
    lmdb_bytes = os.path.getsize(Path(paths["lmdb"]) / "data.mdb")
    jpeg_bytes = sum(f.stat().st_size for f in Path(paths["root"]).rglob("*.jpg"))
    rows: list[tuple[str, dict[str, Any], list[str]]] = [
        ("ceiling: 16-thread pread (files)", {"row": "ceiling"}, [paths["root"]]),
        ("torch DataLoader(2) files", {"row": "torch", "data": "files"}, [paths["root"]]),
        ("torch DataLoader(2) LMDB", {"row": "torch", "data": "lmdb"}, [paths["lmdb"]]),
        (
            "torch DataLoader(2) LMDB readahead=False",
            {"row": "torch", "data": "lmdb", "readahead": False},
            [paths["lmdb"]],
        ),
        ("fastfeed Loader files shuffle", {"data": "files", "shuffle": True}, [paths["root"]]),
        ("fastfeed Loader LMDB shuffle", {"data": "lmdb", "shuffle": True}, [paths["lmdb"]]),
        ("fastfeed Loader LMDB block", {"data": "lmdb", "shuffle": "block"}, [paths["lmdb"]]),
        ("fastfeed Loader LMDB block x2 ranks", {"data": "lmdb", "shuffle": "block"}, []),
    ]
    wanted = set(args.rows.split(",")) if args.rows else None
    results = []
    for name, spec, drop in rows:
        if wanted and name not in wanted:
            continue
        spec = dict(spec, row=spec.get("row", "fastfeed"), transform=args.transform, **paths)
        if name.endswith("2 ranks"):
            out = _ranks(spec, [paths["lmdb"]])
        else:
            out = _run(spec, drop)
        out["images_per_s"] = out["images"] / out["seconds"]
        results.append({"loader": name, **out})
        print(f"{name:40} {out['images_per_s']:8.0f} images/s  first batch {out['first_batch_s']}")
    ceiling = args.count / (lmdb_bytes / args.bps)
    base = {r["loader"]: r["images_per_s"] for r in results}
    for r in results:
        r["vs_bandwidth_ceiling"] = r["images_per_s"] / ceiling
        for ref in ("torch DataLoader(2) files", "torch DataLoader(2) LMDB"):
            if ref in base:
                r[f"vs {ref}"] = r["images_per_s"] / base[ref]
    _common.print_table(
        [
            {
                "loader": r["loader"],
                "images/s": r["images_per_s"],
                "vs ceiling": r["vs_bandwidth_ceiling"],
                "vs torch files": r.get("vs torch DataLoader(2) files"),
                "vs torch LMDB": r.get("vs torch DataLoader(2) LMDB"),
            }
            for r in results
        ],
        title=f"bandwidth ceiling {ceiling:.0f} images/s ({lmdb_bytes / 1e6:.0f} MB LMDB)",
    )
    if args.json:
        _common.write_json(
            args.json,
            {
                "environment": _common.environment(),
                "count": args.count,
                "lmdb_bytes": lmdb_bytes,
                "jpeg_bytes": jpeg_bytes,
                "bps": args.bps,
                "transform": args.transform,
                "bandwidth_ceiling_images_per_s": ceiling,
                "read_ahead_kb": _read_ahead_kb(work),
                "results": results,
            },
        )
    return 0


def _read_ahead_kb(path: Path) -> int | None:
    """The read-ahead of the disk holding ``path`` (sysfs), or None."""
    try:
        dev = os.stat(path).st_dev
        sys_dir = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
        for cand in (sys_dir / "queue", sys_dir.resolve().parent / "queue"):
            if (cand / "read_ahead_kb").exists():
                return int((cand / "read_ahead_kb").read_text())
    except (OSError, ValueError):
        return None
    return None


if __name__ == "__main__":
    sys.exit(main())
