"""fastfeed.Loader vs torch's DataLoader, in the same run: throughput, memory, first batch.

Scenarios (every one runs in a fresh child process, so peak memory and start-up are
measured from the same baseline for both loaders):

1. ``tiny-ram`` / ``tiny-lmdb``: 3 KB records (uint8 arrays), batch 256, shuffled.
   torch: a map-style Dataset returning ``torch.from_numpy(np.frombuffer(record))`` per
   record, ``DataLoader(num_workers=2)`` (and ``num_workers=0``). fastfeed:
   ``Loader(batch_transform=...)`` that turns the whole batch of records into one tensor.
   RAM: records held in memory (a Python list for torch, a warmed ``MemoryCache`` over the
   LMDB for fastfeed); LMDB: read from the LMDB for both. A batched numpy gather
   (``array[indices]``) is the ceiling.
2. ``jpeg-warm`` / ``jpeg-cold``: ImageNet-like JPEGs (500x375) in an ImageFolder tree,
   decode + RandomResizedCrop(224) + horizontal flip, batch 64, shuffled. torch runs twice:
   with the same ``fastfeed.image`` transform as fastfeed (the loaders compared on equal
   work) and with the torchvision-style PIL pipeline (``naive PIL``: what a user switching
   starts from). fastfeed runs as ``Loader`` over a FileSource and as the drop-in
   ``fastfeed.DataLoader`` over the same torch Dataset. Cold: the files are evicted from
   the page cache (``POSIX_FADV_DONTNEED``) before the run. ``jpeg-320``: fastfeed
   ``Loader`` over the same images packed with ``--max-side 320`` (warm).
3. For every run: peak RSS of the whole process tree (parent + worker processes, from
   ``/proc``) and time to first batch (loader construction to first batch in hand).
4. ``torch-threads``: fastfeed with a float-normalizing transform (torch ops in the worker
   threads), ``torch_threads=1`` (default) vs ``None`` (torch's default intra-op width).
5. ``dali`` rows on ``jpeg-warm`` / ``jpeg-cold`` where NVIDIA DALI imports (``pip install
   nvidia-dali-cuda120``: it runs CPU-only without a GPU; not a fastfeed dependency): its
   CPU pipeline over the same ImageFolder, ``fn.readers.file`` (shuffled) →
   ``fn.decoders.image_random_crop`` (DALI's RandomResizedCrop decode: only the crop
   window, libjpeg-turbo) → ``fn.resize`` 224x224 → ``fn.crop_mirror_normalize`` (random
   flip, uint8 CHW), batch 64, ``num_threads`` = the machine's cores, batches delivered as
   CPU torch tensors by ``DALIGenericIterator``. Skipped with a message when DALI does
   not import.

Usage::

    python benchmarks/loader_vs_torch.py [--quick] [--out benchmarks/results/loader_vs_torch.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

from fastfeed._procio import tree_pss_bytes

RECORD_BYTES = 3072
TINY_BATCH = 256
JPEG_BATCH = 64


# -- data --------------------------------------------------------------------------------


def _prepare(work: Path, tiny_n: int, jpeg_n: int) -> dict[str, str]:
    from fastfeed.packing import pack

    tiny_lmdb = work / "tiny.lmdb"
    if not tiny_lmdb.exists():
        payloads, labels = _common.synthetic_arrays(tiny_n, RECORD_BYTES, seed=1)
        pack(_common.RamSource(payloads, labels), tiny_lmdb, progress=False)
    jpeg_root = work / "jpegs"
    if not jpeg_root.exists():
        payloads, labels = _common.synthetic_jpegs(jpeg_n, size=(500, 375), seed=2, distinct=64)
        _common.write_jpeg_folder(jpeg_root, payloads, labels)
    jpeg_320 = work / "jpegs-320.lmdb"
    if not jpeg_320.exists():  # what `fastfeed pack jpegs jpegs-320.lmdb --max-side 320` writes
        pack(str(jpeg_root), jpeg_320, max_side=320, progress=False)
    os.sync()
    return {"tiny_lmdb": str(tiny_lmdb), "jpeg_root": str(jpeg_root), "jpeg_320": str(jpeg_320)}


# -- child: one measured run ---------------------------------------------------------------


def _frombuffer_batch(records: list[bytes]) -> Any:
    import torch

    # One copy: join the records into a writable buffer and view it as (n, RECORD_BYTES).
    buf = bytearray().join(records)
    return torch.frombuffer(buf, dtype=torch.uint8).view(len(records), -1)


def _tiny_torch_dataset(spec: dict[str, Any]) -> Any:
    import lmdb
    import torch
    from torch.utils.data import Dataset

    from fastfeed.sources.lmdb import LMDBSource, record_key

    class LmdbArrays(Dataset):
        # The usual torch recipe: open the environment lazily, once per worker process.
        def __init__(self, path: str, n: int, labels: list[int]) -> None:
            self.path, self.n, self.labels, self.env = path, n, labels, None

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, i: int) -> tuple[Any, int]:
            if self.env is None:
                self.env = lmdb.open(
                    self.path, readonly=True, lock=False, readahead=False, max_readers=256
                )
            with self.env.begin() as txn:
                data = txn.get(record_key(i))
            arr = np.frombuffer(data, dtype=np.uint8)
            return torch.from_numpy(arr.copy()), self.labels[i]

    src = LMDBSource(spec["tiny_lmdb"])
    n = len(src)
    recs = src.read_many(list(range(n)))
    labels = [int(r.label) for r in recs]
    if spec["data"] == "tiny-ram":
        ds: Any = _common.RamArrays([bytes(r.data) for r in recs], labels)
    else:
        ds = LmdbArrays(spec["tiny_lmdb"], n, labels)
    del recs
    src.close()
    return ds


def _jpeg_transform(normalize: bool = False) -> Any:
    from fastfeed.image import Compose, RandomHorizontalFlip, RandomResizedCrop, ToFloat

    steps: list[Any] = [RandomResizedCrop(224), RandomHorizontalFlip()]
    if normalize:
        steps.append(ToFloat((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    return Compose(steps)


def _jpeg_torch_dataset(spec: dict[str, Any]) -> Any:
    from torch.utils.data import Dataset

    from fastfeed.sources.files import FileSource

    listing = FileSource.from_folder(spec["jpeg_root"])
    paths = list(listing.paths)
    labels = [int(x) for x in listing.labels] if listing.labels is not None else [0] * len(paths)
    listing.close()
    if spec.get("naive"):
        # The torchvision way on PIL (Image.open, convert, crop+resize, flip, to tensor):
        # the baseline a user switching from torch starts from.
        import random

        import torch
        from image_decode import naive_train

        rnd = random.Random(0)

        def transform(data: bytes) -> Any:
            row = torch.empty((3, 224, 224), dtype=torch.uint8)
            naive_train(data, row, rnd)
            return row

    else:
        transform = _jpeg_transform()

    class JpegFolder(Dataset):
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int) -> tuple[Any, int]:
            with open(paths[i], "rb") as f:
                data = f.read()
            return transform(data), labels[i]

    return JpegFolder()


def dali_available() -> bool:
    """Whether NVIDIA DALI is installed (found without importing it: its import is noisy)."""
    import importlib.util

    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


def _dali_loader(spec: dict[str, Any]) -> Any:
    """DALI's CPU pipeline over the ImageFolder, iterated as CPU torch tensors."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    @pipeline_def(batch_size=JPEG_BATCH, num_threads=spec["workers"], device_id=None, seed=0)
    def pipeline() -> Any:
        jpegs, labels = fn.readers.file(
            file_root=spec["jpeg_root"], random_shuffle=True, name="Reader"
        )
        # RandomResizedCrop the DALI way: the decoder picks the window (scale 0.08-1,
        # ratio 3/4-4/3) and decodes only it; then resize to 224x224.
        images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB)
        images = fn.resize(images, size=[224, 224])
        images = fn.crop_mirror_normalize(
            images, dtype=types.UINT8, output_layout="CHW", mirror=fn.random.coin_flip()
        )
        return images, labels

    return DALIGenericIterator(
        pipeline(),
        ["x", "y"],
        reader_name="Reader",
        last_batch_policy=LastBatchPolicy.PARTIAL,
        auto_reset=True,
    )


