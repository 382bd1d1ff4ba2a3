"""Train a small CNN classifier with fastfeed.DataLoader: a one-line switch from torch.

    python examples/train_classifier.py                      # generated data, fastfeed
    python examples/train_classifier.py --loader torch       # the same with torch's loader
    python examples/train_classifier.py --data ./train --val ./val --epochs 10
    python examples/train_classifier.py --data train.lmdb    # a `fastfeed pack` LMDB

Everything but the import is plain PyTorch: a Dataset that decodes JPEGs, a DataLoader
with torch's arguments, SGD, epochs, accuracy. With CUDA present, fastfeed stages
batches on the GPU (``device=``) and the model gets uint8 images it normalizes there.
Each epoch prints the share of step time the loop waited for data (the stall fraction)
and fastfeed's verdict; ``--loader torch`` measures torch's loader the same way
(consumer-side, with ``fastfeed.hooks.watch``) so the two can be compared.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn.functional as F
from _data import ImageDataset, dataset_path, pick_device
from torch import nn

from fastfeed import image
from fastfeed.hooks import watch


class SmallCNN(nn.Module):
    """Four conv blocks and a linear head; takes uint8 (N, 3, H, W) images."""

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        chans = [3, width, width * 2, width * 4, width * 4]
        blocks: list[nn.Module] = []
        for cin, cout in itertools.pairwise(chans):
            blocks += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)]
            blocks += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(chans[-1], num_classes)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize on the model's device: the loader ships 4x fewer bytes as uint8.
        x = (x.float() - self.mean) / self.std
        x = self.features(x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", help="ImageFolder root, file list or LMDB (default: generated)")
    p.add_argument("--val", help="validation data (default: generated when --data is not given)")
    p.add_argument("--loader", choices=("fastfeed", "torch"), default="fastfeed")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="loader workers (threads/processes)")
    p.add_argument("--size", type=int, default=64, help="training crop size, pixels")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--width", type=int, default=32, help="channels of the first conv layer")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="tiny data, 2 epochs (smoke test)")
    args = p.parse_args(argv)
    if args.fast:
        args.epochs, args.batch_size, args.size, args.width = 2, 16, 32, 8
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    train_path = dataset_path(args.data, fast=args.fast, seed=args.seed)
    val_path = args.val
    if val_path is None and args.data is None:
        val_path = dataset_path(None, fast=True, seed=args.seed + 1)

    train_tf = image.Compose(
        [image.RandomResizedCrop(args.size, scale=(0.35, 1.0)), image.RandomHorizontalFlip()]
    )
    val_tf = image.Compose([image.Resize(args.size), image.CenterCrop(args.size)])
    train_set = ImageDataset(train_path, train_tf)
    num_classes = len(train_set.classes) if train_set.classes else 1000

    # The switch: fastfeed.DataLoader takes torch's arguments and returns the same batches.
    if args.loader == "torch":
        from torch.utils.data import DataLoader

        extra = {}
    else:
        from fastfeed import DataLoader

        extra = {"device": device} if device.type == "cuda" else {}
    train_loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=args.workers > 0,
        **extra,
    )
    val_loader = None
    if val_path is not None:
        val_loader = DataLoader(
            ImageDataset(val_path, val_tf),
            batch_size=args.batch_size,
            num_workers=args.workers,
            **extra,
        )
    # torch's loader records nothing: measure its waits from the training loop's side.
    batches = watch(train_loader) if args.loader == "torch" else train_loader

    model = SmallCNN(num_classes, args.width).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, args.lr, total_steps=args.epochs * len(train_loader)
    )
    print(
        f"{args.loader} DataLoader: {len(train_set)} images, {num_classes} classes, "
        f"batch {args.batch_size}, {args.workers} workers, device {device}",
        flush=True,
    )

    result: dict[str, float] = {}
    for epoch in range(args.epochs):
        if hasattr(train_loader.sampler, "set_epoch"):  # a DistributedSampler, if you use one
            train_loader.sampler.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        seen = correct = 0
        loss_sum = 0.0
        for images, labels in batches:
            images = images.to(device, non_blocking=True)  # no-op when already staged
            labels = labels.to(device, non_blocking=True)
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sched.step()
            seen += labels.numel()
            correct += int((logits.argmax(1) == labels).sum())
            loss_sum += loss.item() * labels.numel()
        elapsed = time.perf_counter() - t0
        val_acc = evaluate(model, val_loader, device) if val_loader is not None else None
        stats = batches.stats()  # fastfeed.DataLoader and watch() both have stats()
        line = (
            f"epoch {epoch + 1}/{args.epochs}  loss {loss_sum / seen:.3f}  "
            f"train acc {correct / seen:.1%}  "
            + (f"val acc {val_acc:.1%}  " if val_acc is not None else "")
            + f"{seen / elapsed:,.0f} samples/s  stall {stats.stall_fraction:.1%} "
            f"({stats.verdict.bound.value})"
        )
        print(line, flush=True)
        print(f"  verdict: {stats.verdict.sentence}", flush=True)
        batches.recorder.reset()  # per-epoch figures
        result = {
            "loss": loss_sum / seen,
            "train_acc": correct / seen,
            "val_acc": -1.0 if val_acc is None else val_acc,
            "stall_fraction": stats.stall_fraction,
        }
    return result


@torch.no_grad()
def evaluate(model: nn.Module, loader: object, device: torch.device) -> float:
    """Top-1 accuracy of ``model`` over ``loader``."""
    model.eval()
    correct = total = 0
    for images, labels in loader:  # type: ignore[attr-defined]
        logits = model(images.to(device, non_blocking=True))
        correct += int((logits.argmax(1) == labels.to(device)).sum())
        total += labels.numel()
    return correct / max(1, total)


if __name__ == "__main__":
    main()
