"""GPU staging: copy bandwidth, consumer wait vs torch's DataLoader, stall reporting.

Needs a CUDA GPU (exits with status 2 and a clear message without one). Three parts:

1. **Bandwidth**: host-to-device bytes/s of the :class:`~fastfeed.pipeline.staging.DeviceStager`
   (side stream, events, hand-over) vs a raw pinned ``copy_`` of the same bytes into a
   preallocated device tensor. Target: >= 90% of raw.
2. **Compute-bound step**: worker threads fill pinned ring slots (crop + flip of uint8
   images held in RAM), the stager copies and finishes them on the GPU (float,
   normalize, channels_last); a synthetic model step (bf16 matmuls, sized to 1.5x the
   slower loader's batch time, ending in ``.item()`` as a loss print would) consumes
   them. Compared with torch's DataLoader (worker processes, ``pin_memory=True``,
   ``.to(device, non_blocking=True)`` and the same finishing on the compute stream) in the
   same run. Target: fastfeed's consumer wait < 2% of step time.
3. **Input-bound step**: the same with a step 4x shorter than loading, to show the
   stall is reported (the recorder's ``stall_fraction``).

Run from the repository root::

    python benchmarks/gpu_staging.py --out bench_out/gpu_staging.json
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from _common import print_table, write_json

from fastfeed.pipeline.collate import Collator
from fastfeed.pipeline.prefetch import Prefetcher
from fastfeed.pipeline.staging import DeviceStager
from fastfeed.profiling import Recorder

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


# -- part 1: bandwidth ------------------------------------------------------------------


def bandwidth(batch_shape: tuple[int, ...], n_batches: int, repeats: int) -> dict[str, Any]:
    """GB/s of raw pinned copy_ vs the stager, median of ``repeats``."""
    dev = torch.device("cuda")
    hosts = [torch.randint(0, 256, batch_shape, dtype=torch.uint8).pin_memory() for _ in range(4)]
    nbytes = hosts[0].numel() * n_batches
    dst = torch.empty(batch_shape, dtype=torch.uint8, device=dev)
    stream = torch.cuda.Stream()

    def raw() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.cuda.stream(stream):
            for i in range(n_batches):
                dst.copy_(hosts[i % 4], non_blocking=True)
        stream.synchronize()
        return time.perf_counter() - t0

    def staged() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with DeviceStager((hosts[i % 4] for i in range(n_batches)), dev) as stager:
            for batch in stager:
                del batch
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    raw(), staged()  # warm-up: CUDA context, allocator, stream creation
    raw_s = statistics.median(raw() for _ in range(repeats))
    staged_s = statistics.median(staged() for _ in range(repeats))
    return {
        "batch_bytes": hosts[0].numel(),
        "batches": n_batches,
        "raw_gb_s": nbytes / raw_s / 1e9,
        "stager_gb_s": nbytes / staged_s / 1e9,
        "ratio": raw_s / staged_s,
    }


# -- data and loaders -------------------------------------------------------------------


class Images(torch.utils.data.Dataset):
    """uint8 images in RAM; a sample is a shifted crop, flipped on odd indices."""

    def __init__(self, n: int, size: int, crop: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.data = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        self.size, self.crop = size, crop

    def __len__(self) -> int:
        return self.data.shape[0]

    def sample_into(self, i: int, out: torch.Tensor) -> None:
        span = self.size - self.crop
        y, x = (i * 7) % (span + 1), (i * 13) % (span + 1)
        src = self.data[i, :, y : y + self.crop, x : x + self.crop]
        out.copy_(src.flip(-1) if i % 2 else src)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        out = torch.empty((3, self.crop, self.crop), dtype=torch.uint8)
        self.sample_into(i, out)
        return out, i % 1000


class _Task:
    def __init__(self, indices: list[int]) -> None:
        self.indices = indices


def fastfeed_batches(
    ds: Images, bs: int, n_batches: int, workers: int, depth: int, rec: Recorder
) -> tuple[Iterator[Any], Callable[[], None]]:
    """Prefetcher + ring + DeviceStager; returns (device batches, close)."""
    col = Collator(pin_memory=True, slots=depth + 4)
    g = torch.Generator().manual_seed(1)
    order = torch.randint(0, len(ds), (n_batches * bs,), generator=g).tolist()
    tasks = [_Task(order[i * bs : (i + 1) * bs]) for i in range(n_batches)]
    shape = (3, ds.crop, ds.crop)

    def build(task: _Task) -> tuple[torch.Tensor, torch.Tensor]:
        with rec.span("transform", items=len(task.indices)):
            images = col.new_batch(len(task.indices), shape, torch.uint8)
            for row, i in enumerate(task.indices):
                ds.sample_into(i, images[row])
            labels = col.labels([i % 1000 for i in task.indices])
        return images, labels

    pf = Prefetcher(
        tasks,
        build,
        num_threads=workers,
        depth=depth,
        recorder=rec,
        report_consumer=False,
        role="bench-worker",
    )
    stager = DeviceStager(
        (b for _, b in pf),
        "cuda",
        collator=col,
        recorder=rec,
        to_float=True,
        mean=MEAN,
        std=STD,
        channels_last=True,
    )

    def close() -> None:
        pf.close()
        stager.close()

    return stager, close


def torch_batches(
    ds: Images, bs: int, n_batches: int, workers: int
) -> tuple[Iterator[Any], Callable[[], None]]:
    """torch DataLoader, pin_memory=True, copy + finishing on the compute stream."""
    g = torch.Generator().manual_seed(1)
    sampler = torch.utils.data.RandomSampler(
        ds, replacement=True, num_samples=n_batches * bs, generator=g
    )
    dl = torch.utils.data.DataLoader(
        ds, batch_size=bs, sampler=sampler, num_workers=workers, pin_memory=True
    )
    mean = torch.tensor(MEAN, device="cuda").view(1, -1, 1, 1)
    std = torch.tensor(STD, device="cuda").view(1, -1, 1, 1)
    # The workers are forked from a process that uses CUDA. A garbage collection in a
    # worker that frees an inherited CUDA object (a pinned buffer, an event) kills it
    # with "CUDA error: initialization error"; freezing the heap before the fork keeps
    # the workers' collector away from everything inherited.
    gc.collect()
    gc.freeze()
    try:
        it = iter(dl)
    finally:
        gc.unfreeze()

    def gen() -> Iterator[Any]:
        for images, labels in it:
            x = images.to("cuda", non_blocking=True)
            x = x.to(dtype=torch.float32, memory_format=torch.channels_last).sub_(mean).div_(std)
            yield x, labels.to("cuda", non_blocking=True)

    def close() -> None:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    return gen(), close


# -- the training loop ------------------------------------------------------------------


def make_step(target_s: float, n: int = 4096) -> tuple[Callable[[torch.Tensor], float], float]:
    """A model step of about ``target_s`` seconds: k bf16 matmuls, then ``.item()``."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16) / math.sqrt(n)
    c = torch.empty_like(a)
    for _ in range(5):
        torch.mm(a, b, out=c)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        torch.mm(a, b, out=c)
    torch.cuda.synchronize()
    per_mm = (time.perf_counter() - t0) / 20
    k = max(1, round(target_s / per_mm))

    def step(x: torch.Tensor) -> float:
        s = x.mean()
        for _ in range(k):
            torch.mm(a, b, out=c)
        return (c[0, 0].float() + s).item()

    return step, k * per_mm


