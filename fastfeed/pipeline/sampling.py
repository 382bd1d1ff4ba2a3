"""The order of an epoch: shuffle, rank shards, batches, and the resume state.

Everything here is a pure function of ``(num_samples, seed, epoch, rank, world_size,
batch_size, ...)``, so any process can recompute any epoch's order from a few integers:
that is what makes mid-epoch resume exact and keeps distributed ranks in agreement
without communication.

The order of an epoch, step by step (:class:`EpochSampler`):

1. ``order = permutation(num_samples)`` seeded by ``(seed, epoch)`` (or ``0..n-1``
   without shuffle).
2. With ``world_size > 1`` the order is made divisible by ``world_size``:
   ``even_batches="pad"`` appends the first samples of the order again (as torch's
   ``DistributedSampler`` does), ``"drop"`` drops the tail. Rank ``r`` takes
   ``order[r::world_size]`` (a strided shard, as ``DistributedSampler``).
3. The shard is cut into batches of ``batch_size``; with ``drop_last`` an incomplete
   last batch is dropped. Every rank has the same number of samples, hence the same
   number of batches, so collective ops in DDP never wait for a rank that finished early.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastfeed.errors import ConfigError

__all__ = ["EpochProgress", "EpochSampler", "resolve_rank"]

_STATE_VERSION = 1


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Rank and world size: explicit values win, else the torch.distributed group, else (0, 1).

    Raises:
        ConfigError: Only one of ``rank`` / ``world_size`` is given, or they are out of range.
    """
    if (rank is None) != (world_size is None):
        raise ConfigError(
            f"give both rank and world_size or neither (got rank={rank}, world_size={world_size})"
        )
    if rank is None or world_size is None:
        try:
            import torch.distributed as dist
        except ImportError:  # pragma: no cover - torch builds without distributed
            return 0, 1
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size must be an int >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ConfigError(f"rank must be an int in 0..{world_size - 1}, got {rank!r}")
    return rank, world_size


