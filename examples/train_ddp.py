"""Data-parallel training with fastfeed.Loader: per-rank shards and a cross-rank stall report.

    torchrun --nproc-per-node 2 examples/train_ddp.py              # CPU: gloo, GPU: nccl
    torchrun --nproc-per-node 8 examples/train_ddp.py --data train.lmdb --epochs 10

``fastfeed.Loader`` reads rank and world size from ``torch.distributed``: each rank gets
a disjoint shard of every epoch's shuffle (padded like ``DistributedSampler`` so all
ranks run the same number of steps), and ``set_epoch`` reshuffles. After each epoch every
rank calls ``loader.stats(gather=True)`` (a collective: it gathers all ranks' figures) and
rank 0 prints each rank's stall fraction, the slowest rank and the stragglers: under
synchronous data parallelism the whole job runs at the pace of the rank starved of data.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _data import synthetic_data
from torch.nn.parallel import DistributedDataParallel
from train_classifier import SmallCNN

from fastfeed import Loader, MemoryCache, image
from fastfeed.sources import open_source


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", help="ImageFolder root, file list or LMDB (default: generated)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--threads", type=int, default=2, help="loader threads per rank")
    p.add_argument("--size", type=int, default=64, help="training crop size, pixels")
    p.add_argument("--cache", default="1GiB", help="RAM cache per rank (0 disables)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--fast", action="store_true", help="tiny data, 2 epochs (smoke test)")
    args = p.parse_args()
    if args.fast:
        args.epochs, args.batch_size, args.size = 2, 8, 32
    return args


def main() -> None:
    args = parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    # One GPU per local rank, or none: with fewer GPUs than ranks, every rank uses the CPU.
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= local_world
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)

    # Rank 0 generates the data once; the others wait for it and get its path.
    path = [args.data]
    if args.data is None:
        if rank == 0:
            path = [synthetic_data(4, 8 if args.fast else 80, lmdb=True)]
        dist.broadcast_object_list(path, src=0)

    source = open_source(path[0])
    if args.cache not in ("0", ""):
        source = MemoryCache(source, capacity=args.cache)  # fill once, never evict
    transform = image.Compose(
        [image.RandomResizedCrop(args.size, scale=(0.35, 1.0)), image.RandomHorizontalFlip()]
    )
    loader = Loader(
        source,
        transform=transform,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_threads=args.threads,
        device=device if cuda else None,
        pin_memory=cuda,
    )  # rank and world size come from torch.distributed
    num_classes = len(source.classes) if source.classes else 1000
    model = SmallCNN(num_classes, width=8 if args.fast else 32).to(device)
    model = DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    if rank == 0:
        print(
            f"{world} ranks ({'nccl' if cuda else 'gloo'}), {len(source)} images, "
            f"{len(loader)} steps per epoch of {args.batch_size} per rank",
            flush=True,
        )

    for epoch in range(args.epochs):
        loader.set_epoch(epoch)  # a new shuffle, split into disjoint per-rank shards
        t0 = time.perf_counter()
        seen: list[int] = []
        loss_sum = torch.zeros((), device=device)
        for batch in loader:
            images, labels = batch
            seen.extend(batch.indices)  # dataset indices of this rank's samples
            logits = model(images.to(device, non_blocking=True))
            loss = F.cross_entropy(logits, labels.to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP all-reduces the gradients here
            optimizer.step()
            loss_sum += loss.detach() * labels.numel()
        elapsed = time.perf_counter() - t0
        # Every rank must call this (it gathers across ranks); rank 0 prints it.
        stats = loader.stats(gather=True)
        shards: list[list[int]] = [[] for _ in range(world)]
        dist.all_gather_object(shards, seen)
        dist.all_reduce(loss_sum)
        if rank == 0:
            overlap = len(set(shards[0]).intersection(*map(set, shards[1:]))) if world > 1 else 0
            total = sum(map(len, shards))
            print(
                f"epoch {epoch + 1}/{args.epochs}  loss {float(loss_sum) / total:.3f}  "
                f"{elapsed:.1f} s  samples per rank {[len(s) for s in shards]}  "
                f"seen by every rank: {overlap}",
                flush=True,
            )
            for r in stats.ranks:
                print(
                    f"  rank {r.rank}: stall {r.stall_fraction:.1%}, "
                    f"wait {r.wait_per_step_s * 1e3:.1f} ms of {r.step_mean_s * 1e3:.1f} ms "
                    f"per step, {r.bound}",
                    flush=True,
                )
            print(
                f"  slowest rank {stats.slowest_rank}; stragglers: {stats.stragglers or 'none'}",
                flush=True,
            )
        loader.recorder.reset()
    loader.close()
    # Leave together: a rank that tears down its gloo connections while a peer is still
    # using them can abort the peer ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
