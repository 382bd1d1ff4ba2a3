"""Do the verdict's predictions come true? Apply the top action, measure, compare.

Each scenario runs a loader with a model step (a sleep: the GPU's share of a step),
reads ``stats()``, applies the verdict's first action that a program can apply
(``num_workers``/``num_threads``, ``MemoryCache``, ``worker_type="process"``), runs again
and compares the measured throughput ratio with the predicted ``Action.speedup``. The
goal is within +-25%.

    python benchmarks/predictions.py --json predictions.json

Scenarios (constructed, with known answers):

- ``dataset-sleepy-read``: ``fastfeed.DataLoader`` over a plain Dataset whose
  ``__getitem__`` waits 4 ms (a network read), 2 workers, 10 ms step;
- ``source-slow-read``: ``fastfeed.Loader`` over a Source whose reads wait 3 ms each,
  2 threads, 8 ms step;
- ``dataset-python-getitem``: ``fastfeed.DataLoader`` over a Dataset whose
  ``__getitem__`` runs a pure-Python loop, 2 thread workers, 2 ms step (GIL);
- ``source-numpy-transform``: ``fastfeed.Loader`` with a numpy transform on 1 thread
  (CPU; on a machine other processes keep busy the verdict is host-saturated and no
  action applies);
- ``lmdb-iops-bound`` (only with ``--lmdb PACK``, run under a disk quota): a
  ``fastfeed.Loader`` over the pack with a full shuffle, 4 threads, 1 ms step, one cold
  epoch each (page cache dropped first, first batch included); the verdict should name
  the IOPS-bound disk and advise ``shuffle="block"``::

      ../shared/slowdisk --bps 100M --iops 400 --readahead-kb 128 -- \
          python benchmarks/predictions.py --lmdb /tmp/ffslow/jpegs.lmdb --only lmdb-iops-bound

Throughput is measured after the first epoch (start-up and cache filling excluded).
Other processes sharing the machine move the figures; the JSON records the load.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from _common import print_table, write_json

from fastfeed.dataloader import DataLoader
from fastfeed.loader import Loader
from fastfeed.sources import MemoryCache
from fastfeed.sources.base import Record, Source
from fastfeed.stats import LoaderStats


class SleepyDataset:
    """A plain Dataset: ``__getitem__`` waits ``delay_s`` (IO outside the process)."""

    def __init__(self, n: int, delay_s: float) -> None:
        self.n, self.delay_s = n, delay_s

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        time.sleep(self.delay_s)
        return i


class PythonDataset:
    """A plain Dataset whose ``__getitem__`` holds the GIL (a pure-Python loop)."""

    def __init__(self, n: int, loops: int) -> None:
        self.n, self.loops = n, loops

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        s = 0
        for k in range(self.loops):
            s += k * k
        return i + (s & 1)


class SlowSource(Source):
    """A Source whose reads wait ``delay_s`` each (releases the GIL, like storage)."""

    def __init__(self, n: int, delay_s: float) -> None:
        super().__init__()
        self.n, self.delay_s = n, delay_s

    def __len__(self) -> int:
        return self.n

    def describe(self, index: int) -> str:
        return f"slow[{index}]"

    def _read_one(self, index: int) -> Record:
        time.sleep(self.delay_s)
        return Record(index.to_bytes(8, "little"), index % 10)


_NOISE = np.random.default_rng(0).random(150_000)


def numpy_transform(data: Any) -> float:
    return float(np.sqrt(np.abs(np.sin(_NOISE)) + 1.0).sum())


def _batch_len(batch: Any) -> int:
    indices = getattr(batch, "indices", None)
    if isinstance(indices, list):  # fastfeed's Batch
        return len(indices)
    if isinstance(batch, (tuple, list)):
        return len(batch[0])
    return len(batch)


def _run(make: Callable[[], Any], step_s: float, epochs: int) -> tuple[float, LoaderStats]:
    """Samples per second over epochs 2..N (epoch 1 warms up), and the last stats."""
    loader = make()
    try:
        for _ in loader:  # warm-up epoch: workers start, caches fill
            time.sleep(step_s)
        reset = getattr(loader, "recorder", None)
        if reset is not None:
            reset.reset()
        return _timed(loader, step_s, epochs - 1), loader.stats()
    finally:
        loader.close()


def _timed(loader: Any, step_s: float, epochs: int) -> float:
    """Samples per second over ``epochs`` epochs, with a ``step_s`` sleep per batch."""
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            time.sleep(step_s)
            n += _batch_len(batch)
    return n / (time.perf_counter() - t0)


def _run_cold(make: Callable[[], Any], step_s: float, epochs: int) -> tuple[float, LoaderStats]:
    """One cold epoch: the source's files dropped from the page cache, first batch included."""
    from fastfeed.commands import drop_cached, storage_files

    del epochs  # a second epoch would read from the page cache
    loader = make()
    try:
        drop_cached(storage_files(loader.source), loader.source)
        return _timed(loader, step_s, 1), loader.stats()
    finally:
        loader.close()


