"""Constructed scenarios with known answers, run for real through Loader and DataLoader.

The machine these run on may be shared: a scenario whose answer depends on free cores
accepts the host-saturated verdict when other processes kept a core busy, and says so.
None accepts the wrong class (a decode in ``__getitem__`` is never IO, a sleeping read
never CPU, a loaded machine never the GIL).
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fastfeed.dataloader import DataLoader
from fastfeed.loader import Loader
from fastfeed.stats import Bottleneck, Bound, LoaderStats
from fastfeed.testing import encode_jpeg, ledger_source, random_image

_NOISE = np.random.default_rng(0).random(200_000)


def _python_burn(data: Any) -> int:
    """A pure-Python loop (~10 ms): holds the GIL the whole time."""
    s = 0
    for i in range(60_000):
        s += i * i
    return s


def _numpy_burn(data: Any) -> float:
    """numpy ufuncs (~3 ms): CPU work that releases the GIL."""
    return float(np.sqrt(np.abs(np.sin(_NOISE)) + 1.0).sum())


def _consume(loader: Any, step: Any = None) -> LoaderStats:
    """One epoch through ``loader`` (``step`` per batch), its stats; the loader is closed."""
    try:
        for batch in loader:
            if step is not None:
                step(batch)
        stats = loader.stats()
    finally:
        loader.close()
    print(stats.summary(details=True))  # shown with -s or on failure
    return stats


def _quiet(stats: LoaderStats) -> bool:
    """Other processes kept less than half a core busy during the run."""
    return stats.others_cores is not None and stats.others_cores < 0.5


class _JpegDataset:
    """A plain map-style Dataset that decodes JPEG bytes with Pillow in __getitem__."""

    def __init__(self, n: int) -> None:
        rng = np.random.default_rng(1)
        self.blobs = [encode_jpeg(random_image(rng, 320, 240)) for _ in range(8)]
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        img = Image.open(io.BytesIO(self.blobs[i % 8])).convert("RGB")
        return np.array(img.resize((160, 120)))


class _SleepyDataset:
    """A plain Dataset whose __getitem__ waits 4 ms (a network or disk read)."""

    def __len__(self) -> int:
        return 160

    def __getitem__(self, i: int) -> int:
        time.sleep(0.004)
        return i


def test_decode_in_getitem_is_cpu_never_io() -> None:
    stats = _consume(DataLoader(_JpegDataset(192), batch_size=8, num_workers=2))
    v = stats.verdict
    assert v.bottleneck in (Bottleneck.CPU, Bottleneck.HOST), v.sentence
    read = stats.stages["read"].split().shares()
    assert read["cpu"] + read["runq"] > 0.6, read
    texts = " ".join(a.text for a in v.actions)
    assert "MemoryCache" not in texts, texts  # a plain Dataset cannot be wrapped
    if v.bottleneck is Bottleneck.HOST:
        assert "--max-side 512" in texts and "fastfeed.Loader" in texts, texts


def test_sleeping_getitem_is_io_with_more_workers() -> None:
    stats = _consume(DataLoader(_SleepyDataset(), batch_size=8, num_workers=2))
    v = stats.verdict
    assert v.bottleneck is Bottleneck.IO, v.sentence
    assert stats.stages["read"].split().shares()["io"] > 0.6
    assert v.actions[0].text.startswith("raise num_workers from 2 to "), v.actions
    assert not any("MemoryCache" in a.text for a in v.actions)


def test_slow_native_source_is_io_and_offers_memory_cache() -> None:
    stats = _consume(Loader(ledger_source(160, delay_s=0.003), batch_size=8, num_threads=2))
    v = stats.verdict
    assert v.bottleneck is Bottleneck.IO, v.sentence
    assert v.matches("io") and not v.matches("cpu")
    texts = [a.text for a in v.actions]
    assert any(t.startswith("raise num_threads from 2 to ") for t in texts), texts
    assert any("MemoryCache(source" in t for t in texts), texts
    assert stats.batch_size == 8 and stats.samples == 160


def test_pure_python_transform_on_two_threads_is_gil() -> None:
    """Two threads of pure Python: the GIL, on a quiet machine.

    The GIL share is an estimate (blocking switches x the probe's cost per acquisition)
    and moves with the scheduler: one CI run of the whole suite read 77% CPU, 23% GIL
    (the GIL is named from 30%), where runs alone read GIL 8 times in 8. So a quiet run
    that reads otherwise is measured once more; a classifier that never says GIL fails
    both.
    """
    verdicts = []
    for _ in range(2):
        stats = _consume(
            Loader(ledger_source(96), transform=_python_burn, batch_size=4, num_threads=2)
        )
        v = stats.verdict
        assert v.bottleneck in (Bottleneck.GIL, Bottleneck.CPU, Bottleneck.HOST), v.sentence
        assert stats.gil_wait_per_acquire_s is not None and stats.gil_wait_per_acquire_s > 1e-3
        if not _quiet(stats) or v.bottleneck is Bottleneck.GIL:
            return
        verdicts.append(v.sentence)
    raise AssertionError(f"quiet runs did not name the GIL: {verdicts}")


def test_slow_step_is_compute_bound() -> None:
    stats = _consume(
        Loader(ledger_source(96), batch_size=8, num_threads=2), lambda b: time.sleep(0.02)
    )
    v = stats.verdict
    assert v.bound is Bound.COMPUTE and v.bottleneck is Bottleneck.NONE, v.sentence
    assert stats.steps == 11 and stats.batches == 12
    assert stats.compute_per_step_s >= 0.018


@pytest.fixture
def loaded_machine():
    """Two spinning processes per core for the test's duration."""
    import os

    n = 2 * (os.cpu_count() or 1)
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    time.sleep(0.3)
    try:
        yield n
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(10)


def test_loaded_machine_is_host_saturated_not_gil(loaded_machine: int) -> None:
    stats = _consume(Loader(ledger_source(64), transform=_numpy_burn, batch_size=4, num_threads=2))
    v = stats.verdict
    assert v.bottleneck is Bottleneck.HOST, v.sentence
    assert stats.others_cores is not None and stats.others_cores >= 1.0
    assert "other processes keep" in v.sentence
    assert not any(a.text.startswith("raise") for a in v.actions), v.actions


def _python_step(batch: Any) -> None:
    s = 0
    for i in range(150_000):  # ~15 ms of pure Python
        s += i * i


def test_python_step_beside_gil_heavy_loader_names_the_noisy_neighbour() -> None:
    """A pure-Python step beside two pure-Python worker threads is slowed by them.

    The slowdown is an estimate (the step's GIL waits from its blocking switches) that
    moves with the scheduler: one CI run of the whole suite read 6.7%, under the 10%
    asserted. So a run under it is measured once more; a step never slowed fails both.
    """
    for attempt in range(2):
        loader = Loader(ledger_source(240), transform=_python_burn, batch_size=4, num_threads=2)
        stats = _consume(loader, _python_step)
        nb = stats.neighbour
        assert nb is not None, stats.to_dict()
        if nb.slowdown >= 0.1 or attempt == 1:
            break
    assert nb.slowdown >= 0.1, nb
    assert "slow your step by" in nb.sentence
    assert nb.sentence[:1].upper() + nb.sentence[1:] in stats.summary()
    if _quiet(stats):
        assert nb.cause == "gil", nb


def test_pack_at_400_gets_no_repack_advice(tmp_path) -> None:
    from fastfeed.image import RandomResizedCrop
    from fastfeed.packing import pack
    from fastfeed.sources import FileSource, LMDBSource
    from fastfeed.stats.probe import source_facts

    rng = np.random.default_rng(2)
    paths = []
    for i in range(24):
        p = tmp_path / f"{i}.jpg"
        p.write_bytes(encode_jpeg(random_image(rng, 640, 480)))
        paths.append(str(p))
    files = FileSource(paths)
    try:
        pack(files, tmp_path / "p.lmdb", max_side=400, progress=False)
    finally:
        files.close()
    src = LMDBSource(str(tmp_path / "p.lmdb"))
    assert source_facts(src).packed_max_side == 400
    try:
        stats = _consume(Loader(src, transform=RandomResizedCrop(224), batch_size=4, num_threads=1))
    finally:
        src.close()
    texts = [a.text for a in stats.verdict.actions]
    assert stats.verdict.bottleneck in (Bottleneck.CPU, Bottleneck.HOST), stats.verdict.sentence
    assert not any("--max-side" in t or "repack" in t for t in texts), texts
