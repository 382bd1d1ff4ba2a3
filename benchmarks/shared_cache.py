"""One RAM cache per machine: memory, storage reads and read rate of ``MemoryCache(shared=True)``.

Runs ``--ranks`` rank processes (started like torchrun's: separate interpreters, each with
its rank and world size), each a ``Loader(processes=K)`` over the same folder of files
(``--mb`` of ``--record-kb`` records), for ``--epochs`` epochs, three ways:

- ``none``: no cache (the memory baseline);
- ``shared``: ``MemoryCache(capacity=dataset, shared=True)``: one copy per machine;
- ``per-process``: ``MemoryCache(capacity=dataset)``: each worker process fills its own.

After each epoch (all ranks stopped at a barrier) the parent measures the summed PSS of
every process of every rank (ranks and their workers), the PSS of the shared segment's
mappings, and the bytes the process trees read (``rchar``; mmap reads of the cache do not
count). Separately, in this process: the read rate of a filled shared cache against a
filled in-process cache (raw ``read_many`` and a threaded Loader epoch), measured in the
same run.

    python benchmarks/shared_cache.py --mb 300 --out benchmarks/results/shared_cache.json
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json

import fastfeed as ff
from fastfeed._procio import _children, _pss_bytes
from fastfeed.sources import FileSource, MemoryCache

HEAD = 64


class HeadBytes:
    """Fixed-shape transform: the record's first 64 bytes as uint8 (cheap: reads dominate)."""

    def sample_spec(self) -> tuple[tuple[int, ...], torch.dtype]:
        return (HEAD,), torch.uint8

    def __call__(self, data: Any, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty(HEAD, dtype=torch.uint8)
        out.numpy()[:] = np.frombuffer(data, dtype=np.uint8, count=HEAD)
        return out


def write_dataset(root: Path, mb: int, record_kb: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    n = mb * 1024 // record_kb
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = root / f"{i:06d}.bin"
        p.write_bytes(rng.integers(0, 256, record_kb * 1024, dtype=np.uint8).tobytes())
        paths.append(str(p))
    return paths


def _tree(pid: int) -> list[int]:
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(_children(p))
    return out


def _rchar(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _memfd_pss(pid: int) -> int:
    """PSS of this process's mappings of shared cache segments, bytes."""
    total, inside = 0, False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                first = line.split(maxsplit=1)[0]
                if "-" in first and not first.endswith(":"):
                    inside = "memfd:fastfeed-cache" in line
                elif inside and line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
    except OSError:
        pass
    return total


# -- one rank (a child process) ---------------------------------------------------------------


def rank_main(args: argparse.Namespace) -> None:
    paths = sorted(str(p) for p in Path(args.data).iterdir())
    src: ff.Source = FileSource(paths, num_threads=4)
    cache = None
    if args.mode != "none":
        cache = MemoryCache(src, args.capacity, shared=args.mode == "shared")
        src = cache
    loader = ff.Loader(
        src,
        HeadBytes(),
        batch_size=args.batch,
        shuffle=True,
        seed=1,
        num_threads=args.threads,
        processes=args.processes,
        rank=args.rank,
        world_size=args.ranks,
    )
    print("READY", flush=True)
    for _ in range(args.epochs):
        if sys.stdin.readline().strip() != "go":
            return
        t0 = time.perf_counter()
        samples = 0
        for batch in loader:
            samples += len(batch.indices)
        elapsed = time.perf_counter() - t0
        print("EPOCH " + json.dumps({"samples": samples, "elapsed_s": elapsed}), flush=True)
    sys.stdin.readline()
    stats = cache.cache_stats() if cache is not None else {}
    print("STATS " + json.dumps(stats), flush=True)
    loader.close()
    if cache is not None and cache.shared:
        cache.detach()


# -- the parent -------------------------------------------------------------------------------


def _expect(proc: subprocess.Popen, tag: str) -> str:
    while True:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"rank {proc.pid} exited before {tag}: {proc.stderr.read()}")  # type: ignore[union-attr]
        if line.startswith(tag):
            return line[len(tag) :].strip()


def run_mode(mode: str, args: argparse.Namespace, data: Path, capacity: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--rank-of", mode, "--data", str(data)]
    cmd += ["--capacity", str(capacity), "--ranks", str(args.ranks), "--epochs", str(args.epochs)]
    cmd += ["--processes", str(args.processes), "--threads", str(args.threads)]
    cmd += ["--batch", str(args.batch)]
    procs = [
        subprocess.Popen(
            [*cmd, "--rank", str(r)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(args.ranks)
    ]
    try:
        for p in procs:
            _expect(p, "READY")
        pids = [q for p in procs for q in _tree(p.pid)]
        pss0 = sum(_pss_bytes(q) for q in pids)
        rchar = {q: _rchar(q) for q in pids}
        epochs = []
        for e in range(args.epochs):
            for p in procs:
                p.stdin.write("go\n")  # type: ignore[union-attr]
                p.stdin.flush()  # type: ignore[union-attr]
            per_rank = [json.loads(_expect(p, "EPOCH")) for p in procs]
            pids = [q for p in procs for q in _tree(p.pid)]
            now = {q: _rchar(q) for q in pids}
            read = sum(now[q] - rchar.get(q, 0) for q in pids)
            rchar.update(now)
            samples = sum(r["samples"] for r in per_rank)
            wall = max(r["elapsed_s"] for r in per_rank)
            epochs.append(
                {
                    "mode": mode,
                    "epoch": e + 1,
                    "processes": len(pids),
                    "samples": samples,
                    "rate_per_s": samples / wall,
                    "read_MB": read / 2**20,
                    "pss_MB": sum(_pss_bytes(q) for q in pids) / 2**20,
                    "cache_pss_MB": sum(_memfd_pss(q) for q in pids) / 2**20,
                }
            )
        for p in procs:
            p.stdin.write("stats\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        stats = [json.loads(_expect(p, "STATS")) for p in procs]
        for p in procs:
            p.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    return {"mode": mode, "pss_start_MB": pss0 / 2**20, "epochs": epochs, "cache_stats": stats}


def read_rates(paths: list[str], capacity: int, batch: int, repeats: int) -> dict[str, Any]:
    """Filled in-process vs filled shared cache, same process, same run: records/s."""
    out: dict[str, Any] = {}
    caches = {
        "in-process": MemoryCache(FileSource(paths), capacity),
        "shared": MemoryCache(FileSource(paths), capacity, shared=True),
    }
    n = len(paths)
    order = np.random.default_rng(2).permutation(n).tolist()
    for cache in caches.values():
        cache.preload(progress=False)
    for _ in range(repeats):  # interleaved, best of each: the machine is shared
        for name, cache in caches.items():
            t0 = time.perf_counter()
            for lo in range(0, n, batch):
                cache.read_many(order[lo : lo + batch])
            raw = n / (time.perf_counter() - t0)
            with ff.Loader(cache, HeadBytes(), batch_size=batch, num_threads=2, shuffle=True) as ld:
                for _b in ld:  # warm-up epoch: threads started, buffers allocated
                    pass
                t0 = time.perf_counter()
                for _ in range(5):
                    for _b in ld:
                        pass
                loader = 5 * n / (time.perf_counter() - t0)
            best = out.setdefault(name, {"read_many_per_s": 0.0, "loader_per_s": 0.0})
            best["read_many_per_s"] = max(best["read_many_per_s"], raw)
            best["loader_per_s"] = max(best["loader_per_s"], loader)
    caches["shared"].detach()
    out["ratio_read_many"] = out["shared"]["read_many_per_s"] / out["in-process"]["read_many_per_s"]
    out["ratio_loader"] = out["shared"]["loader_per_s"] / out["in-process"]["loader_per_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=300, help="dataset size, MiB")
    ap.add_argument("--record-kb", type=int, default=100)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--processes", type=int, default=2, help="worker processes per rank")
    ap.add_argument("--threads", type=int, default=2, help="threads per worker process")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="none,shared,per-process")
    ap.add_argument("--out", default="benchmarks/results/shared_cache.json")
    # child-side arguments
    ap.add_argument("--rank-of", dest="mode", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--capacity", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode is not None:
        rank_main(args)
        return
    tmp = Path(tempfile.mkdtemp(prefix="ff-shared-cache-"))
    try:
        paths = write_dataset(tmp / "data", args.mb, args.record_kb)
        dataset = sum(os.path.getsize(p) for p in paths)
        runs = [run_mode(m, args, tmp / "data", dataset) for m in args.modes.split(",")]
        rows = [row for run in runs for row in run["epochs"]]
        print_table(
            rows,
            title=f"{args.ranks} ranks x {args.processes} worker processes, "
            f"{dataset / 2**20:.0f} MiB dataset (machine shared with other jobs)",
        )
        rates = read_rates(paths, dataset, args.batch, args.repeats)
        print_table(
            [{"cache": k, **v} for k, v in rates.items() if isinstance(v, dict)],
            title="filled cache, one process: records/s",
        )
        summary = summarize(runs, dataset, rates)
        print(json.dumps(summary, indent=2))
        write_json(
            args.out,
            {
                "args": vars(args),
                "dataset_bytes": dataset,
                "runs": runs,
                "read_rates": rates,
                "summary": summary,
            },
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def summarize(runs: list[dict[str, Any]], dataset: int, rates: dict[str, Any]) -> dict[str, Any]:
    by = {r["mode"]: r for r in runs}
    out: dict[str, Any] = {"dataset_MB": dataset / 2**20}
    last = {m: r["epochs"][-1] for m, r in by.items()}
    if "none" in last:
        for m in ("shared", "per-process"):
            if m in last:
                growth = last[m]["pss_MB"] - last["none"]["pss_MB"]
                out[f"{m}_pss_growth_over_cache"] = growth / (dataset / 2**20)
    if "shared" in by:
        first = by["shared"]["epochs"][0]
        out["shared_epoch1_read_over_dataset"] = first["read_MB"] / (dataset / 2**20)
        out["shared_cache_pss_over_cache"] = last["shared"]["cache_pss_MB"] / (dataset / 2**20)
        st = by["shared"]["cache_stats"][0]["machine"]
        out["shared_machine_storage_bytes_over_dataset"] = st["storage_bytes"] / dataset
    if "per-process" in by:
        out["per_process_epoch1_read_over_dataset"] = by["per-process"]["epochs"][0]["read_MB"] / (
            dataset / 2**20
        )
    out["epoch2_read_rate_ratio_read_many"] = rates["ratio_read_many"]
    out["epoch2_read_rate_ratio_loader"] = rates["ratio_loader"]
    return out


if __name__ == "__main__":
    main()
