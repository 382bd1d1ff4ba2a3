"""Single-core cost per image of decode + crop + flip + uint8 CHW: naive vs fastfeed.image.

Run from the repository root::

    python benchmarks/image_decode.py --count 200 --json bench_out/image_decode.json

One thread, ``torch.set_num_threads(1)``. Images are ImageNet-like JPEGs (320-640 x
240-500, quality 90, gradients + texture + noise, ~50-150 KB), and the same images
pre-resized to max side 320 (what ``fastfeed pack --max-side 320`` stores: Pillow
thumbnail, re-encoded at quality 90).

Pipelines, each ending in a (3, 224, 224) uint8 row of a preallocated batch:

- ``naive``: the torchvision way on PIL: ``Image.open`` → ``convert("RGB")`` →
  RandomResizedCrop (``crop`` then ``resize``, bilinear) → flip → ``pil_to_tensor``
  (``np.array`` copy + permute) → copy into the batch row (what ``torch.stack`` does).
- ``fastfeed``: ``fastfeed.image.Compose([RandomResizedCrop(224), RandomHorizontalFlip()])``
  with ``out=row``: header-first crop planning, JPEG draft when the crop allows, one
  resample of the crop box, flip + transpose folded into the copy into the row.
- ``fastfeed ..., Pillow``: the same pipeline with partial JPEG decode turned off
  (``fastfeed.image._jpeg.set_enabled(False)``): every JPEG through Pillow, as before
  partial decode. The rows without ``, Pillow`` decode only the crop window through
  nvImageCodec (present only where ``nvidia-nvimgcodec-cu12`` is installed).
- ``eval`` variants: Resize(256) + CenterCrop(224), naive vs fastfeed.
- ``decode only``: ``Image.open`` + ``load`` (the floor both pipelines share).

``--decoders`` adds a survey of JPEG decoder libraries on the same images (each one that
imports: Pillow, simplejpeg, OpenCV, imagecodecs, PyTurboJPEG, nvImageCodec full and
RandomResizedCrop window), CPU ms per image of the whole process.

Each figure is the best of ``--repeats`` passes (wall ms and this thread's CPU ms per
image); the CPU figure is less disturbed by other processes sharing the machine.

GIL-held fraction (second table). fastfeed's workers are threads, so a pipeline scales
with threads only up to ``1 / (fraction of its time that holds the GIL)`` (Amdahl). For
each pipeline, a child process runs it on one thread for ``--gil-seconds`` on the
original images, and the fraction is measured by one of two methods:

- ``py-spy`` (used when ``py-spy`` is on PATH; needs ptrace permission): the child runs
  twice, under ``py-spy record --gil`` (samples only while the worker holds the GIL) and
  under plain ``py-spy record`` (samples while it runs); fraction = GIL samples / samples
  of the worker thread. This is the method to trust.
- ``counter`` (fallback, ``--gil-method counter``): in-process, with
  ``sys.setswitchinterval(1e-4)``, a second thread counts in a pure-Python loop, which
  advances only while the worker does not hold the GIL. Its rate beside the pipeline is
  compared with its rate beside a GIL-free CPU burner (``hashlib.sha256`` of 1 MiB, which
  releases the GIL), so CPU contention from the burner thread is cancelled out:
  GIL-held s/image = (1 - rate_pipeline / rate_burner) x window_s / images, divided by the
  single-thread CPU s/image. It needs two idle cores: on a loaded machine it is noise.

``--gil-method none`` skips the table. A py-spy run that fails (no ptrace permission, a
child that died, a timeout) no longer ends the benchmark before the table: the reason goes
to stderr and that row is measured by the counter method (its ``method`` says so).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _common import environment, print_table, write_json
from PIL import Image

import fastfeed.image as ffi
from fastfeed import rng as _rng
from fastfeed.image import _jpeg

_OUT = 224


def _photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Gradients + smooth blobs + mild noise: JPEG size and decode cost like a photo."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, 3) + x[..., None] * rng.uniform(-0.4, 0.4, 3)
    base = base + y[..., None] * rng.uniform(-0.4, 0.4, 3)
    blobs = rng.uniform(0, 255, (height // 6 + 1, width // 6 + 1, 3)).astype(np.uint8)
    texture = np.asarray(Image.fromarray(blobs).resize((width, height), Image.BICUBIC))
    img = 0.5 * base + 0.5 * texture + rng.normal(0, 14, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """``count`` JPEGs of random size in 320-640 x 240-500, quality 90."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        width, height = int(rng.integers(320, 641)), int(rng.integers(240, 501))
        buf = io.BytesIO()
        Image.fromarray(_photo(rng, width, height)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def pre_resize(payloads: list[bytes], max_side: int = 320) -> list[bytes]:
    """Re-encode with Pillow ``thumbnail((max_side, max_side))`` at quality 90."""
    out = []
    for data in payloads:
        img = Image.open(io.BytesIO(data))
        img.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _tv_get_params(width: int, height: int, rnd: random.Random) -> tuple[int, int, int, int]:
    # torchvision RandomResizedCrop.get_params, scale (0.08, 1), ratio (3/4, 4/3).
    area = width * height
    for _ in range(10):
        target_area = area * rnd.uniform(0.08, 1.0)
        aspect = math.exp(rnd.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rnd.randint(0, height - h), rnd.randint(0, width - w), h, w
    side = min(width, height)
    return (height - side) // 2, (width - side) // 2, side, side


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    # torchvision.transforms.functional.pil_to_tensor
    return torch.as_tensor(np.array(img, copy=True)).permute(2, 0, 1)


def naive_train(data: bytes, row: torch.Tensor, rnd: random.Random) -> None:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    top, left, h, w = _tv_get_params(img.width, img.height, rnd)
    img = img.crop((left, top, left + w, top + h)).resize((_OUT, _OUT), Image.BILINEAR)
    if rnd.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    row.copy_(_pil_to_tensor(img))


def naive_eval(data: bytes, row: torch.Tensor, rnd: random.Random) -> None:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    # torchvision Resize(256): shorter side 256, longer side int(256 * long / short).
    if img.width <= img.height:
        size = (256, int(256 * img.height / img.width))
    else:
        size = (int(256 * img.width / img.height), 256)
    img = img.resize(size, Image.BILINEAR)
    left = round((img.width - _OUT) / 2)
    top = round((img.height - _OUT) / 2)
    img = img.crop((left, top, left + _OUT, top + _OUT))
    row.copy_(_pil_to_tensor(img))


def decode_only(data: bytes, row: torch.Tensor, rnd: random.Random) -> None:
    Image.open(io.BytesIO(data)).load()


def _fastfeed(
    pipeline: ffi.ImagePipeline, partial: bool = True
) -> Callable[[bytes, torch.Tensor, random.Random], None]:
    """``pipeline(data, out=row)``; ``partial=False`` turns partial JPEG decode off (Pillow)."""

    def run(data: bytes, row: torch.Tensor, rnd: random.Random) -> None:
        old = _jpeg.set_enabled(partial)
        try:
            pipeline(data, out=row)
        finally:
            _jpeg.set_enabled(old)

    return run


def _train() -> ffi.ImagePipeline:
    return ffi.Compose([ffi.RandomResizedCrop(_OUT), ffi.RandomHorizontalFlip()])


def _eval() -> ffi.ImagePipeline:
    return ffi.Compose([ffi.Resize(256), ffi.CenterCrop(_OUT)])


def _fastfeed_pipelines() -> dict[str, Callable[[bytes, torch.Tensor, random.Random], None]]:
    """fastfeed's train and eval pipelines, with partial JPEG decode (when nvImageCodec is
    installed) and on the Pillow path (what fastfeed did before partial decode)."""
    rows = {}
    for kind, make in (("train (RRC+flip)", _train), ("eval (Resize+CenterCrop)", _eval)):
        rows[f"fastfeed {kind}, Pillow"] = _fastfeed(make(), partial=False)
        if _jpeg.available():
            rows[f"fastfeed {kind}"] = _fastfeed(make(), partial=True)
    return rows


def measure(
    fn: Callable[[bytes, torch.Tensor, random.Random], None],
    payloads: list[bytes],
    repeats: int,
) -> tuple[float, float]:
    """Best (wall ms, CPU ms) per image over ``repeats`` passes."""
    batch = torch.empty((len(payloads), 3, _OUT, _OUT), dtype=torch.uint8)
    best_wall = best_cpu = float("inf")
    for rep in range(repeats):
        rnd = random.Random(rep)
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        for i, data in enumerate(payloads):
            _rng.set_sample_key((rep, 0, i))
            fn(data, batch[i], rnd)
        wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
        best_wall, best_cpu = min(best_wall, wall), min(best_cpu, cpu)
    _rng.set_sample_key(None)
    return best_wall / len(payloads) * 1e3, best_cpu / len(payloads) * 1e3


def _rrc_windows(payloads: list[bytes], seed: int = 0) -> list[tuple[int, int, int, int]]:
    """One torchvision RandomResizedCrop window (x0, y0, x1, y1) per image."""
    rnd = random.Random(seed)
    boxes = []
    for data in payloads:
        width, height = Image.open(io.BytesIO(data)).size
        top, left, h, w = _tv_get_params(width, height, rnd)
        boxes.append((left, top, left + w, top + h))
    return boxes


def decoder_rows(payloads: list[bytes], repeats: int) -> list[dict]:
    """The decoder survey: each library that imports here, on the same images.

    CPU ms per image of the whole process (``time.process_time``), so a decoder that
    works on threads of its own is charged in full; one core (torch and OpenCV told so).
    "RRC window" rows decode only each image's RandomResizedCrop window where the
    library can (the others would decode everything and crop).
    """
    boxes = _rrc_windows(payloads)
    candidates: list[tuple[str, str, Callable[[], Callable[[bytes, tuple], object]]]] = []

    def pillow_full() -> Callable:
        return lambda data, box: Image.open(io.BytesIO(data)).load()

    candidates.append(("Pillow", "full decode", pillow_full))

    def simplejpeg_full() -> Callable:
        import simplejpeg

        return lambda data, box: simplejpeg.decode_jpeg(data)

    candidates.append(("simplejpeg", "full decode", simplejpeg_full))

    def opencv_full() -> Callable:
        import cv2

        cv2.setNumThreads(1)
        return lambda data, box: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)

    candidates.append(("opencv-python-headless", "full decode", opencv_full))

    def imagecodecs_full() -> Callable:
        import imagecodecs

        return lambda data, box: imagecodecs.jpeg8_decode(data)

    candidates.append(("imagecodecs (jpeg8)", "full decode", imagecodecs_full))

    def turbojpeg_full() -> Callable:
        from turbojpeg import TurboJPEG  # needs a system libturbojpeg

        jpeg = TurboJPEG()
        return lambda data, box: jpeg.decode(data)

    candidates.append(("PyTurboJPEG", "full decode", turbojpeg_full))

    def nv_full() -> Callable:
        if not _jpeg.available():
            raise ImportError("nvidia-nvimgcodec-cu12 is not installed")

        def run(data: bytes, box: tuple) -> object:
            header = _jpeg.open_jpeg(data)
            return _jpeg.decode_region(header, (0, 0, *header.size), "RGB")

        return run

    def nv_region() -> Callable:
        nv_full()

        def run(data: bytes, box: tuple) -> object:
            return _jpeg.decode_region(_jpeg.open_jpeg(data), box, "RGB")

        return run

    candidates.append(("nvImageCodec CPU", "full decode", nv_full))
    candidates.append(("nvImageCodec CPU", "RRC window", nv_region))
    rows = []
    for library, what, make in candidates:
        try:
            fn = make()
            fn(payloads[0], boxes[0])
        except Exception as exc:  # not installed, or no system library
            rows.append(
                {
                    "decoder": library,
                    "decodes": what,
                    "cpu ms/img": None,
                    "note": f"unavailable: {type(exc).__name__}: {str(exc)[:60]}",
                }
            )
            continue
        best = float("inf")
        for _ in range(repeats):
            cpu0 = time.process_time()
            for data, box in zip(payloads, boxes, strict=True):
                fn(data, box)
            best = min(best, time.process_time() - cpu0)
        rows.append(
            {
                "decoder": library,
                "decodes": what,
                "cpu ms/img": round(best / len(payloads) * 1e3, 3),
                "note": "",
            }
        )
    return rows


_GIL_PIPELINES = {
    "naive train (RRC+flip)": lambda: naive_train,
    "fastfeed train (RRC+flip), Pillow": lambda: _fastfeed(_train(), partial=False),
    "fastfeed train (RRC+flip)": lambda: _fastfeed(_train()),
    "naive eval (Resize+CenterCrop)": lambda: naive_eval,
    "fastfeed eval (Resize+CenterCrop), Pillow": lambda: _fastfeed(_eval(), partial=False),
    "fastfeed eval (Resize+CenterCrop)": lambda: _fastfeed(_eval()),
}
_GIL_IMAGES = 32


def _gil_worker_loop(
    fn: Callable[[bytes, torch.Tensor, random.Random], None],
    payloads: list[bytes],
    seconds: float,
) -> int:
    """Run ``fn`` over ``payloads`` for ``seconds`` (py-spy finds this frame); return images."""
    row = torch.empty((3, _OUT, _OUT), dtype=torch.uint8)
    rnd = random.Random(0)
    end = time.perf_counter() + seconds
    count = 0
    while time.perf_counter() < end:
        _rng.set_sample_key((0, 0, count))
        fn(payloads[count % len(payloads)], row, rnd)
        count += 1
    _rng.set_sample_key(None)
    return count


def _gil_child(pipeline: str, seconds: float) -> None:
    """Child process body: the pipeline on one named thread, nothing else running."""
    torch.set_num_threads(1)
    payloads = make_jpegs(_GIL_IMAGES, seed=1)
    fn = _GIL_PIPELINES[pipeline]()
    _gil_worker_loop(fn, payloads[:4], 0.2)  # warm up imports and allocations
    worker = threading.Thread(
        target=_gil_worker_loop, args=(fn, payloads, seconds), name="fastfeed-bench-0"
    )
    worker.start()
    worker.join(timeout=seconds + 60)


def _worker_samples(raw_path: Path) -> int:
    """Samples of the worker thread in a py-spy ``--format raw`` file.

    Only stacks that start in a thread's bootstrap: the warm-up call on the main thread
    (first-call imports, first allocations) also runs ``_gil_worker_loop`` and, counted,
    added 12% to the GIL samples of the fast train pipeline (27 of 222 in one run).
    """
    total = 0
    with open(raw_path) as fh:
        for line in fh:
            stack, _, count = line.rstrip().rpartition(" ")
            first = stack.split(";", 1)[0]
            worker = "_bootstrap" in first and "_gil_worker_loop" in stack
            if worker and count.isdigit():
                total += int(count)
    return total


def gil_fraction_pyspy(pipeline: str, seconds: float, py_spy: str) -> float:
    """GIL-held fraction of the worker's time, from two py-spy runs of a child process."""
    child = [sys.executable, str(Path(__file__).resolve()), "--gil-child", pipeline]
    child += ["--gil-seconds", str(seconds)]
    counts = []
    with tempfile.TemporaryDirectory(prefix="fastfeed-gil-") as tmp:
        for flags in (["--gil"], []):
            out = Path(tmp) / "raw.txt"
            cmd = [py_spy, "record", *flags, "-r", "200", "-f", "raw", "-o", str(out), "--"]
            done = subprocess.run(
                cmd + child, capture_output=True, text=True, timeout=seconds + 120
            )
            if done.returncode != 0 or not out.exists():
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                raise RuntimeError(f"py-spy exited with {done.returncode}: {' | '.join(tail)}")
            counts.append(_worker_samples(out))
    held, running = counts
    if running == 0:
        raise RuntimeError(f"py-spy recorded no samples of the worker for {pipeline!r}")
    return held / running


def _count_while(work: Callable[[int], object], seconds: float) -> tuple[float, int, float]:
    """Rate (1/s) of a pure-Python counter thread while ``work(i)`` runs in a loop here."""
    stop = threading.Event()
    counted: list[int] = []

    def count() -> None:
        n = 0
        while not stop.is_set():
            for _ in range(100):
                n += 1
        counted.append(n)

    counter = threading.Thread(target=count, name="fastfeed-bench-counter")
    start = time.perf_counter()
    counter.start()
    calls = 0
    try:
        while time.perf_counter() - start < seconds:
            work(calls)
            calls += 1
    finally:
        stop.set()
        counter.join(timeout=10)
    elapsed = time.perf_counter() - start
    return counted[0] / elapsed, calls, elapsed


def gil_fraction_counter(pipeline: str, seconds: float, windows: int = 6) -> float:
    """GIL-held fraction by the counter method (see the module docstring); median of windows."""
    torch.set_num_threads(1)
    payloads = make_jpegs(_GIL_IMAGES, seed=1)
    fn = _GIL_PIPELINES[pipeline]()
    row = torch.empty((3, _OUT, _OUT), dtype=torch.uint8)
    rnd = random.Random(0)
    blob = bytes(1 << 20)

    def work(i: int) -> None:
        _rng.set_sample_key((0, 0, i))
        fn(payloads[i % len(payloads)], row, rnd)

    def burn(i: int) -> None:
        hashlib.sha256(blob).digest()

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    fractions = []
    try:
        for _ in range(windows):
            burner_rate, _, _ = _count_while(burn, seconds / windows)
            pipeline_rate, images, elapsed = _count_while(work, seconds / windows)
            cpu0 = time.thread_time()
            for i in range(20):
                work(i)
            solo_s = (time.thread_time() - cpu0) / 20
            held_s = max(0.0, 1.0 - pipeline_rate / burner_rate) * elapsed / max(images, 1)
            fractions.append(held_s / solo_s)
    finally:
        sys.setswitchinterval(old_interval)
        _rng.set_sample_key(None)
    return float(np.median(fractions))


def gil_rows(method: str, seconds: float, single_ms: dict[str, float]) -> list[dict]:
    """The GIL table: fraction, and the Amdahl ceiling it implies for threads."""
    py_spy = shutil.which("py-spy")
    if method == "auto":
        method = "py-spy" if py_spy else "counter"
    if method == "py-spy" and not py_spy:
        raise SystemExit("--gil-method py-spy: py-spy is not on PATH (pip install py-spy)")
    pipelines = [p for p in _GIL_PIPELINES if p in single_ms]  # partial decode may be missing
    per_run_s = 2 * (seconds + 5) if method == "py-spy" else 2.2 * seconds
    print(
        f"GIL table: {len(pipelines)} pipelines by {method}, ~{len(pipelines) * per_run_s:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    rows = []
    for pipeline in pipelines:
        used = method
        try:
            if method == "py-spy":
                fraction = gil_fraction_pyspy(pipeline, seconds, py_spy)  # type: ignore[arg-type]
            else:
                fraction = gil_fraction_counter(pipeline, seconds)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            # One failed measurement (py-spy refused by ptrace, a child that died, a
            # timeout) must not lose the table: say why, measure this row another way.
            print(f"GIL {pipeline!r}: {method} failed: {exc}", file=sys.stderr, flush=True)
            if method != "py-spy":
                continue
            used = "counter (py-spy failed)"
            fraction = gil_fraction_counter(pipeline, seconds)
        cpu_ms = single_ms[pipeline]
        rows.append(
            {
                "pipeline": pipeline,
                "method": used,
                "gil held %": round(100 * fraction, 1),
                "cpu ms/img (1 thread)": round(cpu_ms, 3),
                "gil ms/img": round(fraction * cpu_ms, 3),
                "max thread speed-up": round(1 / fraction, 1) if fraction > 0 else None,
                "img/s ceiling": round(1e3 / (fraction * cpu_ms)) if fraction > 0 else None,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=200, help="number of JPEGs (default 200)")
    ap.add_argument("--repeats", type=int, default=3, help="passes; the best is kept")
    ap.add_argument("--json", default="bench_out/image_decode.json", help="write results here")
    ap.add_argument(
        "--gil-method",
        choices=("auto", "py-spy", "counter", "none"),
        default="auto",
        help="how to measure the GIL-held fraction (auto: py-spy if on PATH, else counter)",
    )
    ap.add_argument("--gil-seconds", type=float, default=3.0, help="run time per measurement")
    ap.add_argument(
        "--decoders",
        action="store_true",
        help="also survey JPEG decoder libraries (those that import) on the same images",
    )
    ap.add_argument("--gil-child", help=argparse.SUPPRESS)  # internal: py-spy's target
    args = ap.parse_args()
    if args.gil_child:
        _gil_child(args.gil_child, args.gil_seconds)
        return
    torch.set_num_threads(1)
    original = make_jpegs(args.count)
    small = pre_resize(original)
    datasets = {"original": original, "max-side 320": small}
    fast = _fastfeed_pipelines()
    pipelines = {
        "decode only": decode_only,
        "naive train (RRC+flip)": naive_train,
        **{k: v for k, v in fast.items() if "train" in k},
        "naive eval (Resize+CenterCrop)": naive_eval,
        **{k: v for k, v in fast.items() if "eval" in k},
    }
    rows = []
    for set_name, payloads in datasets.items():
        kib = np.mean([len(p) for p in payloads]) / 1024
        naive_ms: dict[str, float] = {}
        for name, fn in pipelines.items():
            wall_ms, cpu_ms = measure(fn, payloads, args.repeats)
            kind = name.split(" ", 1)[1].removesuffix(", Pillow")
            if name.startswith("naive"):
                naive_ms[kind] = cpu_ms
            speedup = naive_ms.get(kind, 0.0) / cpu_ms if name.startswith("fastfeed") else None
            rows.append(
                {
                    "images": set_name,
                    "mean KiB": round(kib, 1),
                    "pipeline": name,
                    "wall ms/img": round(wall_ms, 3),
                    "cpu ms/img": round(cpu_ms, 3),
                    "img/s/core": round(1e3 / cpu_ms, 1),
                    "vs naive": round(speedup, 2) if speedup else None,
                }
            )
    print_table(rows, title=f"single-core decode+crop cost, {args.count} images, 224x224 uint8")
    survey = []
    if args.decoders:
        survey = decoder_rows(original, args.repeats)
        print_table(survey, title="JPEG decoders on the original images (one core)")
    gil: list[dict] = []
    gil_error = None
    if args.gil_method != "none":
        single_ms = {r["pipeline"]: r["cpu ms/img"] for r in rows if r["images"] == "original"}
        try:
            gil = gil_rows(args.gil_method, args.gil_seconds, single_ms)
        except Exception as exc:  # report it, keep the first table's JSON
            gil_error = f"{type(exc).__name__}: {exc}"
            print(f"GIL table failed: {gil_error}", file=sys.stderr, flush=True)
        print_table(gil, title="GIL held while one thread runs the pipeline (original images)")
    env = environment()
    print(f"python {env['python']}, torch {torch.__version__}, cpus {env.get('cpu_count')}")
    record = {
        "benchmark": "image_decode",
        "count": args.count,
        "rows": rows,
        "gil": gil,
        "gil_error": gil_error,
        "decoders": survey,
        "partial_jpeg": _jpeg.available(),
        "nvimgcodec": getattr(_jpeg._nv(), "__version__", None),
        "loadavg": os.getloadavg(),
    }
    path = write_json(args.json, record)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
