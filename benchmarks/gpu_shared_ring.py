"""Host-to-device copy rate from the CUDA-registered shared ring vs a raw pinned buffer.

1. Raw copies (same process, same size, one side stream): ``torch.empty(pin_memory=True)``
   (the ceiling), a :class:`~fastfeed.workers.shm.SharedRing` slot registered with
   ``cudaHostRegister`` (what worker processes write into), and pageable memory.
2. End to end: ``Loader(processes=2, device="cuda")`` vs ``Loader(processes=0,
   device="cuda")`` over the same synthetic fixed-shape batches: the stager's measured
   ``copy`` stage rate (bytes / copy busy time) and the loader's batches/s.

Usage (needs a GPU)::

    python benchmarks/gpu_shared_ring.py [--mb 64] [--out benchmarks/results/gpu_shared_ring.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

import fastfeed as ff
from fastfeed.workers.shm import Layout, SharedRing, TensorRef


def _rate(src: torch.Tensor, iters: int) -> float:
    dst = torch.empty(src.numel(), dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            dst.copy_(src, non_blocking=True)
    stream.synchronize()
    t0 = time.perf_counter()
    with torch.cuda.stream(stream):
        for _ in range(iters):
            dst.copy_(src, non_blocking=True)
    stream.synchronize()
    return src.numel() * iters / (time.perf_counter() - t0) / 1e9


def raw_rates(mb: int, iters: int) -> list[dict[str, Any]]:
    n = mb << 20
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(1)
    pageable = torch.empty(n, dtype=torch.uint8).fill_(1)
    ring = SharedRing(1, pin=True)
    slot, fd = ring.take()  # type: ignore[misc]
    os.ftruncate(fd, n)  # what a worker does when a batch needs more room
    data, _ = ring.open(Layout(slot, n, TensorRef(0, (n,), (1,), torch.uint8), None))
    data.fill_(1)
    assert ring.stats()["live_bytes"] == n
    rows = []
    ceiling = _rate(pinned, iters)
    for name, t in (
        ("pinned (torch)", pinned),
        ("shared ring (registered)", data),
        ("pageable", pageable),
    ):
        gbs = ceiling if t is pinned else _rate(t, iters)
        rows.append({"source": name, "mb": mb, "gb_per_s": gbs, "vs_pinned": gbs / ceiling})
    del data
    ring.close()
    return rows


class Blocks(ff.Source):
    """``n`` 16-byte records (module level: worker processes unpickle it under spawn)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def __len__(self) -> int:
        return self.n

    def describe(self, index: int) -> str:
        return f"block[{index}]"

    def _read_one(self, index: int) -> ff.Record:
        return ff.Record(bytes([index % 251]) * 16, index % 10)


class Expand:
    """Fixed-shape transform: fills a uint8 3x224x224 row with the record's first byte."""

    def sample_spec(self) -> Any:
        return (3, 224, 224), torch.uint8

    def __call__(self, data: Any, out: Any = None) -> Any:
        out.fill_(data[0])
        return out


def loader_rates(batches: int) -> list[dict[str, Any]]:
    rows = []
    for procs in (0, 2):
        with ff.Loader(
            Blocks((batches + 1) * 64),
            Expand(),
            batch_size=64,
            num_threads=2,
            processes=procs,
            device="cuda",
            start_method="spawn",
        ) as ld:
            it = iter(ld)
            next(it)  # start-up (spawning workers) is not the steady copy rate
            t0 = time.perf_counter()
            n = 0
            for _x, _y in it:
                n += 1
            torch.cuda.synchronize()
            el = time.perf_counter() - t0
            copy = ld.recorder.snapshot()["stages"]["copy"]
            ring = ld._pipeline.ring_stats()
        rows.append(
            {
                "loader": f"Loader(processes={procs}, device='cuda')",
                "batches_per_s": n / el,
                "copy_gb_per_s": copy["bytes"] / copy["busy_s"] / 1e9 if copy["busy_s"] else None,
                "ring_pinned": ring.get("pinned"),
                "ring_reuses": ring.get("reuses"),
                "ring_retired": ring.get("retired"),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=64)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--batches", type=int, default=150)
    parser.add_argument("--out", default="benchmarks/results/gpu_shared_ring.json")
    args = parser.parse_args()
    raw = raw_rates(args.mb, args.iters)
    _common.print_table(raw, title="raw H2D copies (one side stream)")
    loaders = loader_rates(args.batches)
    _common.print_table(loaders, title="\nend to end (uint8 3x224x224, batch 64)")
    path = _common.write_json(
        args.out, {"environment": _common.environment(), "raw": raw, "loaders": loaders}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
