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

Block order (``shuffle="block"``): locality for slow storage
------------------------------------------------------------
A full shuffle reads one record per IO operation. On a disk that counts operations (an
HDD, a network or cloud volume with an IOPS quota) that caps an epoch far below the
disk's bandwidth. Block order keeps runs of consecutive records together so a packed
source reads each run with one large request (see
:class:`~fastfeed.sources.lmdb.LMDBSource`), and shuffles at two levels:

1. The records are cut into runs of ``block_records`` consecutive indices (several MB:
   :func:`block_records_for` asks the source; :func:`prepare_block_order` also switches
   on its whole-run reads). The runs are permuted, seeded by
   ``(seed, epoch)``.
2. The runs' records, in that order, form the epoch's sequence. Ranks take contiguous,
   equal shares of it (each rank reads whole runs, except at most one run split with a
   neighbour at each end of its share); ``"pad"`` repeats the head of the sequence,
   ``"drop"`` drops the tail, as above.
3. Each rank's share is cut into windows of ``window_blocks`` runs' worth of records,
   and the records of each window are permuted (seeded by ``(seed, epoch, rank)``).

What it gives up: a batch draws from the ``window_blocks`` runs of its window (a window
holds ``window_blocks * block_records`` records) instead of the whole dataset. Two
samples of a batch share a run with probability about ``1 / window_blocks`` instead of
``1 / number_of_runs``, and records packed next to each other (an ImageFolder packs class
by class) are seen close together in time. ``benchmarks/block_order.py`` measures both
and a training run against a full shuffle. The state is as tiny as ever: the order is a
pure function of ``(seed, epoch, rank, world_size)`` and the configuration.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastfeed.errors import ConfigError
from fastfeed.sources.base import source_chain

__all__ = [
    "DEFAULT_BLOCK_RECORDS",
    "EpochProgress",
    "EpochSampler",
    "block_records_for",
    "default_window_blocks",
    "prepare_block_order",
    "resolve_rank",
]

_STATE_VERSION = 1
_MASK64 = 0xFFFFFFFFFFFFFFFF
_BLOCK_STREAM = 0xB10C  # separates block-order streams from the full shuffle's
#: Run length of sources that do not say theirs (no ``run_records``).
DEFAULT_BLOCK_RECORDS = 64
#: At least this many samples of a batch per run of its window: a packed source reads a
#: run whole when a call needs several of its records (LMDBSource: 3 or more on average).
_SAMPLES_PER_RUN = 8
_MAX_WINDOW_BLOCKS = 16


def block_records_for(source: Any) -> int:
    """Records per run for block order over ``source``.

    The source's own ``run_records`` (an :class:`~fastfeed.sources.LMDBSource`: records of
    its mean size in about 4 MiB), looked up through wrappers that keep the source they
    wrap in ``.source`` (a :class:`~fastfeed.sources.MemoryCache`);
    :data:`DEFAULT_BLOCK_RECORDS` otherwise.
    """
    for node in source_chain(source):
        runs = getattr(node, "run_records", None)
        if isinstance(runs, int) and not isinstance(runs, bool) and runs >= 1:
            return runs
    return DEFAULT_BLOCK_RECORDS


def prepare_block_order(source: Any) -> int:
    """Set ``source`` up for block order; return its records per run.

    Switches on whole-run reads (``read_runs = True``) of the source and of the sources
    it wraps (``.source``) where they offer them (:class:`~fastfeed.sources.LMDBSource`),
    then returns :func:`block_records_for`. ``Loader(shuffle="block")`` calls it.
    """
    for node in source_chain(source):
        if isinstance(getattr(node, "read_runs", None), bool):
            node.read_runs = True
    return block_records_for(source)


