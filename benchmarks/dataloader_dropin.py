"""The drop-in ``fastfeed.DataLoader`` vs torch's DataLoader, per worker_type, in one run.

Two workloads, each a torch map-style Dataset used unchanged by both loaders:

- ``tiny``: 3 KB records held in RAM (``torch.from_numpy`` of a ``np.frombuffer`` copy per
  record), batch 256, shuffled: per-sample overhead dominates.
- ``jpeg``: 500x375 JPEGs held in RAM, decoded + RandomResizedCrop(224) + flip with
  ``fastfeed.image`` (releases the GIL), batch 64, shuffled.

For each: torch ``num_workers`` 0 and 2, fastfeed ``worker_type`` auto / thread /
process at ``num_workers`` 0 and 2, and auto / thread again with ``profile=False`` (what
the profiler's hooks cost); then torch, auto and process at ``num_workers=2`` with
``persistent_workers=True`` (``vs_torch_nw2`` compares with torch's ``num_workers=2``
of the same ``persistent_workers``). Every loader is built and warmed up (one epoch) first; then
``--rounds`` alternating rounds time each loader over ``--epochs`` epochs (loaders that
fork worker processes in a group of their own, after the others: see :func:`run`), and
the median round is reported, so load from other work on a shared machine hits every loader alike.
Each timed run starts settled (:func:`_settle`): ``gc.collect()`` (a full collection
costs ~90 ms here, 170k tracked objects, and otherwise lands on whichever loader
allocates past the threshold: in one run always the first fastfeed loader), and one
write to each record (the copy-on-write faults left by a loader that forked workers
otherwise land on the loader timed after it). Ratios are
against torch at ``num_workers=0`` and ``num_workers=2`` of the same run;
``samples_per_cpu_s`` (samples per CPU-second of this process, for loaders whose work all
runs in it) is steadier than wall time on a busy machine.

Usage::

    python benchmarks/dataloader_dropin.py [--quick] [--epochs N] [--rounds N] [--out PATH.json]
"""

from __future__ import annotations

import argparse
import gc
import statistics
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


def _settle(ds: Any) -> None:
    """Make the next timed run start clean: collect garbage, and write once to every
    record object (iterating a list increments each element's reference count).

    After a loader that forked worker processes every page of this process is
    copy-on-write; the first write to each page faults. Without this, the loader timed
    right after torch's ``num_workers=2`` paid ~32k page faults for the records' reference
    counts: measured 0.74x of torch's ``num_workers=0`` in CPU per sample there, 0.98x
    for the same loader one place later.
    """
    gc.collect()
    for value in vars(ds).values():
        if isinstance(value, list):
            for _ in value:
                pass


def _epochs(loader: Any, ds: Any, epochs: int) -> tuple[float, float]:
    """Samples per second of wall time and per CPU-second of this process, over
    ``epochs`` epochs (settled first: see :func:`_settle`)."""
    _settle(ds)
    n = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(epochs):
        for x, _y in loader:
            n += len(x)
    return n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9)