def train(
    batches: Iterator[Any],
    step: Callable[[torch.Tensor], float],
    warm: int,
    steps: int,
    on_timed_start: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Consume ``warm + steps`` batches; wait = time to get a batch (incl. the .to())."""
    waits = []
    t_start = None
    for n in range(warm + steps):
        if n == warm and on_timed_start is not None:
            on_timed_start()
        t0 = time.perf_counter()
        x, _ = next(batches)
        t1 = time.perf_counter()
        if n == warm:
            t_start = t0
        if n >= warm:
            waits.append(t1 - t0)
        step(x)
    assert t_start is not None
    total = time.perf_counter() - t_start
    return {
        "steps": steps,
        "step_ms": 1000 * total / steps,
        "wait_ms": 1000 * sum(waits) / steps,
        "wait_fraction": sum(waits) / total,
        "steps_per_s": steps / total,
    }


def load_time(make: Callable[[int], tuple[Iterator[Any], Callable[[], None]]], n: int) -> float:
    """Seconds per batch with no model at all (after 5 warm-up batches)."""
    batches, close = make(n + 5)
    try:
        for _ in range(5):
            next(batches)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            x, _ = next(batches)
            x.mean().item()
        return (time.perf_counter() - t0) / n
    finally:
        close()


def compare(
    ds: Images, args: argparse.Namespace, step_s: float, label: str
) -> list[dict[str, Any]]:
    step, modeled = make_step(step_s)
    rows = []
    rec = Recorder()
    batches, close = fastfeed_batches(
        ds, args.batch_size, args.warm + args.steps, args.workers, args.depth, rec
    )
    try:
        res = train(batches, step, args.warm, args.steps, on_timed_start=rec.reset)
    finally:
        close()
    snap = rec.snapshot()
    copy = snap["stages"].get("copy", {})
    rows.append(
        {
            "part": label,
            "loader": "fastfeed",
            "model_step_ms": 1000 * modeled,
            **res,
            "recorder_stall_fraction": snap["stall_fraction"],
            "copy_ms_per_batch": 1000 * copy.get("busy_s", 0.0) / max(1, copy.get("count", 1)),
        }
    )
    try:
        batches, close = torch_batches(ds, args.batch_size, args.warm + args.steps, args.workers)
        try:
            res = train(batches, step, args.warm, args.steps)
        finally:
            close()
    except RuntimeError as exc:  # a worker process died: report it, keep the other rows
        print(f"torch DataLoader failed in part {label!r}: {exc}", file=sys.stderr)
        res = {"error": f"{type(exc).__name__}: {exc}"}
    rows.append({"part": label, "loader": "torch", "model_step_ms": 1000 * modeled, **res})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_out/gpu_staging.json", help="JSON output path")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=256, help="stored image side, pixels")
    p.add_argument("--crop", type=int, default=224, help="sample side, pixels")
    p.add_argument("--images", type=int, default=2048, help="images held in RAM")
    p.add_argument("--workers", type=int, default=8, help="threads (fastfeed) / processes")
    p.add_argument("--depth", type=int, default=4, help="batches prefetched")
    p.add_argument("--steps", type=int, default=60, help="timed steps per loader and part")
    p.add_argument("--warm", type=int, default=8, help="untimed warm-up steps")
    p.add_argument("--bw-batches", type=int, default=128, help="batches per bandwidth run")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print(
            "gpu_staging: needs a CUDA GPU, but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}); run it on a GPU machine",
            file=sys.stderr,
        )
        return 2

    gpu = torch.cuda.get_device_name()
    print(f"gpu_staging on {gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    shape = (args.batch_size, 3, args.crop, args.crop)

    bw = bandwidth(shape, args.bw_batches, repeats=3)
    print_table(
        [{"what": "H2D copy", **bw}],
        ["what", "batch_bytes", "batches", "raw_gb_s", "stager_gb_s", "ratio"],
        title="\n1. bandwidth: DeviceStager vs raw pinned copy_ (target ratio >= 0.90)",
    )

    ds = Images(args.images, args.image_size, args.crop)
    t_ff = load_time(
        lambda n: fastfeed_batches(ds, args.batch_size, n, args.workers, args.depth, Recorder()),
        20,
    )
    try:
        t_torch = load_time(lambda n: torch_batches(ds, args.batch_size, n, args.workers), 20)
    except RuntimeError as exc:  # a worker process died: size the step from fastfeed alone
        print(f"torch DataLoader failed while timing loading: {exc}", file=sys.stderr)
        t_torch = float("nan")
    print(
        f"\nloading alone: fastfeed {1000 * t_ff:.2f} ms/batch, "
        f"torch DataLoader {1000 * t_torch:.2f} ms/batch"
    )

    slowest = t_ff if math.isnan(t_torch) else max(t_ff, t_torch)
    rows = compare(ds, args, 1.5 * slowest, "2 step > load")
    rows += compare(ds, args, 0.25 * t_ff, "3 step < load")
    cols = [
        "part",
        "loader",
        "model_step_ms",
        "step_ms",
        "wait_ms",
        "wait_fraction",
        "recorder_stall_fraction",
        "steps_per_s",
        "copy_ms_per_batch",
    ]
    print_table(rows, cols, title="\n2./3. training loop: consumer wait per step")
    ff2 = rows[0]
    verdict = {
        "bandwidth_ratio_ok": bw["ratio"] >= 0.90,
        "compute_bound_wait_ok": ff2["wait_fraction"] < 0.02,
        "input_bound_stall_reported": rows[2]["recorder_stall_fraction"] > 0.2,
        "speedup_vs_torch_compute_bound": (
            ff2["steps_per_s"] / rows[1]["steps_per_s"] if "steps_per_s" in rows[1] else None
        ),
    }
    print("\nverdict:", verdict)
    out = write_json(
        args.out,
        {
            "benchmark": "gpu_staging",
            "gpu": gpu,
            "cuda": torch.version.cuda,
            "params": vars(args),
            "load_ms_per_batch": {
                "fastfeed": 1000 * t_ff,
                "torch": None if math.isnan(t_torch) else 1000 * t_torch,
            },
            "bandwidth": bw,
            "training": rows,
            "verdict": verdict,
        },
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