class EpochSampler:
    """Computes each epoch's batches of dataset indices for one rank.

    Args:
        num_samples: Records in the source.
        batch_size: Samples per batch (>= 1).
        shuffle: Permute the order each epoch, seeded by ``(seed, epoch)``.
        seed: Base seed of the shuffle.
        drop_last: Drop this rank's incomplete last batch.
        rank: This process's rank, ``0..world_size-1``.
        world_size: Number of ranks sharing the epoch.
        even_batches: ``"pad"`` repeats the first samples of the order so that every
            sample is seen; ``"drop"`` drops the tail so that no sample is seen twice.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int | None = 0,
        world_size: int | None = 1,
        even_batches: str = "pad",
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if even_batches not in ("pad", "drop"):
            raise ConfigError(f"even_batches must be 'pad' or 'drop', got {even_batches!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an int, got {seed!r}")
        if num_samples < 0:
            raise ConfigError(f"num_samples must be >= 0, got {num_samples}")
        rank, world_size = resolve_rank(rank, world_size)
        self.num_samples = int(num_samples)
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.rank = rank
        self.world_size = world_size
        self.even_batches = even_batches

    # -- sizes --------------------------------------------------------------------------

    @property
    def samples_per_rank(self) -> int:
        """Samples of one epoch on this rank, before ``drop_last``."""
        n, w = self.num_samples, self.world_size
        if w == 1:
            return n
        if self.even_batches == "pad":
            return -(-n // w)
        return n // w

    @property
    def num_batches(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        per_rank, b = self.samples_per_rank, self.batch_size
        return per_rank // b if self.drop_last else -(-per_rank // b)

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank delivers per epoch (after ``drop_last``), without failures."""
        return min(self.samples_per_rank, self.num_batches * self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    # -- orders -------------------------------------------------------------------------

    def global_order(self, epoch: int) -> np.ndarray:
        """The whole epoch's order before sharding (int64, length ``num_samples``)."""
        n = self.num_samples
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        # SeedSequence mixes (seed, epoch) into independent streams; masking keeps
        # negative seeds/epochs valid (SeedSequence wants non-negative entropy).
        mask = 0xFFFFFFFFFFFFFFFF
        entropy = [v & mask for v in (self.seed, epoch)]
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
        return rng.permutation(n).astype(np.int64, copy=False)

    def rank_order(self, epoch: int) -> np.ndarray:
        """This rank's share of the epoch's order (int64), before ``drop_last``."""
        order = self.global_order(epoch)
        w = self.world_size
        if w == 1:
            return order
        total = self.samples_per_rank * w
        if total > len(order):
            # Pad like DistributedSampler: repeat the head of the order (several times
            # over when the dataset is smaller than the world).
            reps = -(-total // max(len(order), 1))
            order = np.tile(order, reps)[:total] if len(order) else order
        else:
            order = order[:total]
        return order[self.rank :: w]

    def batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of indices for ``epoch`` (views into one int64 array)."""
        order = self.rank_order(epoch)
        b = self.batch_size
        return [order[k * b : (k + 1) * b] for k in range(self.num_batches)]

    def describe(self) -> dict[str, Any]:
        """The configuration that a resume state must match, as plain values."""
        return {
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "rank": self.rank,
            "world_size": self.world_size,
            "even_batches": self.even_batches,
        }


@dataclass
class EpochProgress:
    """Which batches of one epoch were handed to the consumer.

    Batches are numbered ``0..num_batches-1`` in the epoch's order. ``position`` is the
    length of the contiguous delivered prefix; ``ahead`` holds batch numbers delivered
    past it (only with ``in_order=False``, where batches finish out of order).

    Attributes:
        epoch: The epoch.
        position: Batches ``0..position-1`` were all delivered.
        ahead: Delivered batch numbers ``> position``.
        failures: Samples skipped (``on_error="skip"``) in the delivered batches.
    """

    epoch: int
    position: int = 0
    ahead: set[int] = field(default_factory=set)
    failures: int = 0

    def mark(self, numbers: Iterable[int]) -> None:
        """Record batch numbers as delivered."""
        for k in numbers:
            if k == self.position:
                self.position += 1
                while self.position in self.ahead:
                    self.ahead.discard(self.position)
                    self.position += 1
            elif k > self.position:
                self.ahead.add(k)

    def remaining(self, num_batches: int) -> list[int]:
        """Batch numbers still to deliver, in order."""
        return [k for k in range(self.position, num_batches) if k not in self.ahead]

    def complete(self, num_batches: int) -> bool:
        """Every batch of the epoch was delivered."""
        return self.position >= num_batches

    def to_state(self, seed: int, config: dict[str, Any]) -> dict[str, Any]:
        """A small JSON-serializable dict: seed, epoch, position, ahead, failures, config."""
        return {
            "version": _STATE_VERSION,
            "seed": seed,
            "epoch": self.epoch,
            "position": self.position,
            "ahead": sorted(self.ahead),
            "failures": self.failures,
            **config,
        }

    @classmethod
    def from_state(
        cls, state: dict[str, Any], config: dict[str, Any], num_batches: int
    ) -> tuple[int, EpochProgress]:
        """Validate a state from :meth:`to_state` against this loader; return (seed, progress).

        Raises:
            ConfigError: The state is malformed, or was saved by a loader with another
                configuration (dataset size, batch size, shuffle, ranks...), where its
                batch numbers would mean other samples.
        """
        if not isinstance(state, dict):
            raise ConfigError(f"loader state must be a dict, got {type(state).__name__}")
        if state.get("version") != _STATE_VERSION:
            raise ConfigError(
                f"unsupported loader state version {state.get('version')!r} "
                f"(this fastfeed writes version {_STATE_VERSION})"
            )
        mismatched = {
            k: (state.get(k), v) for k, v in config.items() if k in state and state[k] != v
        }
        if mismatched:
            shown = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in mismatched.items())
            raise ConfigError(f"loader state was saved with another configuration ({shown})")
        try:
            seed = int(state["seed"])
            epoch = int(state["epoch"])
            position = int(state["position"])
            ahead = {int(k) for k in state.get("ahead", ())}
            failures = int(state.get("failures", 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed loader state {state!r}: {exc}") from exc
        if not 0 <= position <= num_batches or any(not position < k < num_batches for k in ahead):
            raise ConfigError(
                f"loader state position={position} ahead={sorted(ahead)} is outside "
                f"0..{num_batches} batches"
            )
        return seed, cls(epoch=epoch, position=position, ahead=ahead, failures=failures)
