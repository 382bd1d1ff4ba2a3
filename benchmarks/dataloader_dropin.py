"""The drop-in ``fastfeed.DataLoader`` vs torch's DataLoader, per worker_type, in one run.

Two workloads, each a torch map-style Dataset used unchanged by both loaders:

- ``tiny``: 3 KB records held in RAM (``torch.from_numpy`` of a ``np.frombuffer`` copy per
  record), batch 256, shuffled: per-sample overhead dominates.
- ``jpeg``: 500x375 JPEGs held in RAM, decoded + RandomResizedCrop(224) + flip with
  ``fastfeed.image`` (releases the GIL), batch 64, shuffled.

For each: torch ``num_workers`` 0 and 2, and fastfeed ``worker_type`` auto / thread /
process at ``num_workers`` 0 and 2. Throughput (samples/s) is measured over ``--epochs``
epochs after one warm-up epoch, in this process tree; ratios are against torch at
``num_workers=0`` and ``num_workers=2`` of the same run (the machine may be shared: only
same-run ratios mean anything).

Usage::

    python benchmarks/dataloader_dropin.py [--quick] [--out PATH.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

RECORD_BYTES = 3072


class RamJpegs:
    """JPEG bytes in RAM, decoded and cropped per sample with fastfeed.image."""

    def __init__(self, payloads: list[bytes], labels: list[int]) -> None:
        self.payloads, self.labels = payloads, labels
        self.transform: Any = None

    def __len__(self) -> int:
        return len(self.payloads)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        if self.transform is None:
            from fastfeed.image import Compose, RandomHorizontalFlip, RandomResizedCrop

            self.transform = Compose([RandomResizedCrop(224), RandomHorizontalFlip()])
        return self.transform(self.payloads[i]), self.labels[i]


def _throughput(loader: Any, epochs: int) -> tuple[float, str]:
    for _ in loader:  # warm-up epoch (worker start, page faults, ring slots)
        pass
    n = 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        for x, _y in loader:
            n += len(x)
    dt = time.perf_counter() - t0
    return n / dt, getattr(loader, "worker_type", "torch")


def run(workload: str, ds: Any, batch: int, epochs: int) -> list[dict[str, Any]]:
    import torch
    import torch.utils.data as tud

    from fastfeed import DataLoader

    rows: list[dict[str, Any]] = []
    configs: list[tuple[str, int]] = [("torch", 0), ("torch", 2)]
    for wt in ("auto", "thread", "process"):
        configs += [(wt, 0), (wt, 2)]
    for kind, nw in configs:
        g = torch.Generator().manual_seed(0)
        kw = {"batch_size": batch, "shuffle": True, "num_workers": nw, "generator": g}
        if kind == "torch":
            loader: Any = tud.DataLoader(ds, **kw)
        else:
            loader = DataLoader(ds, worker_type=kind, **kw)
        rate, chosen = _throughput(loader, epochs)
        if hasattr(loader, "close"):
            loader.close()
        rows.append(
            {
                "workload": workload,
                "loader": kind,
                "num_workers": nw,
                "ran_as": chosen,
                "samples_per_s": round(rate, 1),
            }
        )
    base0 = next(
        r["samples_per_s"] for r in rows if r["loader"] == "torch" and r["num_workers"] == 0
    )
    base2 = next(
        r["samples_per_s"] for r in rows if r["loader"] == "torch" and r["num_workers"] == 2
    )
    for r in rows:
        r["vs_torch_nw0"] = round(r["samples_per_s"] / base0, 2)
        r["vs_torch_nw2"] = round(r["samples_per_s"] / base2, 2)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer records and epochs")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/dataloader_dropin.json")
    args = ap.parse_args()
    epochs = args.epochs or (2 if args.quick else 3)
    tiny_n = 8192 if args.quick else 32768
    jpeg_n = 256 if args.quick else 1024
    rng = np.random.default_rng(0)
    tiny = _common.RamArrays(
        [rng.integers(0, 256, RECORD_BYTES, dtype=np.uint8).tobytes() for _ in range(tiny_n)],
        rng.integers(0, 10, tiny_n).tolist(),
    )
    payloads, labels = _common.synthetic_jpegs(jpeg_n)
    rows = run("tiny", tiny, 256, epochs) + run("jpeg", RamJpegs(payloads, labels), 64, epochs)
    _common.print_table(rows, title="fastfeed.DataLoader vs torch (same run)")
    path = _common.write_json(args.out, {"epochs": epochs, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
