"""``fastfeed.Loader``: the native prefetching pipeline over a source.

Stages, one batch at a time::

    EpochSampler ──batch of indices──▶ worker thread:                       ──▶ consumer
    (seed, epoch,                        source.hint(upcoming batch)             Batch(data, labels)
     rank, resume)                       source.read_many(indices)   "read"      .indices
                                         transform each sample       "transform"
                                         collate / batch_transform   "collate"

Each worker thread does a whole batch (read, transform every sample, collate), so a batch
costs one hand-off between threads, not one per sample. At most ``prefetch`` batches are in
flight or waiting, so memory is bounded however slow the training loop is. Output order is
the sampler's order (deterministic for any thread count) unless ``in_order=False``.

Epochs. ``set_epoch(e)`` chooses the epoch of the next iteration. Without it, every new
``iter(loader)`` moves to the next epoch (the first is epoch 0), so two plain ``for``
loops see two different shuffles, as with torch's ``DataLoader``. Starting a new iteration
stops the previous one (one active iteration per loader): its next ``next()`` raises
:class:`~fastfeed.errors.FastFeedError` saying so, as after ``close()`` or an error.

Resume. ``state_dict()`` is a tiny JSON-serializable dict (seed, epoch, position, batches
delivered past the position with ``in_order=False``, failures so far) describing the
batches handed to the consumer. ``load_state_dict(state)`` makes the next iteration yield
exactly the batches of that epoch that were not delivered. A state saved at the very end
of an epoch resumes at the start of the next epoch, as the uninterrupted loader would.
``set_epoch(e)`` after ``load_state_dict`` keeps the resume point when ``e`` is the saved
(unfinished) epoch, and starts ``e`` from scratch otherwise.

Wiring. The constructor validates its arguments into a
:class:`~fastfeed.pipeline.run.WorkSpec` (what every worker runs) and a
:class:`~fastfeed.pipeline.assemble.PipelineSpec` (how batches reach the loop);
:func:`~fastfeed.pipeline.assemble.assemble` decides the rest (pinning, ring size, stager,
who releases slots, who times the loop, threads or worker processes).
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import torch

from fastfeed._torch_compat.errors import add_context
from fastfeed.errors import ConfigError, FastFeedError, LoaderTimeoutError
from fastfeed.pipeline.assemble import Finish, PipelineSpec, assemble
from fastfeed.pipeline.batch import Batch, SkippedSample
from fastfeed.pipeline.build import sample_spec
from fastfeed.pipeline.run import EpochIterator, EpochRun, WorkSpec
from fastfeed.pipeline.sampling import EpochProgress, EpochSampler, prepare_block_order
from fastfeed.pipeline.staging import resolve_device
from fastfeed.profiling import Recorder
from fastfeed.sources.base import Source, source_chain
from fastfeed.stats import LoaderStats

__all__ = ["Loader"]

_CLOSED = "the Loader was closed (Loader.close())"  # why a closed loader's iteration stopped


def _int_arg(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class Loader:
    """Iterate batches ``(data, labels)`` from a fastfeed source, prefetched on threads.

    Args:
        source: Any :class:`~fastfeed.sources.base.Source` (files, LMDB, a RAM cache...).
        transform: Called per sample on the record bytes. If it has ``sample_spec() ->
            (shape, dtype)`` (a fixed shape), it is called as ``transform(data, out=row)``
            and writes straight into a preallocated batch (no ``torch.stack``); otherwise
            its outputs are collated with ``collate_fn``. None: samples are the raw record
            bytes (bytes-like, as the source returned them) and ``data`` is a list of them.
        batch_size: Samples per batch.
        shuffle: Shuffle each epoch, seeded by ``(seed, epoch)``. ``"block"``: shuffle runs
            of consecutive records and samples within windows of a few runs, so a packed
            source reads each run with one large request (slow disks; see
            :mod:`fastfeed.pipeline.sampling`).
        seed: Seed of the shuffle and of per-sample random transforms
            (``fastfeed.rng.sample_rng()`` is keyed by ``(seed, epoch, index)``).
        drop_last: Drop the incomplete last batch of each epoch (per rank).
        num_threads: Worker threads; 0 runs everything inline in the consumer's thread.
            Default: the CPUs available to this process (at most 16).
        prefetch: Batches in flight or ready, at most (default ``2 * num_threads``, >= 2).
        in_order: Yield batches in sampler order (deterministic). False yields them as
            they finish (higher throughput when batch costs vary).
        on_error: ``"raise"``: a failing sample raises :class:`SampleError` in the training
            loop. ``"skip"``: failing samples are left out and reported in
            :attr:`skipped`; batches shrink by exactly the skipped samples (never
            padded with neighbours), and a batch whose samples all failed is not yielded.
            Failures that are not the sample's fault still raise in skip mode:
            :class:`~fastfeed.errors.ResourceLimitError` (too many open files) and
            :class:`~fastfeed.errors.CorruptSourceError` (the source broke as a whole).
        max_failures: With ``on_error="skip"``, the most samples that may fail per epoch:
            an int count, or a float fraction of this rank's samples per epoch. More
            raises :class:`TooManyFailuresError`. None: no limit.
        timeout: Longest wait for the next batch, seconds, before
            :class:`LoaderTimeoutError` names the indices in flight (with
            ``num_threads=0``, batches are then built on one helper thread so the wait
            can end). None or 0 waits indefinitely.
        rank: This process's rank; default from ``torch.distributed`` when initialized.
        world_size: Number of ranks; default from ``torch.distributed`` when initialized.
        even_batches: ``"pad"`` repeats the first samples of the order so every rank has
            the same number of samples (like ``DistributedSampler``); ``"drop"`` drops
            the tail instead.
        collate_fn: Generic collate for samples without a fixed shape (torch's
            ``default_collate`` by default).
        device: Where batches are delivered (e.g. ``"cuda"``): a
            :class:`~fastfeed.pipeline.staging.DeviceStager` thread copies each batch on its own
            CUDA stream ahead of the training loop. None keeps batches on the CPU where
            the workers built them.
        pin_memory: Collate into reusable page-locked host buffers (a pinned ring) for
            fast asynchronous copies. Default: True when ``device`` is a CUDA device.
        to_float: Convert 4-D integer image batches to float32 on ``device`` after the
            copy (4x fewer bytes cross PCIe than converting on the host).
        mean: Per-channel mean subtracted on ``device``, in the data's units (e.g.
            ``(123.7, 116.3, 103.5)`` for uint8 images); implies float32.
        std: Per-channel standard deviation divided by on ``device``, same units.
        channels_last: Deliver 4-D batches in ``torch.channels_last`` memory format.
        profile: Record per-stage timings in :attr:`recorder`. False disables it.
        batch_transform: ``batch_transform(list_of_samples) -> data`` replaces collate:
            vectorised decoding of tiny records, e.g. ``np.frombuffer(b"".join(...))``.
            Its random draws use the key ``(seed, epoch, -(batch_number + 1))``.
        torch_threads: torch intra-op threads of each worker thread (default 1, so
            ``num_threads`` workers never oversubscribe the cores); None leaves torch
            alone. The training loop's own setting is kept (module docstring).
        read_ahead: Tell the source the indices of the next ``prefetch`` batches
            (``source.hint``) so it can start reading them. Hints pay off when reads wait
            on storage; for data already in RAM or the page cache they are pure overhead
            (e.g. about 8 us per record for an LMDB, more than the read), so turn them off
            there.
        processes: Worker processes, each running ``num_threads`` worker threads and
            writing finished batches straight into shared-memory slots of this process
            (no GIL shared with the training loop; one GIL per process). 0 runs the
            threads in this process. ``"auto"``: processes when batches go to a CUDA
            device and there are at least 4 cores, else threads (the rule and its
            measurements: :func:`fastfeed.pipeline.assemble.choose_processes`); the
            default. ``"auto"`` falls back to threads when the work does not pickle.
            Batches are identical in every mode. The source, transforms and
            ``collate_fn`` must pickle under ``start_method="spawn"``.
        start_method: How worker processes start: ``"fork"`` (default where CUDA is
            not initialised: fast), ``"spawn"`` (default otherwise) or ``"forkserver"``.

    Attributes:
        recorder: The :class:`~fastfeed.profiling.Recorder` every stage reports to.
        skipped: :class:`SkippedSample` entries of the current iteration (skip mode).
        sampler: The :class:`~fastfeed.pipeline.sampling.EpochSampler` that orders each epoch.
        rank: This process's rank.
        world_size: Number of ranks.
    """

    def __init__(
        self,
        source: Source,
        transform: Callable[..., Any] | None = None,
        batch_size: int = 1,
        shuffle: bool | str = False,
        seed: int = 0,
        drop_last: bool = False,
        num_threads: int | None = None,
        prefetch: int | None = None,
        in_order: bool = True,
        on_error: str = "raise",
        max_failures: int | float | None = None,
        timeout: float | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        even_batches: str = "pad",
        collate_fn: Callable[[list[Any]], Any] | None = None,
        device: str | torch.device | None = None,
        pin_memory: bool | None = None,
        profile: bool = True,
        batch_transform: Callable[[list[Any]], Any] | None = None,
        torch_threads: int | None = 1,
        read_ahead: bool = True,
        to_float: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        channels_last: bool = False,
        processes: int | str = "auto",
        start_method: str | None = None,
    ) -> None:
        if not isinstance(source, Source):
            raise ConfigError(f"source must be a fastfeed Source, got {type(source).__name__}")
        try:
            len(source)
        except Exception as exc:  # the user's own error, with where it happened
            where = f"fastfeed: len() of the source {type(source).__name__} failed"
            add_context(exc, f"{where} while building the Loader")
            raise
        if transform is not None and not callable(transform):
            raise ConfigError(f"transform must be callable, got {type(transform).__name__}")
        if batch_transform is not None and not callable(batch_transform):
            raise ConfigError(
                f"batch_transform must be callable, got {type(batch_transform).__name__}"
            )
        if num_threads is not None:
            _int_arg("num_threads", num_threads, 0)
        if prefetch is not None:
            _int_arg("prefetch", prefetch, 1)
        if processes != "auto":
            processes = _int_arg("processes", processes, 0)
            if processes > 0 and num_threads == 0:
                raise ConfigError("processes > 0 needs num_threads >= 1 in each process")
        if start_method is not None and start_method not in ("fork", "spawn", "forkserver"):
            raise ConfigError(
                f"start_method must be 'fork', 'spawn' or 'forkserver', got {start_method!r}"
            )
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if max_failures is not None:
            if on_error != "skip":
                raise ConfigError("max_failures only applies with on_error='skip'")
            if isinstance(max_failures, bool) or not isinstance(max_failures, (int, float)):
                raise ConfigError(f"max_failures must be an int or a float, got {max_failures!r}")
            if isinstance(max_failures, float) and not 0.0 <= max_failures <= 1.0:
                raise ConfigError(
                    f"max_failures as a fraction must be in [0, 1], got {max_failures}"
                )
            if isinstance(max_failures, int) and max_failures < 0:
                raise ConfigError(f"max_failures must be >= 0, got {max_failures}")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout < 0):
            raise ConfigError(f"timeout must be a number of seconds >= 0, got {timeout!r}")
        if torch_threads is not None:
            _int_arg("torch_threads", torch_threads, 1)
        spec = sample_spec(transform)
        if batch_transform is not None and spec is not None:
            raise ConfigError(
                "batch_transform cannot be combined with a fixed-shape transform "
                "(one with sample_spec()): that transform already writes the batch"
            )
        if batch_transform is not None and collate_fn is not None:
            raise ConfigError("give batch_transform or collate_fn, not both")

        self.source = source
        self.transform = transform
        self.batch_transform = batch_transform
        self.collate_fn = collate_fn
        self.batch_size = _int_arg("batch_size", batch_size, 1)
        self.shuffle = shuffle if isinstance(shuffle, str) else bool(shuffle)  # sampler checks
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.in_order = bool(in_order)
        self.on_error = on_error
        self.max_failures = max_failures
        self.timeout = float(timeout) if timeout else None
        self.torch_threads = torch_threads
        self.read_ahead = bool(read_ahead)
        self.device = None if device is None else resolve_device(device)
        finish = Finish(to_float, mean, std, channels_last)
        if self.device is None and finish.any:
            raise ConfigError(
                "to_float, mean, std and channels_last finish batches on a device: give "
                "device= (e.g. 'cuda', or 'cpu' to finish on the host)"
            )
        if (mean is None) != (std is None):
            raise ConfigError("give mean and std together (normalisation needs both)")
        self.sampler = EpochSampler(
            len(source),
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            seed=seed,
            drop_last=self.drop_last,
            rank=rank,
            world_size=world_size,
            even_batches=even_batches,
            block_records=prepare_block_order(source) if self.shuffle == "block" else None,
        )
        self.rank = self.sampler.rank
        self.world_size = self.sampler.world_size
        self.even_batches = even_batches
        self.recorder = Recorder(enabled=bool(profile))
        self._pipeline = assemble(
            PipelineSpec(
                recorder=self.recorder,
                in_flight=prefetch,
                device=self.device,
                pin_memory=pin_memory,
                collate_fn=collate_fn,
                finish=finish,
                timeout_s=self.timeout,
                processes=processes,
                num_threads=num_threads,
                start_method=start_method,
            )
        )
        self._pipeline.settle(source, transform, batch_transform)
        #: Worker threads (in each worker process when :attr:`processes` > 0).
        self.num_threads = self._pipeline.num_threads
        #: Worker processes (0: threads of this process); see ``stats().execution``.
        self.processes = self._pipeline.processes
        #: Batches in flight or ready ahead of the training loop, at most.
        self.prefetch = self._pipeline.in_flight
        self._work = WorkSpec(
            source=source,
            transform=transform,
            batch_transform=batch_transform,
            sample_spec=spec,
            seed=seed,
            skip=on_error == "skip",
            max_failures=max_failures,
            failure_limit=_failure_limit(max_failures, self.sampler.samples_per_epoch),
            num_threads=self.num_threads,
            prefetch=self.prefetch,
            in_order=self.in_order,
            timeout_s=self.timeout,
            torch_threads=torch_threads,
            read_ahead=self.read_ahead,
        )
        if self.processes > 0:
            _warn_if_cache_copied(source, self.processes)
            # Collected without close(): stop the workers and free the shared slots.
            weakref.finalize(self, self._pipeline.close)
        #: Whether batch buffers are page-locked (decided by the assembly point).
        self.pin_memory = self._pipeline.pinned
        #: The collator in-process workers build batches with.
        self.collator = self._pipeline.collator
        self.skipped: list[SkippedSample] = []
        # The epoch of the last started (or loaded / chosen) iteration and what of it was
        # delivered; _resume: the next iteration continues it instead of moving on.
        self._progress = EpochProgress(epoch=0)
        self._resume = True
        self._active: weakref.ref[EpochRun] | None = None
        self._closed = False

    # -- epochs and state -------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The epoch of the current (or last started, or chosen next) iteration."""
        return self._progress.epoch

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch of the next iteration (reshuffles with ``(seed, epoch)``).

        Keeps a loaded resume point when ``epoch`` is the loaded, unfinished epoch.
        """
        epoch = _int_arg("epoch", epoch, -(2**63))
        if not (self._resume and self._progress.epoch == epoch):
            self._progress = EpochProgress(epoch=epoch)
            self._resume = True

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self.sampler.num_batches

    def stats(self, *, gather: bool = False) -> LoaderStats:
        """What this loader measured so far, with a verdict: is training input-bound?

        Args:
            gather: Also gather every rank's figures under torch.distributed and name the
                slowest rank. A collective call: every rank must make it.

        Returns:
            A :class:`~fastfeed.stats.LoaderStats` (``.stall_fraction``, ``.verdict``,
            ``.summary()``, ``.to_dict()``, ``.save_trace(path)``).
        """
        return LoaderStats.collect(
            self.recorder,
            batch_size=self.batch_size,
            source=self.source,
            num_threads=self.num_threads * max(1, self.processes),
            skipped=self.skipped,
            device=self.device,
            execution={**self._pipeline.describe_mode(), "order": self._order_name()},
            gather=gather,
        )

    def _order_name(self) -> str:
        """The sample order in words: ``"block"``, ``"random"`` or ``"sequential"``."""
        if self.shuffle == "block":
            return "block"
        return "random" if self.shuffle else "sequential"

    def state_dict(self) -> dict[str, Any]:
        """A small JSON-serializable resume state; counts batches handed to the consumer."""
        return self._progress.to_state(self.seed, self.sampler.describe())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next iteration yields exactly the rest.

        Raises:
            ConfigError: The state is malformed or from a differently configured loader.
        """
        seed, progress = EpochProgress.from_state(
            state, self.sampler.describe(), self.sampler.num_batches
        )
        self._close_active("load_state_dict() was called")
        self.seed = seed
        self.sampler.seed = seed
        self._work = dataclasses.replace(self._work, seed=seed)
        self._progress = progress
        # A finished epoch resumes at the start of the next one, like the uninterrupted loader.
        self._resume = not progress.complete(self.sampler.num_batches)

    # -- iteration --------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        if self._closed:
            raise FastFeedError("this Loader is closed; create a new one")
        self._close_active("iter(loader) started a new iteration (one runs at a time)")
        if not self._resume:
            self._progress = EpochProgress(epoch=self._progress.epoch + 1)
        self._resume = False
        self.skipped = []
        batches = self.sampler.batches(self._progress.epoch)
        owner = None
        engine = None
        if self.processes > 0:
            engine, owner = self._pipeline.workers(self._work)
        run = EpochRun(self._work, self._pipeline, batches, self._progress, self.skipped, engine)
        self._active = weakref.ref(run)
        if self._closed:  # close() ran in another thread while this iteration started
            run.close(reason=_CLOSED)
        return EpochIterator(self._deliver(run, owner), run.epoch)

    def _deliver(self, run: EpochRun, owner: Any = None) -> Generator[Batch, None, None]:
        # The consumer-facing generator: the only strong owner of `run`, so dropping or
        # closing it stops the workers (finally below, or the prefetcher's finalizer).
        results = run.results()
        tap = self._pipeline.deliver(results, owner=owner, on_close=results.close)
        try:
            for batch in tap:
                run.commit()
                yield batch
            if run.stopped is not None:  # not the epoch's end: say so, never end silently
                raise FastFeedError(
                    f"this iteration over epoch {run.epoch} was stopped because "
                    f"{run.stopped}; it delivers no more batches"
                )
            run.finish()
        except LoaderTimeoutError:
            run.close(join_s=0.0)  # a worker is stuck: do not wait for it (daemon thread)
            raise
        finally:
            tap.close()
            run.close()

    def _close_active(self, reason: str) -> None:
        run = self._active() if self._active is not None else None
        self._active = None
        if run is not None:
            run.close(reason=reason)

    def close(self) -> None:
        """Stop the active iteration and join its threads (within 2 s). Idempotent.

        The source is not closed: the caller owns it (and may share it).
        """
        self._closed = True
        self._close_active(_CLOSED)
        self._pipeline.close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Loader({type(self.source).__name__} of {len(self.source)}, "
            f"batch_size={self.batch_size}, num_threads={self.num_threads}, "
            f"prefetch={self.prefetch}, rank={self.rank}/{self.world_size}, "
            f"epoch={self.epoch})"
        )


def _failure_limit(max_failures: int | float | None, samples_per_epoch: int) -> int | None:
    """Failures allowed per epoch: ``max_failures`` as a count (a float is a fraction)."""
    if max_failures is None:
        return None
    if isinstance(max_failures, float):
        return int(max_failures * samples_per_epoch)
    return max_failures


def _warn_if_cache_copied(source: Source, processes: int) -> None:
    """Warn that each worker process would fill its own copy of a RAM cache."""
    from fastfeed.sources.memory import MemoryCache

    for node in source_chain(source):
        if isinstance(node, MemoryCache):
            if node.shared:  # one copy per machine, found by every worker process
                return
            warnings.warn(
                f"processes={processes} with a MemoryCache: each worker process fills its "
                f"own copy of the cache ({processes} copies of up to its capacity, and a "
                "lower hit rate per copy); use MemoryCache(shared=True) or processes=0",
                UserWarning,
                stacklevel=3,
            )
            return
