"""Resource limits: a low open-file limit, bounded read-ahead, threads and fds at rest.

The ``ulimit -n`` cases run in a child process (``resource.setrlimit`` there), over
10,000 tiny files written once for the module.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fastfeed.dataloader import DataLoader
from fastfeed.loader import Loader
from fastfeed.testing import (
    Ledger,
    LedgerDataset,
    LedgerDecode,
    LedgerSource,
    ResourceSnapshot,
    run_child,
    write_tiny_files,
)

N_FILES = 10_000


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10,000 ledger records as files, plus ``paths.json`` listing them in index order."""
    root = tmp_path_factory.mktemp("tiny")
    paths = write_tiny_files(root / "files", N_FILES)
    (root / "paths.json").write_text(json.dumps(paths))
    return root


_ULIMIT_CHILD = """
import json, os, resource
from fastfeed.testing import Ledger, LedgerDecode, ResourceSnapshot
from fastfeed.loader import Loader
from fastfeed.sources import FileSource

with open(os.path.join(ROOT, "paths.json")) as f:
    paths = json.load(f)
# Warm up first, so lazy imports (numpy.random, ...) do not need descriptors later.
with FileSource(paths[:64]) as warm:
    with Loader(warm, LedgerDecode(), batch_size=16, shuffle=True, num_threads=2) as wl:
        for _ in wl:
            pass
baseline = ResourceSnapshot()
if LIMIT is None:
    # No free descriptor at all: the limit is the lowest fd number not in use.
    LIMIT = min(set(range(len(baseline.fds) + 2)) - set(baseline.fds))
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, hard))  # the soft limit, as ulimit -n
# Wide on purpose: 16 loader threads, each read_many fanning out on a 64-thread pool.
src = FileSource(paths, num_threads=64)
loader = Loader(src, LedgerDecode(), batch_size=500, shuffle=True, num_threads=16,
                prefetch=32, on_error=MODE)
result = {"epochs": []}
try:
    for epoch in range(2):
        ledger = Ledger(range(len(paths)))
        for batch in loader:
            ledger.add(batch)
        result["epochs"].append({"problems": ledger.problems(), "batches": ledger.batches,
                                 "skipped": len(loader.skipped)})
except Exception as exc:
    result["error"] = f"{type(exc).__name__}: {exc}"
finally:
    loader.close()
    src.close()
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))  # listing /proc needs an fd
result["excess"] = ResourceSnapshot.settle(baseline).excess_over(baseline)
print("RESULT", json.dumps(result))
"""


def _ulimit_run(root: Path, limit: int | None, mode: str = "raise") -> dict[str, Any]:
    code = f"ROOT, LIMIT, MODE = {str(root)!r}, {limit}, {mode!r}\n" + _ULIMIT_CHILD
    res = run_child(code, timeout_s=90)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def test_ulimit_256_with_10000_files_never_hits_emfile(tiny_files: Path) -> None:
    result = _ulimit_run(tiny_files, 256)
    assert "error" not in result, result["error"]
    assert result["epochs"] == [{"problems": [], "batches": 20, "skipped": 0}] * 2
    assert result["excess"] == ""  # every fd and thread released after close


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_emfile_error_says_to_raise_the_limit(tiny_files: Path, mode: str) -> None:
    # A limit with no descriptor left (None): the very first open fails with EMFILE.
    # In skip mode too: the files are fine, so they must not be skipped as bad samples.
    result = _ulimit_run(tiny_files, None, mode)
    assert "error" in result, result
    assert result["epochs"] == []
    assert result["excess"] == ""
    error = result["error"]
    assert error.startswith("SampleError: ") and "Too many open files" in error
    assert "ulimit -n" in error or "RLIMIT_NOFILE" in error, error
    assert "in stage 'read'" in error and "ResourceLimitError" in error, error


def _wait_until_stable(read_count: Any, quiet_s: float = 0.3, limit_s: float = 5.0) -> int:
    """Poll ``read_count()`` until it stops changing for ``quiet_s``; return it."""
    deadline = time.monotonic() + limit_s
    last, since = read_count(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now = read_count()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return last


@pytest.mark.parametrize("impl", ["Loader", "DataLoader"])
def test_read_ahead_is_bounded_while_the_consumer_stalls(impl: str) -> None:
    batch, n = 8, 4096
    baseline = ResourceSnapshot()
    if impl == "Loader":
        prefetch = 3
        src = LedgerSource(n)
        loader: Any = Loader(src, LedgerDecode(), batch_size=batch, num_threads=2, prefetch=3)

        def reads() -> int:
            return src.counters.reads

        # The batch in the consumer's hand plus `prefetch` in flight or ready.
        expected_batches = 1 + prefetch
    else:
        counted = _CountingDataset(n)
        loader = DataLoader(counted, batch_size=batch, num_workers=2, prefetch_factor=2)

        def reads() -> int:
            return counted.reads

        # torch's rule: prefetch_factor * num_workers outstanding after each next().
        expected_batches = 1 + 2 * 2
    try:
        it = iter(loader)
        ledger = Ledger(range(2 * batch))  # unshuffled: the first two batches
        ledger.add(next(it))
        assert _wait_until_stable(reads) == expected_batches * batch
        time.sleep(0.2)  # a consumer that stalls longer still holds the bound
        assert reads() == expected_batches * batch
        ledger.add(next(it))
        assert _wait_until_stable(reads) == (expected_batches + 1) * batch
        ledger.check()
    finally:
        loader.close()
    del it
    excess = ResourceSnapshot.settle(baseline).excess_over(baseline)
    assert not excess, excess


class _CountingDataset(LedgerDataset):
    """A :class:`LedgerDataset` that counts its ``__getitem__`` calls."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.reads = 0
        self._lock = threading.Lock()

    def __getitem__(self, index: int):  # type: ignore[override]
        with self._lock:  # two worker threads count at once
            self.reads += 1
        return super().__getitem__(index)
