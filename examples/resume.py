"""Interrupt training mid-epoch, checkpoint the loader with the model, resume exactly.

    python examples/resume.py                     # generated data
    python examples/resume.py --interrupt-at 7    # stop after global step 7

``loader.state_dict()`` is a few integers (seed, epoch, batches delivered); saved next to
the model and optimizer, ``loader.load_state_dict(state)`` makes the next iteration
yield exactly the batches of that epoch not yet trained on, with the same augmentation
(fastfeed draws each sample's random crop from (seed, epoch, index)).

The script proves it: it trains once without interruption, recording the dataset
indices of every batch; then trains again, stops after ``--interrupt-at`` steps, saves a
checkpoint file, builds a *new* model, optimizer and loader from that file alone and
finishes. It prints both index sequences' agreement and the largest weight difference.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tempfile

import torch
import torch.nn.functional as F
from _data import dataset_path
from train_classifier import SmallCNN

from fastfeed import Loader, image
from fastfeed.sources import open_source


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", help="ImageFolder root, file list or LMDB (default: generated)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--interrupt-at", type=int, default=None, help="global step (default: mid-epoch 1)"
    )
    p.add_argument("--fast", action="store_true", help="tiny data (smoke test)")
    return p.parse_args()


def build(path: str, batch_size: int) -> tuple[Loader, torch.nn.Module, torch.optim.Optimizer]:
    """A fresh loader, model and optimizer: the same every time (seeded)."""
    torch.manual_seed(0)
    source = open_source(path)
    transform = image.Compose([image.RandomResizedCrop(32), image.RandomHorizontalFlip()])
    loader = Loader(source, transform=transform, batch_size=batch_size, shuffle=True, seed=7)
    model = SmallCNN(len(source.classes or [0]), width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return loader, model, optimizer


def train(
    loader: Loader,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    seen: list[tuple[int, list[int]]],
    stop_after: int | None = None,
) -> bool:
    """Train until ``epochs`` or until ``stop_after`` steps were taken in this call.

    Appends ``(epoch, batch indices)`` to ``seen``. Returns True when interrupted.
    """
    steps = 0
    for epoch in range(loader.epoch, epochs):
        loader.set_epoch(epoch)  # keeps a loaded mid-epoch resume point of this epoch
        for batch in loader:
            images, labels = batch
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen.append((epoch, list(batch.indices)))
            steps += 1
            if stop_after is not None and steps == stop_after:
                return True
    return False


def main() -> None:
    args = parse_args()
    torch.use_deterministic_algorithms(True)
    path = dataset_path(args.data, fast=args.fast)

    # 1. The reference: no interruption.
    loader, model, optimizer = build(path, args.batch_size)
    reference: list[tuple[int, list[int]]] = []
    train(loader, model, optimizer, args.epochs, reference)
    reference_weights = {k: v.clone() for k, v in model.state_dict().items()}
    loader.close()
    per_epoch = len(loader)
    stop = args.interrupt_at if args.interrupt_at is not None else per_epoch + per_epoch // 2
    if not 0 < stop < len(reference):
        raise SystemExit(f"--interrupt-at must be in 1..{len(reference) - 1}, got {stop}")

    # 2. Train again, stop mid-epoch, checkpoint model + optimizer + loader.
    loader, model, optimizer = build(path, args.batch_size)
    resumed: list[tuple[int, list[int]]] = []
    train(loader, model, optimizer, args.epochs, resumed, stop_after=stop)
    ckpt_dir = tempfile.mkdtemp(prefix="fastfeed-resume-")
    atexit.register(shutil.rmtree, ckpt_dir, ignore_errors=True)
    ckpt = os.path.join(ckpt_dir, "checkpoint.pt")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "loader": loader.state_dict(),  # {"seed", "epoch", "position", ...}: tiny
        },
        ckpt,
    )
    state = loader.state_dict()
    print(
        f"interrupted after step {stop} (epoch {state['epoch']}, {state['position']} of "
        f"{per_epoch} batches done); checkpoint {ckpt}",
        flush=True,
    )
    print(f"  loader state: {state}", flush=True)
    loader.close()
    del loader, model, optimizer

    # 3. A "new process": everything rebuilt from the checkpoint file alone.
    loader, model, optimizer = build(path, args.batch_size)
    checkpoint = torch.load(ckpt)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    loader.load_state_dict(checkpoint["loader"])
    print(f"resuming at epoch {loader.epoch}", flush=True)
    train(loader, model, optimizer, args.epochs, resumed)
    loader.close()

    first = resumed[stop]
    print(f"first batch after resume: epoch {first[0]}, indices {first[1]}")
    print(f"same batch in the uninterrupted run: epoch {reference[stop][0]}, {reference[stop][1]}")
    same = resumed == reference
    diff = max(
        float((model.state_dict()[k].float() - w.float()).abs().max())
        for k, w in reference_weights.items()
    )
    print(
        f"indices identical to the uninterrupted run: {same} "
        f"({len(resumed)} batches, {sum(len(b) for _, b in resumed)} samples)"
    )
    print(f"largest weight difference vs the uninterrupted run: {diff:.2e}")
    if not same:
        raise SystemExit("resume did not reproduce the uninterrupted run")


if __name__ == "__main__":
    main()
