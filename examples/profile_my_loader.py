"""Measure how long YOUR training loop waits on YOUR torch DataLoader — before switching.

    python examples/profile_my_loader.py                    # generated data
    python examples/profile_my_loader.py --data ./train --workers 8 --epochs 2

The script below is an ordinary PyTorch pipeline (a Dataset that decodes with Pillow, a
torch DataLoader with worker processes, a model step). The only fastfeed line wraps the
loader: ``loader = watch(loader)``. It yields the same batches and times, from the loop's
side, each wait for a batch and each step. ``loader.stats()`` then says whether the loop
is compute-bound (waits < 5% of step time), partially input-bound (5-20%) or input-bound.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F
from _data import dataset_path
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fastfeed.hooks import watch


class PillowFolder(Dataset):
    """What many training scripts have: ImageFolder-style files decoded with Pillow."""

    def __init__(self, root: str, size: int) -> None:
        self.classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
        self.items = [
            (os.path.join(root, c, f), label)
            for label, c in enumerate(self.classes)
            for f in sorted(os.listdir(os.path.join(root, c)))
        ]
        self.size = size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        with Image.open(path) as img:
            img = img.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
            pixels = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
        return pixels, label


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", help="ImageFolder root (default: generated)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="torch DataLoader worker processes")
    p.add_argument("--size", type=int, default=64, help="image side after resize, pixels")
    p.add_argument("--fast", action="store_true", help="tiny data (smoke test)")
    args = p.parse_args()
    if args.fast:
        args.batch_size, args.size = 8, 32
    return args


def main() -> None:
    args = parse_args()
    dataset = PillowFolder(dataset_path(args.data, fast=args.fast), args.size)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
    loader = watch(loader)  # <- the one added line: same batches, waits measured

    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, len(dataset.classes)),
    )  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for epoch in range(args.epochs):
        for images, labels in loader:
            loss = F.cross_entropy(model(images.float() / 255), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        stats = loader.stats()
        print(
            f"epoch {epoch + 1}: {stats.batches} batches, {stats.samples} samples, "
            f"stall {stats.stall_fraction:.1%}, first batch after "
            f"{stats.startup_wait_s * 1e3:.0f} ms, {stats.verdict.bound.value}",
            flush=True,
        )
        loader.reset()  # figures per epoch
    print(stats.summary())


if __name__ == "__main__":
    main()
