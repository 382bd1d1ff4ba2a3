"""Shared benchmark helpers: environment record, table print, JSON write, synthetic data,
process-tree peak RSS, page-cache dropping, and a plain RAM source.

Every benchmark in ``benchmarks/`` imports this module (run them from the repository
root as ``python benchmarks/<name>.py``; the directory is put on ``sys.path`` by Python).
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fastfeed._peakmem import PeakRSS
from fastfeed._procio import evict, tree_rss_bytes
from fastfeed.sources.base import Record, Source

__all__ = [
    "PeakRSS",
    "RamSource",
    "drop_page_cache",
    "environment",
    "print_table",
    "synthetic_arrays",
    "synthetic_jpegs",
    "timed",
    "tree_rss_bytes",
    "write_jpeg_folder",
    "write_json",
]


# -- environment ------------------------------------------------------------------------


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except ImportError:
        return None
    return getattr(mod, "__version__", None) or getattr(mod, "PILLOW_VERSION", None)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment() -> dict[str, Any]:
    """Where a benchmark ran: versions, CPUs, memory, commit, time (JSON-serializable)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        affinity = os.cpu_count()
    mem_total = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_total = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    torch_threads = None
    try:
        import torch

        torch_threads = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        pass
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "mem_total_bytes": mem_total,
        "torch": _version("torch"),
        "torch_threads": torch_threads,
        "numpy": np.__version__,
        "pillow": _version("PIL"),
        "lmdb": _version("lmdb"),
        "fastfeed": _version("fastfeed"),
        "git_commit": _git_commit(),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }


# -- output -----------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10000:
        return f"{value:,}"
    return "-" if value is None else str(value)


def print_table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str] | None = None,
    title: str | None = None,
    file: Any = None,
) -> str:
    """Print rows as an aligned text table and return the text.

    Args:
        rows: One dict per row.
        columns: Column order; the union of the rows' keys (first-seen order) when None.
        title: A line printed above the table.
        file: Where to print (stdout by default).
    """
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[j]) for r in cells]) for j, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        # Numbers right-aligned, text left-aligned, like most result tables.
        out = []
        for v, w in zip(values, widths, strict=True):
            numeric = v.replace(",", "").replace(".", "").replace("-", "").isdigit()
            out.append(v.rjust(w) if numeric else v.ljust(w))
        return "  ".join(out).rstrip()

    text = "\n".join(
        ([title] if title else [])
        + [line(list(columns)), "  ".join("-" * w for w in widths)]
        + [line(r) for r in cells]
    )
    print(text, file=file or sys.stdout, flush=True)
    return text


def write_json(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write ``payload`` plus an ``environment`` record as indented JSON; return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"environment": environment(), **payload}
    out.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


# -- synthetic data ---------------------------------------------------------------------


def synthetic_arrays(
    n: int, nbytes: int = 3072, num_classes: int = 10, seed: int = 0
) -> tuple[list[bytes], list[int]]:
    """``n`` records of ``nbytes`` random uint8 bytes each, and labels ``0..num_classes-1``."""
    rng = np.random.default_rng(seed)
    blob = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=n).tolist()
    return [blob[i].tobytes() for i in range(n)], labels