class _DaliBatches:
    """DALIGenericIterator's batches as (x, y) pairs, like the other loaders yield."""

    def __init__(self, iterator: Any) -> None:
        self.iterator = iterator

    def __iter__(self) -> Any:
        return ((b[0]["x"], b[0]["y"]) for b in self.iterator)


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    data, kind = spec["data"], spec["loader"]
    epochs = spec.get("epochs", 1)
    if data.startswith("tiny") and kind == "numpy":
        return _numpy_gather(spec)
    if kind == "dali" and data == "jpeg-cold":
        _common.drop_page_cache([spec["jpeg_root"]])
    if data.startswith("tiny"):
        batch = TINY_BATCH
        if kind == "torch":
            dataset = _tiny_torch_dataset(spec)
        else:
            from fastfeed.sources.lmdb import LMDBSource
            from fastfeed.sources.memory import MemoryCache

            source: Any = LMDBSource(spec["tiny_lmdb"])
            if data == "tiny-ram":
                source = MemoryCache(source, capacity="4GiB")
                n = len(source)
                for k in range(0, n, 4096):  # warm the cache: every record in RAM
                    source.read_many(list(range(k, min(n, k + 4096))))
    elif kind != "dali":
        batch = JPEG_BATCH
        if kind in ("torch", "fastfeed.DataLoader"):
            dataset = _jpeg_torch_dataset(spec)
        elif data == "jpeg-320":
            from fastfeed.sources.lmdb import LMDBSource

            source = LMDBSource(spec["jpeg_320"])
        else:
            from fastfeed.sources.files import FileSource

            source = FileSource.from_folder(spec["jpeg_root"])
        if data == "jpeg-cold":
            _common.drop_page_cache([spec["jpeg_root"]])

    def make() -> Any:
        if kind == "dali":
            return _DaliBatches(_dali_loader(spec))
        if kind in ("torch", "fastfeed.DataLoader"):
            if kind == "torch":
                from torch.utils.data import DataLoader
            else:
                from fastfeed import DataLoader  # the one-line switch

            return DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=spec["workers"])
        from fastfeed.loader import Loader

        kwargs: dict[str, Any] = {
            "batch_size": batch,
            "shuffle": True,
            "num_threads": spec["workers"],
        }
        for key in ("torch_threads", "read_ahead", "processes"):
            if key in spec:
                kwargs[key] = spec[key]
        if data.startswith("tiny"):
            return Loader(source, batch_transform=_frombuffer_batch, **kwargs)
        return Loader(source, _jpeg_transform(spec.get("normalize", False)), **kwargs)

    torch.manual_seed(0)
    with (
        # Sampled from a child process (fastfeed._peakmem), and not too often: each /proc
        # read of a process's memory (PSS walks its page tables) holds that process's mm
        # lock, which all of an in-process loader's threads share: at 5 ms (RSS) and
        # 50 ms (PSS) they cost fastfeed's threads 5-10% of their JPEG rate.
        _common.PeakRSS(interval_s=0.02) as mem,
        _common.PeakRSS(interval_s=0.25, measure=tree_pss_bytes) as pss,
    ):
        cpu0 = _cpu_s()
        t0 = time.perf_counter()
        loader = make()
        it = iter(loader)
        first = next(it)
        ttfb = time.perf_counter() - t0
        t1 = time.perf_counter()
        samples = 0
        checksum = 0
        for x, _y in it:
            samples += len(x)
        for _ in range(epochs - 1):
            for x, _y in loader:
                samples += len(x)
        elapsed = time.perf_counter() - t1
        checksum = int(first[0].reshape(-1)[:16].sum())
        del it, loader  # torch joins its workers: their CPU time joins the children's
        cpu_s = _cpu_s() - cpu0
    first_n = len(first[0])
    return {
        "samples": samples,
        "seconds": elapsed,
        "samples_per_s": samples / elapsed if elapsed > 0 else 0.0,
        # Everything, first batch and start-up included: fair when the prefetch depth
        # can hold a whole (small) epoch, where "after the first batch" measures nothing.
        "total_per_s": (samples + first_n) / (ttfb + elapsed),
        "ttfb_s": ttfb,
        "peak_rss_mb": mem.peak_bytes / 2**20,
        "peak_pss_mb": pss.peak_bytes / 2**20,
        "base_rss_mb": mem.start_bytes / 2**20,
        "checksum": checksum,
        # CPU time of the process and its reaped children (torch's workers), start-up
        # included, per sample: steadier than rates on a machine shared with other jobs.
        "cpu_s": cpu_s,
        "cpu_ms_per_sample": cpu_s / (samples + first_n) * 1e3,
    }


