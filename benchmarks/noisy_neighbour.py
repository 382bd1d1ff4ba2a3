"""How much a loader slows a Python-bound training step running beside it (the GIL).

A training step that is bound by Python (a loop of small torch ops: what launching CUDA
kernels looks like for small and medium models) is timed alone and beside each loader
delivering ImageNet-like JPEG batches (decode + RandomResizedCrop 224 + flip) with ONE
worker. Only the step itself is timed (not the wait for the batch); the figure is the
median step time over the measured steps, and the inflation is its ratio to the step
alone, measured in the same child process before the loader starts and after it stops
(the mean of the two medians).

With two or more cores, each side gets a core of its own (``sched_setaffinity``): the
training loop the first, the loader's worker thread or process the second, so the figure
is the loader's interference through the GIL, not a fight for a core.

Loaders (each in a fresh child process, all in one run):

- ``fastfeed.Loader`` with ``processes=0`` (one worker thread in the training process),
- ``fastfeed.Loader`` with ``processes=1`` (one worker process running one thread),
- torch's ``DataLoader(num_workers=1)`` over a Dataset doing the same transform.

Usage::

    python benchmarks/noisy_neighbour.py [--steps 150] [--jpeg-n 512] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

BATCH = 16


def _step(x: Any, ops: int) -> Any:
    # ~`ops` tiny torch ops: the interpreter, not the math, sets the pace.
    for _ in range(ops):
        x = x * 1.0001 + 0.5
    return x


def _pin_tasks(pid: int, cpu: int) -> None:
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except OSError:
            pass


def _pin_worker(_worker_id: int) -> None:
    # torch's worker_init_fn: the worker process gets the second core to itself.
    if len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[1]})


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    import fastfeed as ff
    from fastfeed import image

    torch.set_num_threads(1)
    cpus = sorted(os.sched_getaffinity(0))
    pin = spec.get("pin", True) and len(cpus) >= 2
    if pin:  # "each side a core of its own": the training loop on the first core
        os.sched_setaffinity(0, {cpus[0]})
    x = torch.zeros(8)
    steps, ops = spec["steps"], spec["ops"]
    # The step alone, first (after a warm-up): the baseline of this very process.
    for _ in range(50):
        x = _step(x, ops)
    alone = []
    for _ in range(steps):
        t0 = time.perf_counter()
        x = _step(x, ops)
        alone.append(time.perf_counter() - t0)
    transform = image.Compose([image.RandomResizedCrop(224), image.RandomHorizontalFlip()])
    kind = spec["loader"]
    source = ff.FileSource.from_folder(spec["jpeg_root"])
    if kind == "torch":

        class Images(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return len(source)

            def __getitem__(self, i: int) -> Any:
                rec = source.read(i)
                return transform(rec.data), rec.label

        loader: Any = torch.utils.data.DataLoader(
            Images(),
            batch_size=BATCH,
            shuffle=True,
            num_workers=1,
            worker_init_fn=_pin_worker if pin else None,
            persistent_workers=True,
        )
    else:
        loader = ff.Loader(
            source,
            transform,
            batch_size=BATCH,
            shuffle=True,
            num_threads=1,
            processes=spec["processes"],
            read_ahead=False,
        )
    beside = []
    waits = []
    if pin and kind != "torch":
        it0 = iter(loader)
        next(it0)  # start the workers, then give them the second core
        del it0
        if spec["processes"] > 0:
            for pid in loader._pipeline._pool.pids:
                _pin_tasks(pid, cpus[1])
        for t in threading.enumerate():
            if t.name.startswith("fastfeed-") and t.native_id is not None:
                os.sched_setaffinity(t.native_id, {cpus[1]})
    while len(beside) < steps:
        it = iter(loader)
        t_wait = time.perf_counter()
        for _batch in it:
            t0 = time.perf_counter()
            waits.append(t0 - t_wait)
            x = _step(x, ops)
            t_wait = time.perf_counter()
            beside.append(t_wait - t0)
            if len(beside) >= steps:
                break
        del it
    close = getattr(loader, "close", None)
    if close is not None:
        close()
    del loader
    # The step alone again, after the loader stopped: the baseline is the mean of the two
    # medians, so a drift of the machine during the run does not count as the loader's.
    after = []
    for _ in range(steps):
        t0 = time.perf_counter()
        x = _step(x, ops)
        after.append(time.perf_counter() - t0)
    a = (statistics.median(alone) + statistics.median(after)) / 2
    b = statistics.median(beside[5:])
    return {
        "loader": spec["name"],
        "step_alone_ms": a * 1e3,
        "step_beside_ms": b * 1e3,
        "inflation": b / a - 1.0,
        "median_wait_ms": statistics.median(waits[5:]) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--ops", type=int, default=1000, help="tiny torch ops per step")
    parser.add_argument("--jpeg-n", type=int, default=512)
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results/noisy_neighbour.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))), flush=True)
        return
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="ff-noisy-"))
    root = work / "jpegs"
    if not root.exists():
        payloads, labels = _common.synthetic_jpegs(args.jpeg_n, size=(500, 375), seed=2)
        _common.write_jpeg_folder(root, payloads, labels)
    runs = [
        {"name": "fastfeed.Loader processes=0 (1 thread)", "loader": "ff", "processes": 0},
        {"name": "fastfeed.Loader processes=1 (1 thread)", "loader": "ff", "processes": 1},
        {"name": "torch DataLoader(num_workers=1)", "loader": "torch"},
    ]
    rows = []
    for run in runs:
        spec = dict(run, steps=args.steps, ops=args.ops, jpeg_root=str(root))
        out = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if out.returncode != 0:
            raise RuntimeError(f"{run['name']} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for r in rows:
        r["inflation_pct"] = round(100 * r["inflation"], 1)
    _common.print_table(
        rows,
        ["loader", "step_alone_ms", "step_beside_ms", "inflation_pct", "median_wait_ms"],
    )
    path = _common.write_json(
        args.out, {"environment": _common.environment(), "args": vars(args), "rows": rows}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