def _photo_like(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    # A gradient plus noise: compresses (and decodes) like a photo, not like flat colour.
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=3).astype(np.float32)
    slope = rng.uniform(-0.5, 0.5, size=(2, 3)).astype(np.float32)
    img = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    img += rng.normal(0.0, 20.0, size=(height, width, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_jpegs(
    n: int,
    size: tuple[int, int] = (500, 375),
    quality: int = 90,
    num_classes: int = 10,
    seed: int = 0,
    distinct: int = 32,
) -> tuple[list[bytes], list[int]]:
    """``n`` ImageNet-like JPEGs (``size`` = (width, height)) and their labels.

    Only ``distinct`` different images are encoded (encoding is slow); records cycle
    through them, which does not change decode cost.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(min(distinct, n)):
        buf = io.BytesIO()
        Image.fromarray(_photo_like(rng, *size), "RGB").save(buf, "JPEG", quality=quality)
        pool.append(buf.getvalue())
    labels = rng.integers(0, num_classes, size=n).tolist()
    return [pool[i % len(pool)] for i in range(n)], labels


def write_jpeg_folder(
    root: str | os.PathLike[str], payloads: Sequence[bytes], labels: Sequence[int]
) -> Path:
    """Write records as an ImageFolder tree ``root/class_<label>/<i>.jpg``; return root."""
    root = Path(root)
    for i, (data, label) in enumerate(zip(payloads, labels, strict=True)):
        d = root / f"class_{label:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:07d}.jpg").write_bytes(data)
    return root


class RamArrays:
    """torch-style map dataset over in-RAM 3 KB records: one uint8 tensor per sample.

    What a user's torch Dataset looks like (a copy per sample); module level, so worker
    processes can unpickle it.
    """

    def __init__(self, payloads: Sequence[bytes], labels: Sequence[int]) -> None:
        self.payloads, self.labels = payloads, labels

    def __len__(self) -> int:
        return len(self.payloads)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        import torch

        arr = np.frombuffer(self.payloads[i], dtype=np.uint8)
        return torch.from_numpy(arr.copy()), self.labels[i]


class RamSource(Source):
    """Records held in RAM (a list of bytes): the fastest possible source.

    Args:
        payloads: Record bytes by index.
        labels: Labels by index, or None.
    """

    def __init__(self, payloads: Sequence[bytes], labels: Sequence[int] | None = None) -> None:
        super().__init__()
        self.payloads = list(payloads)
        self.labels = list(labels) if labels is not None else None

    def __len__(self) -> int:
        return len(self.payloads)

    def describe(self, index: int) -> str:
        return f"ram[{index}]"

    def _read_one(self, index: int) -> Record:
        return Record(self.payloads[index], None if self.labels is None else self.labels[index])

    def _read_many(self, indices: Sequence[int]) -> list[Record]:
        p, lab = self.payloads, self.labels
        if lab is None:
            return [Record(p[i], None) for i in indices]
        return [Record(p[i], lab[i]) for i in indices]


# -- memory and page cache --------------------------------------------------------------


def drop_page_cache(paths: Iterable[str | os.PathLike[str]]) -> int:
    """Evict files from the page cache without root (``POSIX_FADV_DONTNEED``); return count.

    Directories are walked. Only clean pages are dropped, which is every page of a file
    that was written and then ``fsync``-ed or simply read; call :func:`os.sync` first
    when files were just written. (:func:`fastfeed._procio.evict` per file.)
    """
    files: list[str] = []
    for p in paths:
        p = Path(p)
        files += [str(p)] if p.is_file() else [str(f) for f in p.rglob("*") if f.is_file()]
    return evict(files)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``fn`` and return (result, wall seconds)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def pread_files(paths: Sequence[str], order: Sequence[int], threads: int) -> int:
    """Read whole files ``paths[i]`` for ``i`` in ``order`` with one ``pread`` each, on
    ``threads`` threads taking the next file as they finish: the storage ceiling the
    loaders are compared with. Returns the bytes read."""
    nbytes = [0] * threads
    it = iter(order)
    lock = threading.Lock()

    def work(k: int) -> None:
        total = 0
        while True:
            with lock:
                i = next(it, None)
            if i is None:
                break
            fd = os.open(paths[i], os.O_RDONLY)
            try:
                total += len(os.pread(fd, os.fstat(fd).st_size, 0))
            finally:
                os.close(fd)
        nbytes[k] = total

    ts = [
        threading.Thread(target=work, args=(k,), name=f"fastfeed-bench-{k}") for k in range(threads)
    ]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(nbytes)