def default_window_blocks(batch_size: int) -> int:
    """Runs per shuffle window: ``batch_size // 8``, between 1 and 16.

    A batch then holds about 8 samples of each run of its window (enough for a packed
    source to read each run whole) and two of its samples share a run with probability
    about ``1 / window``.
    """
    return max(1, min(_MAX_WINDOW_BLOCKS, batch_size // _SAMPLES_PER_RUN))


def _generator(*words: int) -> np.random.Generator:
    # SeedSequence mixes the words into independent streams; masking keeps negative
    # seeds/epochs valid (SeedSequence wants non-negative entropy).
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([w & _MASK64 for w in words]))
    )


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
        shuffle: ``True``: permute the order each epoch, seeded by ``(seed, epoch)``.
            ``False``: index order. ``"block"``: block order (module docstring).
        seed: Base seed of the shuffle.
        drop_last: Drop this rank's incomplete last batch.
        rank: This process's rank, ``0..world_size-1``.
        world_size: Number of ranks sharing the epoch.
        even_batches: ``"pad"`` repeats the first samples of the order so that every
            sample is seen; ``"drop"`` drops the tail so that no sample is seen twice.
        block_records: Block order: records per run (default
            :data:`DEFAULT_BLOCK_RECORDS`; the loaders pass :func:`block_records_for`).
        window_blocks: Block order: runs per shuffle window (default
            :func:`default_window_blocks`).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        batch_size: int,
        shuffle: bool | str = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int | None = 0,
        world_size: int | None = 1,
        even_batches: str = "pad",
        block_records: int | None = None,
        window_blocks: int | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not (isinstance(shuffle, (bool, np.bool_)) or shuffle == "block"):
            raise ConfigError(f"shuffle must be True, False or 'block', got {shuffle!r}")
        for name, value in (("block_records", block_records), ("window_blocks", window_blocks)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if even_batches not in ("pad", "drop"):
            raise ConfigError(f"even_batches must be 'pad' or 'drop', got {even_batches!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an int, got {seed!r}")
        if num_samples < 0:
            raise ConfigError(f"num_samples must be >= 0, got {num_samples}")
        rank, world_size = resolve_rank(rank, world_size)
        self.num_samples = int(num_samples)
        self.batch_size = batch_size
        self.shuffle: bool | str = "block" if shuffle == "block" else bool(shuffle)
        self.block_records = block_records or DEFAULT_BLOCK_RECORDS
        self.window_blocks = window_blocks or default_window_blocks(batch_size)
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
        """The whole epoch's order before sharding (int64).

        Length ``num_samples``; in block order, every rank's share one after the other
        (padded or trimmed to ``samples_per_rank * world_size`` with several ranks).
        """
        n = self.num_samples
        if self.shuffle == "block":
            return self._block_order(epoch)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return _generator(self.seed, epoch).permutation(n).astype(np.int64, copy=False)

    def _block_order(self, epoch: int) -> np.ndarray:
        """Runs permuted by ``(seed, epoch)``; each rank's share window-shuffled."""
        n, r, w = self.num_samples, self.block_records, self.world_size
        num_runs = -(-n // r)
        runs = _generator(self.seed, epoch, _BLOCK_STREAM).permutation(num_runs)
        grid = np.arange(num_runs * r, dtype=np.int64).reshape(num_runs, r)[runs].ravel()
        keep = grid < n
        seq = grid[keep]
        run_of = np.repeat(np.arange(num_runs, dtype=np.int64), r)[keep]  # position of its run
        share = self.samples_per_rank if w > 1 else n
        total = share * w
        if total > len(seq) and len(seq):
            reps = -(-total // len(seq))  # pad: repeat the head
            seq = np.tile(seq, reps)[:total]
            run_of = (np.arange(reps)[:, None] * num_runs + run_of[None, :]).ravel()[:total]
        else:
            seq, run_of = seq[:total], run_of[:total]
        out = np.empty_like(seq)
        for k in range(w):
            part = seq[k * share : (k + 1) * share]
            runs_here = run_of[k * share : (k + 1) * share]
            # Windows of whole runs: the n-th run met in this share is in window n // W.
            ordinal = np.concatenate(([0], np.cumsum(runs_here[1:] != runs_here[:-1])))
            windows = ordinal // self.window_blocks
            keys = _generator(self.seed, epoch, _BLOCK_STREAM, k + 1).random(len(part))
            out[k * share : (k + 1) * share] = part[np.lexsort((keys, windows))]
        return out

    def rank_order(self, epoch: int) -> np.ndarray:
        """This rank's share of the epoch's order (int64), before ``drop_last``."""
        order = self.global_order(epoch)
        w = self.world_size
        if w == 1:
            return order
        if self.shuffle == "block":
            share = self.samples_per_rank
            return order[self.rank * share : (self.rank + 1) * share]
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
            **(
                {"block_records": self.block_records, "window_blocks": self.window_blocks}
                if self.shuffle == "block"
                else {}
            ),
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
