"""The example scripts run end to end (fast mode), plus fastfeed.hooks and fastfeed.synthetic.

The command strings below are the ones README.md shows (tests/test_readme.py checks that
every command in a ``<!-- tested -->`` block of the README is one of these).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from fastfeed.errors import ConfigError
from fastfeed.hooks import Watched, watch
from fastfeed.profiling import Recorder
from fastfeed.stats import Bound, LoaderStats
from fastfeed.synthetic import make_image_folder

REPO = Path(__file__).resolve().parent.parent

CMD_TRAIN = "python examples/train_classifier.py --fast"
CMD_TRAIN_TORCH = "python examples/train_classifier.py --fast --loader torch"
CMD_DDP = "torchrun --nproc-per-node 2 examples/train_ddp.py --fast"
CMD_PROFILE = "python examples/profile_my_loader.py --fast"
CMD_RESUME = "python examples/resume.py --fast"
COMMANDS = [CMD_TRAIN, CMD_TRAIN_TORCH, CMD_DDP, CMD_PROFILE, CMD_RESUME]

# How a README command maps to this interpreter (no reliance on PATH in the test run).
_LAUNCHERS = {
    "python": [sys.executable],
    "torchrun": [sys.executable, "-m", "torch.distributed.run"],
    "fastfeed": [sys.executable, "-m", "fastfeed"],
}


def run_command(cmd: str, cwd: Path = REPO, timeout_s: float = 120.0) -> str:
    """Run a README command with this interpreter; return stdout, fail with its output."""
    argv = shlex.split(cmd)
    argv = _LAUNCHERS.get(argv[0], [argv[0]]) + argv[1:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
    )
    assert proc.returncode == 0, (
        f"`{cmd}` exited with {proc.returncode}\n--- stdout\n{proc.stdout}\n"
        f"--- stderr\n{proc.stderr[-4000:]}"
    )
    return proc.stdout


# -- the example scripts ---------------------------------------------------------------


_EPOCH = re.compile(
    r"epoch (\d)/2  loss ([\d.]+)  train acc ([\d.]+)%  val acc ([\d.]+)%  "
    r"[\d,]+ samples/s  stall ([\d.]+)% \((compute-bound|partially-input-bound|input-bound)\)"
)


@pytest.mark.parametrize("cmd,name", [(CMD_TRAIN, "fastfeed"), (CMD_TRAIN_TORCH, "torch")])
def test_train_classifier_fast(cmd: str, name: str) -> None:
    out = run_command(cmd)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # --device auto
    assert f"{name} DataLoader: 48 images, 4 classes, batch 16, 2 workers, device {device}" in out
    epochs = _EPOCH.findall(out)
    assert [e[0] for e in epochs] == ["1", "2"], out
    for _, loss, train_acc, val_acc, stall, _bound in epochs:
        assert float(loss) > 0
        assert 0 <= float(train_acc) <= 100 and 0 <= float(val_acc) <= 100
        assert 0 <= float(stall) <= 100
    assert out.count("  verdict: ") == 2


def test_train_ddp_two_cpu_ranks() -> None:
    out = run_command(CMD_DDP)
    assert "2 ranks (gloo), 32 images, 2 steps per epoch of 8 per rank" in out
    epochs = re.findall(
        r"epoch (\d)/2  loss [\d.]+  [\d.]+ s  samples per rank \[(\d+), (\d+)\]  "
        r"seen by every rank: (\d+)",
        out,
    )
    # Disjoint shards: 16 samples on each rank, none seen by both.
    assert epochs == [("1", "16", "16", "0"), ("2", "16", "16", "0")], out
    # The cross-rank report: one line per rank per epoch, from the gathered stats.
    assert len(re.findall(r"  rank 0: stall [\d.]+%", out)) == 2
    assert len(re.findall(r"  rank 1: stall [\d.]+%", out)) == 2
    assert out.count("  slowest rank ") == 2


def test_profile_my_loader_fast() -> None:
    out = run_command(CMD_PROFILE)
    lines = re.findall(r"epoch (\d): (\d+) batches, (\d+) samples, stall ([\d.]+)%", out)
    assert lines == [("1", "6", "48", lines[0][3]), ("2", "6", "48", lines[1][3])], out
    assert "of step time waiting for data" in out


def test_resume_fast_reproduces_the_uninterrupted_run() -> None:
    out = run_command(CMD_RESUME)
    assert "interrupted after step 4 (epoch 1, 1 of 3 batches done)" in out
    assert "resuming at epoch 1" in out
    first = re.search(r"first batch after resume: epoch 1, indices (\[[\d, ]+\])", out)
    same = re.search(r"same batch in the uninterrupted run: epoch 1, (\[[\d, ]+\])", out)
    assert first and same and first.group(1) == same.group(1)
    assert "indices identical to the uninterrupted run: True (6 batches, 96 samples)" in out
    diff = re.search(r"largest weight difference vs the uninterrupted run: (\S+)", out)
    assert diff is not None and float(diff.group(1)) < 1e-5


# -- fastfeed.hooks ----------------------------------------------------------------------


def _slow_batches(n: int, delay_s: float, batch: int = 4):
    for i in range(n):
        time.sleep(delay_s)
        yield torch.full((batch, 2), i), torch.arange(batch)


class _Epochs:
    """A re-iterable loader: each iter() is one epoch of ``n`` batches."""

    def __init__(self, n: int, delay_s: float) -> None:
        self.n, self.delay_s, self.num_workers = n, delay_s, 3

    def __iter__(self):
        return _slow_batches(self.n, self.delay_s)

    def __len__(self) -> int:
        return self.n


def test_watch_yields_the_same_batches_and_counts_them() -> None:
    w = watch(_Epochs(5, 0.0))
    assert isinstance(w, Watched) and len(w) == 5 and w.num_threads == 3
    for _ in range(2):
        got = [int(x[0, 0]) for x, _ in w]
        assert got == [0, 1, 2, 3, 4]
    assert (w.batches, w.samples) == (10, 40)
    assert w.recorder.steps == 8 and w.recorder.first_batches == 2  # one start per epoch
    stats = w.stats()
    assert (stats.batches, stats.steps, stats.samples) == (10, 8, 40)
    w.reset()
    assert (w.batches, w.samples, w.recorder.steps) == (0, 0, 0)


def test_watch_input_bound_when_the_loop_waits() -> None:
    w = watch(_Epochs(6, 0.03))
    for _ in w:
        pass  # no work: the loop only waits
    stats = w.stats()
    assert stats.stall_fraction > 0.5
    assert stats.verdict.bound is Bound.INPUT
    assert "no pipeline stage reported its time" in stats.verdict.sentence
    assert stats.startup_wait_s >= 0.03  # the first batch's wait is kept apart


def test_watch_compute_bound_when_the_step_dominates() -> None:
    w = watch(_Epochs(6, 0.0))
    for _ in w:
        time.sleep(0.03)
    stats = w.stats()
    assert stats.stall_fraction < 0.05
    assert stats.verdict.bound is Bound.COMPUTE


def test_watch_reports_into_a_given_recorder() -> None:
    rec = Recorder()
    w = watch([(torch.zeros(3, 1), torch.zeros(3))] * 4, recorder=rec, num_threads=0)
    assert list(w) and w.recorder is rec and rec.steps == 3
    assert w.samples == 12


class _SlowDataset(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        time.sleep(0.03)
        return torch.zeros(2), i


def test_stats_of_a_process_worker_dataloader_that_records_no_stage() -> None:
    from fastfeed import DataLoader

    loader = DataLoader(_SlowDataset(), batch_size=2, num_workers=1, worker_type="process")
    try:
        assert [int(y[0]) for _, y in loader] == [0, 2, 4, 6, 8, 10]
        stats = loader.stats()
    finally:
        loader.close()
    assert stats.steps == 5 and stats.num_threads == 1
    assert stats.verdict.bound is Bound.INPUT and stats.stall_fraction > 0.5


def test_report_handles_a_recorder_without_stages() -> None:
    rec = Recorder()
    rec.consumer_step(0.0, None)
    for _ in range(4):
        rec.consumer_step(0.05, 0.1)
    stats = LoaderStats.collect(rec)
    assert stats.verdict.bound is Bound.INPUT
    assert "no pipeline stage reported its time" in stats.verdict.sentence
    assert "fastfeed profile" in stats.verdict.actions[0].text


# -- fastfeed.synthetic ------------------------------------------------------------------


def test_make_image_folder_layout_and_determinism(tmp_path: Path) -> None:
    a = make_image_folder(tmp_path / "a", 3, 4, size=(40, 30), seed=5)
    b = make_image_folder(tmp_path / "b", 3, 4, size=(40, 30), seed=5)
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*.jpg"))
    assert files[:2] == ["class_000/img_00000.jpg", "class_000/img_00001.jpg"]
    assert len(files) == 12 and files[-1] == "class_002/img_00011.jpg"
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes()
        with Image.open(a / f) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            assert 40 <= img.width <= 50 and 30 <= img.height <= 37
    c = make_image_folder(tmp_path / "c", 3, 4, size=(40, 30), seed=6)
    assert (c / files[0]).read_bytes() != (a / files[0]).read_bytes()


def test_make_image_folder_classes_differ_in_colour(tmp_path: Path) -> None:
    import numpy as np

    root = make_image_folder(tmp_path, 4, 2, size=(32, 32), jitter=0.0)
    means = []
    for c in range(4):
        with Image.open(root / f"class_{c:03d}" / f"img_{c * 2:05d}.jpg") as img:
            assert img.size == (32, 32)
            means.append(np.asarray(img, dtype=np.float32).mean(axis=(0, 1)))
    gaps = [float(np.abs(means[i] - means[j]).max()) for i in range(4) for j in range(i)]
    assert min(gaps) > 20  # a CNN can tell the classes apart


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"n_classes": 0, "per_class": 1}, "need n_classes >= 1 and per_class >= 1, got 0, 1"),
        ({"n_classes": 1, "per_class": 1, "size": (0, 5)}, r"size must be positive"),
        ({"n_classes": 1, "per_class": 1, "quality": 0}, r"quality must be in 1..95, got 0"),
    ],
)
def test_make_image_folder_rejects_bad_arguments(tmp_path: Path, kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        make_image_folder(tmp_path, **kwargs)