def _cpu_s() -> float:
    """User + system CPU seconds of this process and its waited-for children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _numpy_gather(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from fastfeed.sources.lmdb import LMDBSource

    src = LMDBSource(spec["tiny_lmdb"])
    n = len(src)
    arr = np.frombuffer(
        b"".join(r.data for r in src.read_many(list(range(n)))), dtype=np.uint8
    ).reshape(n, -1)
    labels = np.array([r.label for r in src.read_many(list(range(n)))], dtype=np.int64)
    src.close()
    order = np.random.default_rng(0).permutation(n)
    t1 = time.perf_counter()
    samples = 0
    for k in range(0, n, TINY_BATCH):
        idx = order[k : k + TINY_BATCH]
        x = torch.from_numpy(arr[idx])
        _y = torch.from_numpy(labels[idx])
        samples += len(x)
    elapsed = time.perf_counter() - t1
    return {"samples": samples, "seconds": elapsed, "samples_per_s": samples / elapsed}


def _run_child(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if out.returncode != 0:
        raise RuntimeError(f"run {spec} failed:\n{out.stderr[-3000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


# -- parent --------------------------------------------------------------------------------


def _plan(quick: bool, workers: int = 2, only: str | None = None) -> list[dict[str, Any]]:
    runs = _all_runs(quick)
    for run in runs:
        if run["workers"] == 2 and run["loader"] != "dali":
            run["workers"] = workers
    if not dali_available():
        print("DALI rows skipped: nvidia.dali does not import (pip install nvidia-dali-cuda120)")
        runs = [r for r in runs if r["loader"] != "dali"]
    if only:
        runs = [r for r in runs if r.get("scenario", r["data"]).startswith(only)]
    return runs


def _all_runs(quick: bool) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for data in ("tiny-ram", "tiny-lmdb"):
        runs.append({"data": data, "loader": "torch", "workers": 2})
        if data == "tiny-ram":
            runs.append({"data": data, "loader": "torch", "workers": 0})
            runs.append({"data": data, "loader": "numpy", "workers": 0})
        runs.append({"data": data, "loader": "fastfeed", "workers": 2})
        # Tuned for tiny records: inline (the work holds the GIL, threads only add
        # hand-offs) and no read-ahead hints (the data is in RAM / the page cache).
        runs.append(
            {"data": data, "loader": "fastfeed", "workers": 0, "read_ahead": False, "tuned": True}
        )
    for data in ("jpeg-warm", "jpeg-cold"):
        runs.append({"data": data, "loader": "torch", "workers": 2})
        runs.append({"data": data, "loader": "torch", "workers": 2, "naive": True})
        runs.append({"data": data, "loader": "fastfeed", "workers": 2})
        runs.append({"data": data, "loader": "fastfeed.DataLoader", "workers": 2})
        # DALI's CPU pipeline with one thread per core (where it imports).
        runs.append({"data": data, "loader": "dali", "workers": os.cpu_count() or 1})
    # Pre-resized at pack time (--max-side 320): fewer bytes to read and decode.
    runs.append({"data": "jpeg-320", "loader": "fastfeed", "workers": 2})
    if not quick:
        for tt in (1, None):
            runs.append(
                {
                    "data": "jpeg-warm",
                    "loader": "fastfeed",
                    "workers": 2,
                    "normalize": True,
                    "torch_threads": tt,
                    "scenario": "torch-threads",
                }
            )
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="smaller data, fewer runs")
    parser.add_argument("--tiny-n", type=int, default=None, help="tiny records (default 100000)")
    parser.add_argument("--jpeg-n", type=int, default=None, help="JPEG files (default 1024)")
    parser.add_argument("--work-dir", default=None, help="where to build the data (kept)")
    parser.add_argument(
        "--workers", type=int, default=2, help="torch num_workers = fastfeed threads (default 2)"
    )
    parser.add_argument("--only", default=None, help="run only scenarios starting with this")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per run (default 1)")
    parser.add_argument(
        "--rate",
        choices=("steady", "total"),
        default="steady",
        help="ratios from samples/s after the first batch (steady) or over the whole run, "
        "start-up included (total: use it when the prefetch depth holds a whole epoch)",
    )
    parser.add_argument(
        "--processes",
        default="",
        help="also run Loader(processes=P, num_threads=T) for each P:T in this comma list "
        "(e.g. '1:2,2:1,2:2') on the JPEG and tiny-ram scenarios",
    )
    parser.add_argument(
        "--out", default="benchmarks/results/loader_vs_torch.json", help="JSON output path"
    )
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))), flush=True)
        return

    tiny_n = args.tiny_n or (30_000 if args.quick else 100_000)
    jpeg_n = args.jpeg_n or (384 if args.quick else 1024)
    tmp = None
    if args.work_dir:
        work = Path(args.work_dir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="fastfeed-bench-")
        work = Path(tmp)
    try:
        t0 = time.perf_counter()
        paths = _prepare(work, tiny_n, jpeg_n)
        print(f"data ready in {time.perf_counter() - t0:.1f} s under {work}", flush=True)
        rows = []
        plan = _plan(args.quick, args.workers, args.only)
        plan += _process_runs(args.processes, args.only)
        for spec in plan:
            full = {**spec, **paths, "epochs": args.epochs}
            res = _run_child(full, timeout_s=300)
            row = {
                "scenario": spec.get("scenario", spec["data"]),
                "loader": spec["loader"]
                + (" (tuned)" if spec.get("tuned") else "")
                + (" (naive PIL)" if spec.get("naive") else "")
                + (f" p={spec['processes']}" if "processes" in spec else ""),
                "workers": spec["workers"],
                **({"torch_threads": spec["torch_threads"]} if "torch_threads" in spec else {}),
                **res,
            }
            rows.append(row)
            print(
                f"  {row['scenario']:<13} {row['loader']:<9} w={row['workers']} "
                f"{res['samples_per_s']:>12,.0f} samples/s",
                flush=True,
            )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    ratios = _ratios(rows, args.workers, "total_per_s" if args.rate == "total" else "samples_per_s")
    cols = [
        "scenario",
        "loader",
        "workers",
        "samples_per_s",
        "total_per_s",
        "ttfb_s",
        "cpu_ms_per_sample",
        "peak_rss_mb",
        "peak_pss_mb",
        "base_rss_mb",
        "samples",
    ]
    _common.print_table(rows, cols, title="\nfastfeed.Loader vs torch DataLoader (same run)")
    title = f"\nratios: fastfeed / torch DataLoader(num_workers={args.workers}) and DALI"
    _common.print_table(ratios, title=title)
    path = _common.write_json(
        args.out,
        {
            "benchmark": "loader_vs_torch",
            "note": "measured while other jobs may share the CPU",
            "params": {
                "tiny_records": tiny_n,
                "record_bytes": RECORD_BYTES,
                "tiny_batch": TINY_BATCH,
                "jpeg_files": jpeg_n,
                "jpeg_batch": JPEG_BATCH,
            },
            "runs": rows,
            "ratios": ratios,
        },
    )
    print(f"\nwrote {path}")


def _process_runs(pairs: str, only: str | None) -> list[dict[str, Any]]:
    """Loader(processes=P, num_threads=T) runs for each ``P:T`` in ``pairs``."""
    runs = []
    for pair in filter(None, (p.strip() for p in pairs.split(","))):
        procs, threads = (int(x) for x in pair.split(":"))
        for data in ("tiny-ram", "jpeg-warm", "jpeg-320"):
            if only and not data.startswith(only):
                continue
            run: dict[str, Any] = {"data": data, "loader": "fastfeed", "workers": threads}
            run["processes"] = procs
            if data.startswith("tiny"):
                run["read_ahead"] = False
            runs.append(run)
    return runs


def _vs_in_process(row: dict[str, Any], here: list[dict[str, Any]], rate: str) -> float | None:
    """Throughput of a process-mode row over the in-process Loader row of its scenario."""
    if " p=" not in row["loader"]:
        return None
    base = next((r for r in here if r["loader"] == "fastfeed"), None)
    return row[rate] / base[rate] if base else None


def _ratios(
    rows: list[dict[str, Any]], workers: int = 2, rate: str = "samples_per_s"
) -> list[dict[str, Any]]:
    out = []
    for scenario in ("tiny-ram", "tiny-lmdb", "jpeg-warm", "jpeg-cold", "jpeg-320"):
        here = [r for r in rows if r["scenario"] == scenario]
        # jpeg-320 is compared with torch on the original files (warm): the gain of packing.
        base = [r for r in rows if r["scenario"] == "jpeg-warm"] if scenario == "jpeg-320" else here
        for baseline in ("torch", "torch (naive PIL)", "dali"):
            torch_row = next(
                (
                    r
                    for r in base
                    if r["loader"] == baseline and (r["workers"] == workers or baseline == "dali")
                ),
                None,
            )
            if torch_row is None:
                continue
            for ff in (r for r in here if r["loader"].startswith("fastfeed")):
                out.append(
                    {
                        "scenario": scenario,
                        "fastfeed": f"{ff['loader']} w={ff['workers']}",
                        "vs": f"{baseline} w={torch_row['workers']}",
                        "throughput_x": ff[rate] / torch_row[rate],
                        "cpu_per_sample_x": ff["cpu_ms_per_sample"]
                        / torch_row["cpu_ms_per_sample"],
                        "peak_rss_x": ff["peak_rss_mb"] / torch_row["peak_rss_mb"],
                        "peak_pss_x": ff["peak_pss_mb"] / torch_row["peak_pss_mb"],
                        "ttfb_x": ff["ttfb_s"] / torch_row["ttfb_s"],
                        "vs_in_process_x": _vs_in_process(ff, here, rate),
                    }
                )
    tt = {r.get("torch_threads", "x"): r for r in rows if r["scenario"] == "torch-threads"}
    if 1 in tt and None in tt:
        out.append(
            {
                "scenario": "torch_threads=1 vs None",
                "throughput_x": tt[1]["samples_per_s"] / tt[None]["samples_per_s"],
                "peak_rss_x": tt[1]["peak_rss_mb"] / tt[None]["peak_rss_mb"],
                "ttfb_x": tt[1]["ttfb_s"] / tt[None]["ttfb_s"],
            }
        )
    return out


if __name__ == "__main__":
    main()
