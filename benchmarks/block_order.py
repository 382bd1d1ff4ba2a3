"""What block order (``shuffle="block"``) gives up: randomness figures and a training run.

1. Randomness, from :class:`fastfeed.pipeline.sampling.EpochSampler` itself (no data read):
   the probability that two samples of a batch come from the same run, and the classes
   per batch when the records are packed class by class (as ``fastfeed pack`` packs an
   ImageFolder), for block order, a full shuffle and index order.
2. Training: an MLP on a synthetic 10-class problem whose records are stored class by
   class, trained with each order through ``fastfeed.Loader`` (same seeds, same steps);
   test accuracy after every epoch.

Run by hand (not a test)::

    python benchmarks/block_order.py --json block_order.json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

from fastfeed.pipeline.sampling import EpochSampler, default_window_blocks


def same_run_probability(order: np.ndarray, batch: int, run_records: int) -> float:
    """Mean over batches of P(two distinct samples of the batch share a run)."""
    probs = []
    for k in range(0, len(order) - batch + 1, batch):
        counts = np.bincount(order[k : k + batch] // run_records)
        probs.append(float((counts * (counts - 1)).sum()) / (batch * (batch - 1)))
    return float(np.mean(probs))


def classes_per_batch(order: np.ndarray, batch: int, labels: np.ndarray) -> float:
    """Mean number of distinct labels in a batch."""
    return float(
        np.mean(
            [len(set(labels[order[k : k + batch]].tolist())) for k in range(0, len(order), batch)]
        )
    )


def randomness(n: int, run_records: int, batch: int, classes: int) -> list[dict[str, Any]]:
    """Figures for each order over ``n`` records packed class by class."""
    labels = (np.arange(n) * classes) // n  # class-sorted, equal classes
    rows = []
    for name, shuffle in (("block", "block"), ("full shuffle", True), ("index order", False)):
        s = EpochSampler(n, batch_size=batch, shuffle=shuffle, seed=0, block_records=run_records)
        probs, cls = [], []
        for epoch in range(3):
            order = s.global_order(epoch)
            probs.append(same_run_probability(order, batch, run_records))
            cls.append(classes_per_batch(order, batch, labels))
        rows.append(
            {
                "records": n,
                "run_records": run_records,
                "window_runs": s.window_blocks if shuffle == "block" else None,
                "batch": batch,
                "order": name,
                "P(same run)": float(np.mean(probs)),
                "classes/batch": float(np.mean(cls)),
            }
        )
    return rows


class _RunsRam(_common.RamSource):
    """RamSource that declares its run length, as an LMDBSource does."""

    def __init__(self, payloads: Sequence[bytes], labels: Sequence[int], runs: int) -> None:
        super().__init__(payloads, labels)
        self.run_records = runs


def _dataset(n: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian modes per class in ``dim`` dimensions; rows sorted by class."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1.0, size=(classes, 2, dim)).astype(np.float32)
    y = np.sort(rng.integers(0, classes, size=n))
    mode = rng.integers(0, 2, size=n)
    x = centers[y, mode] + rng.normal(0, 1.1, size=(n, dim)).astype(np.float32)
    return x.astype(np.float32), y.astype(np.int64)


def train(
    shuffle: bool | str, seed: int, epochs: int, runs: int, data: dict[str, Any]
) -> list[float]:
    """Test accuracy after each epoch of an MLP trained with ``shuffle``."""
    import torch

    from fastfeed.loader import Loader

    torch.manual_seed(seed)
    dim = data["x"].shape[1]
    x, y = data["x"], data["y"]
    src = _RunsRam([row.tobytes() for row in x], y.tolist(), runs)

    def to_tensor(records: list[bytes]) -> torch.Tensor:
        flat = np.frombuffer(bytearray(b"".join(records)), np.float32)
        return torch.from_numpy(flat.reshape(-1, dim))

    loader = Loader(
        src,
        batch_size=64,
        shuffle=shuffle,
        seed=seed,
        num_threads=0,
        batch_transform=to_tensor,
        profile=False,
    )
    model = torch.nn.Sequential(
        torch.nn.Linear(dim, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    xt, yt = torch.from_numpy(data["x_test"]), torch.from_numpy(data["y_test"])
    accs = []
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        with torch.no_grad():
            accs.append(float((model(xt).argmax(1) == yt).float().mean()))
    return accs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)

    rand_rows = []
    # This benchmark's JPEG LMDB (4000 x ~78 KB, runs of 54 = 4 MiB) and ImageNet-1k
    # (1.28M x ~110 KB, runs of 38), batch 64 (window 8 runs) and 256 (window 16 runs).
    for n, runs, batch in ((4000, 54, 64), (1_281_167, 38, 64), (1_281_167, 38, 256)):
        rand_rows += randomness(n, runs, batch, classes=10 if n < 10_000 else 1000)
    _common.print_table(rand_rows, title="randomness (3 epochs, mean over batches)")

    train_x, train_y = _dataset(20_000, 32, 10, seed=1)
    test_x, test_y = _dataset(5_000, 32, 10, seed=1)  # same centers, new draws
    test_x, test_y = test_x[::-1].copy(), test_y[::-1].copy()
    data = {"x": train_x, "y": train_y, "x_test": test_x, "y_test": test_y}
    train_rows = []
    t0 = time.perf_counter()
    for name, shuffle in (("block", "block"), ("full shuffle", True), ("index order", False)):
        per_seed = [train(shuffle, s, args.epochs, 54, data) for s in range(args.seeds)]
        acc = np.array(per_seed)
        train_rows.append(
            {
                "order": name,
                "window_runs": default_window_blocks(64) if shuffle == "block" else None,
                **{f"epoch {e + 1}": float(acc[:, e].mean()) for e in range(args.epochs)},
                "final min": float(acc[:, -1].min()),
                "final max": float(acc[:, -1].max()),
            }
        )
    _common.print_table(
        train_rows,
        title=(
            f"test accuracy, MLP, 20000 class-sorted records, runs of 54, batch 64, "
            f"mean of {args.seeds} seeds ({time.perf_counter() - t0:.0f} s)"
        ),
    )
    if args.json:
        _common.write_json(
            args.json,
            {"environment": _common.environment(), "randomness": rand_rows, "training": train_rows},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