def run(workload: str, ds: Any, batch: int, epochs: int, rounds: int) -> list[dict[str, Any]]:
    import torch
    import torch.utils.data as tud

    from fastfeed import DataLoader

    # (loader, num_workers, profile, persistent_workers)
    configs: list[tuple[str, int, bool, bool]] = [("torch", 0, True, False)]
    configs += [("torch", 2, True, False), ("torch", 2, True, True)]
    for wt in ("auto", "thread", "process"):
        configs += [(wt, 0, True, False), (wt, 2, True, False)]
    for wt in ("auto", "thread"):
        configs += [(wt, 0, False, False), (wt, 2, False, False)]
    configs += [("auto", 2, True, True), ("process", 2, True, True)]
    loaders: list[Any] = []
    for kind, nw, profile, persistent in configs:
        g = torch.Generator().manual_seed(0)
        kw: dict[str, Any] = {"batch_size": batch, "shuffle": True, "num_workers": nw}
        kw["generator"] = g
        kw["persistent_workers"] = persistent
        if kind == "torch":
            loaders.append(tud.DataLoader(ds, **kw))
        else:
            loaders.append(DataLoader(ds, worker_type=kind, profile=profile, **kw))
        _epochs(loaders[-1], ds, 1)  # warm-up epoch (worker start, page faults, ring slots)
    rates: list[list[tuple[float, float]]] = [[] for _ in configs]
    # Loaders that fork worker processes leave the next loader timed after them paying
    # copy-on-write faults on pages other than the records (which _settle touches): the
    # in-process loaders, timed right after torch's or fastfeed's process workers, ran
    # 3-4% below the same loaders timed after another in-process one. So the two kinds
    # alternate in separate groups, the in-process group first.
    forks = [
        nw > 0 and getattr(loader, "worker_type", "process") == "process"
        for (_kind, nw, _p, _w), loader in zip(configs, loaders, strict=True)
    ]
    for group in (False, True):
        for _ in range(rounds):  # alternating: every config of the group once per round
            for i, loader in enumerate(loaders):
                if forks[i] == group:
                    rates[i].append(_epochs(loader, ds, epochs))
    rows: list[dict[str, Any]] = []
    for (kind, nw, profile, persistent), loader, r in zip(configs, loaders, rates, strict=True):
        if hasattr(loader, "close"):
            loader.close()
        ran_as = getattr(loader, "worker_type", "torch")
        in_process = nw == 0 or ran_as == "thread"  # else workers' CPU is not counted
        cpu = statistics.median(c for _, c in r)
        rows.append(
            {
                "workload": workload,
                "loader": kind,
                "num_workers": nw,
                "profile": profile,
                "persistent": persistent,
                "ran_as": ran_as,
                "samples_per_s": round(statistics.median(w for w, _ in r), 1),
                "samples_per_cpu_s": round(cpu, 1) if in_process else None,
                "rounds_samples_per_s": [round(w, 1) for w, _ in r],
            }
        )
    base0 = rows[0]["samples_per_s"]
    base2 = {False: rows[1]["samples_per_s"], True: rows[2]["samples_per_s"]}
    cpu0 = rows[0]["samples_per_cpu_s"]
    for row in rows:
        row["vs_torch_nw0"] = round(row["samples_per_s"] / base0, 2)
        # against torch's num_workers=2 with the same persistent_workers
        row["vs_torch_nw2"] = round(row["samples_per_s"] / base2[row["persistent"]], 2)
        cpu = row["samples_per_cpu_s"]
        row["cpu_vs_torch_nw0"] = None if cpu is None else round(cpu / cpu0, 2)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer records and epochs")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per timed run")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (median)")
    ap.add_argument("--out", default="benchmarks/results/dataloader_dropin.json")
    args = ap.parse_args()
    epochs = args.epochs or 1
    rounds = args.rounds or (3 if args.quick else 5)
    tiny_n = 8192 if args.quick else 32768
    jpeg_n = 256 if args.quick else 1024
    rng = np.random.default_rng(0)
    tiny = _common.RamArrays(
        [rng.integers(0, 256, RECORD_BYTES, dtype=np.uint8).tobytes() for _ in range(tiny_n)],
        rng.integers(0, 10, tiny_n).tolist(),
    )
    payloads, labels = _common.synthetic_jpegs(jpeg_n)
    rows = run("tiny", tiny, 256, epochs, rounds)
    rows += run("jpeg", RamJpegs(payloads, labels), 64, epochs, max(1, rounds - 2))
    columns = [k for k in rows[0] if k != "rounds_samples_per_s"]
    _common.print_table(rows, columns=columns, title="fastfeed.DataLoader vs torch (same run)")
    path = _common.write_json(args.out, {"epochs": epochs, "rounds": rounds, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