def _apply(text: str, kwargs: dict[str, Any], source_kind: str) -> dict[str, Any] | None:
    """The loader arguments after the action ``text``; None when a program cannot apply it."""
    out = dict(kwargs)
    m = re.match(r"raise (num_threads|num_workers) from \d+ to (\d+)", text)
    if m:
        out[m.group(1)] = int(m.group(2))
        return out
    m = re.match(r'use worker_type="process" with num_workers=(\d+)', text)
    if m:
        # Persistent, as a training run keeps them: the warm-up epoch pays the start-up.
        out.update(worker_type="process", num_workers=int(m.group(1)), persistent_workers=True)
        return out
    if text == 'read it in runs with Loader(source, shuffle="block")':
        out["shuffle"] = "block"
        return out
    if text.startswith("cache the dataset in RAM") and source_kind == "source":
        out["source"] = MemoryCache(out["source"], capacity=1 << 30)
        return out
    return None


def _scenarios(scale: float, lmdb: str | None) -> list[dict[str, Any]]:
    n = int(320 * scale)
    extra = []
    if lmdb:
        from fastfeed.sources import LMDBSource

        extra.append(
            {
                "name": "lmdb-iops-bound",
                "kind": "source",
                "cold": True,
                "step_s": 0.001,
                "kwargs": {
                    "source": LMDBSource(lmdb),
                    "batch_size": 64,
                    "shuffle": True,
                    "num_threads": 4,
                },
            }
        )
    base = [
        {
            "name": "dataset-sleepy-read",
            "kind": "dataset",
            "step_s": 0.010,
            "kwargs": {"dataset": SleepyDataset(n, 0.004), "batch_size": 8, "num_workers": 2},
        },
        {
            "name": "source-slow-read",
            "kind": "source",
            "step_s": 0.008,
            "kwargs": {"source": SlowSource(n, 0.003), "batch_size": 8, "num_threads": 2},
        },
        {
            "name": "dataset-python-getitem",
            "kind": "dataset",
            "step_s": 0.002,
            "kwargs": {"dataset": PythonDataset(n // 2, 50_000), "batch_size": 8, "num_workers": 2},
        },
        {
            "name": "source-numpy-transform",
            "kind": "source",
            "step_s": 0.002,
            "kwargs": {
                "source": SlowSource(n // 2, 0.0),
                "transform": numpy_transform,
                "batch_size": 4,
                "num_threads": 1,
            },
        },
    ]
    return [*extra, *base]


def _maker(kind: str, kwargs: dict[str, Any]) -> Callable[[], Any]:
    if kind == "dataset":
        return lambda: DataLoader(**kwargs)
    return lambda: Loader(**kwargs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3, help="epochs per run (the first warms up)")
    ap.add_argument("--scale", type=float, default=1.0, help="dataset size factor")
    ap.add_argument("--only", default=None, help="run only the scenario with this name")
    ap.add_argument("--lmdb", default=None, help="a pack on a throttled disk: lmdb-iops-bound")
    ap.add_argument("--json", default="predictions.json")
    args = ap.parse_args()

    rows = []
    for sc in _scenarios(args.scale, args.lmdb):
        if args.only and sc["name"] != args.only:
            continue
        run = _run_cold if sc.get("cold") else _run
        before, stats = run(_maker(sc["kind"], sc["kwargs"]), sc["step_s"], args.epochs)
        v = stats.verdict
        row: dict[str, Any] = {
            "scenario": sc["name"],
            "verdict": f"{v.bound.value}/{v.bottleneck.value}",
            "others_cores": round(stats.others_cores or 0.0, 2),
            "before_per_s": round(before),
        }
        applied = None
        for action in v.actions:
            if action.speedup is None:
                continue
            new_kwargs = _apply(action.text, sc["kwargs"], sc["kind"])
            if new_kwargs is not None:
                applied = (action, new_kwargs)
                break
        if applied is None:
            row.update(action="(none a program can apply)", predicted_x=None, measured_x=None)
            rows.append(row)
            print(f"{sc['name']}: {v.sentence}", file=sys.stderr)
            continue
        action, new_kwargs = applied
        after, _ = run(_maker(sc["kind"], new_kwargs), sc["step_s"], args.epochs)
        measured = after / before
        row.update(
            action=action.text,
            predicted_x=round(action.speedup or 0.0, 2),
            measured_x=round(measured, 2),
            after_per_s=round(after),
            error=f"{100 * ((action.speedup or 0.0) / measured - 1):+.0f}%",
        )
        rows.append(row)
    print_table(rows, title="predicted vs measured speed-up of the verdict's top action")
    path = write_json(args.json, {"benchmark": "predictions", "args": vars(args), "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
