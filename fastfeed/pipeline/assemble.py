"""The one assembly point: how a loader's stages are wired, decided in one place.

The front doors (:class:`fastfeed.Loader`, :class:`fastfeed.DataLoader`) validate their
arguments and build a :class:`PipelineSpec`; :func:`assemble` turns it into a
:class:`Pipeline` and is the only code that decides:

- **pinning**: whether batch buffers are page-locked (:func:`decide_pin`, one warning
  policy for both doors);
- **ring size**: slots = batches in flight upstream + one with the training loop + one
  being copied by the device stager (:func:`ring_slots`);
- **stager**: a :class:`~fastfeed.pipeline.staging.DeviceStager` exactly when a device is
  given, always with the slot owner, so a copied slot is reused, never retired;
- **who releases slots**: the stager (after the copy's event) when there is one, else the
  consumer :class:`~fastfeed.pipeline.tap.Tap` (when the loop comes back);
- **who times the loop**: the tap, always, and nothing else;
- **execution mode** of the Loader: in-process threads or worker processes
  (:func:`choose_processes`, rule and measurements in its docstring).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fastfeed.pipeline.collate import Collator
from fastfeed.pipeline.staging import COPIES_IN_FLIGHT, DeviceStager
from fastfeed.pipeline.tap import Tap
from fastfeed.profiling import Recorder

__all__ = [
    "Finish",
    "Pipeline",
    "PipelineSpec",
    "SlotOwner",
    "assemble",
    "choose_processes",
    "choose_worker_type",
    "decide_pin",
    "default_threads",
    "ring_slots",
]


class SlotOwner(Protocol):
    """Who hands out batch buffers and takes them back (a collator, a shared ring)."""

    def release(self, batch: Any, *, ready_event: Any = None) -> None: ...


@dataclass(frozen=True)
class Finish:
    """GPU-side finishing of 4-D image batches, applied by the device stager.

    Attributes:
        to_float: uint8 → float32 on the device.
        mean: Per-channel mean subtracted on the device, in the data's units.
        std: Per-channel standard deviation divided by, same units.
        channels_last: Deliver in ``torch.channels_last`` memory format.
    """

    to_float: bool = False
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    channels_last: bool = False

    @property
    def any(self) -> bool:
        return self.to_float or self.mean is not None or self.std is not None or self.channels_last

    def kwargs(self) -> dict[str, Any]:
        return {
            "to_float": self.to_float,
            "mean": self.mean,
            "std": self.std,
            "channels_last": self.channels_last,
        }


@dataclass(frozen=True)
class PipelineSpec:
    """What a front door decided about a loader, for :func:`assemble` (no façade inside).

    Attributes:
        recorder: Where every stage reports.
        in_flight: Batches in flight or ready upstream of the training loop, at most; None:
            twice the workers (threads x processes), at least 2.
        device: Where batches are delivered (validated by ``resolve_device``), or None.
        pin_memory: The user's request; None pins exactly when ``device`` is CUDA.
        collate_fn: The user's generic collate (None: ``default_collate`` semantics).
        finish: GPU-side finishing (needs ``device``).
        timeout_s: Longest wait of the training loop for one batch (None: no limit).
        processes: Worker processes for the Loader: an int >= 0 or ``"auto"``.
        num_threads: Worker threads (per worker process in process mode); None: the
            usable cores (at most 16), shared among the worker processes.
        start_method: How worker processes start (None: fork where safe, else spawn).
        pin_warning_stacklevel: ``stacklevel`` of the pin warning, so it points at the
            user's constructor call.
    """

    recorder: Recorder
    in_flight: int | None = None
    device: torch.device | None = None
    pin_memory: bool | None = None
    collate_fn: Callable[[list[Any]], Any] | None = None
    finish: Finish = field(default_factory=Finish)
    timeout_s: float | None = None
    processes: int | str = 0
    num_threads: int | None = 0
    start_method: str | None = None
    pin_warning_stacklevel: int = 4


def decide_pin(requested: bool | None, device: torch.device | None, stacklevel: int = 3) -> bool:
    """Whether batch buffers are page-locked: the one pinning policy of both loaders.

    Args:
        requested: ``pin_memory`` as the user gave it; None means "when it helps", i.e.
            exactly when batches go to a CUDA device.
        device: The delivery device, or None.
        stacklevel: Where the warning points (the user's constructor call).

    Returns:
        True when buffers will be pinned. Asking for pinning where it is impossible (no
        CUDA, or MPS) gives one ``UserWarning`` for this loader and ordinary memory, never
        an error, as torch does.
    """
    if requested is None:
        return device is not None and device.type == "cuda"
    if not requested:
        return False
    if torch.cuda.is_available():
        return True
    acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if acc is not None and acc.type == "mps":
        why = "pin_memory=True is not supported on MPS"
    else:
        why = "pin_memory=True but no accelerator (CUDA) is available"
    warnings.warn(
        f"{why}: batches stay in ordinary (pageable) memory", UserWarning, stacklevel=stacklevel
    )
    return False


def ring_slots(in_flight: int) -> int:
    """Ring slots per buffer shape: every batch that can hold a slot at once.

    The batches in flight or ready upstream, plus :data:`COPIES_IN_FLIGHT` more: with a
    device stager, the copies it keeps queued (it releases a slot once its copy's event
    completed); without one, the batch the training loop holds and one being built while
    the tap hands it back. Measured on an H200 (round 1): fewer slots retire buffers.
    """
    return in_flight + COPIES_IN_FLIGHT


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_threads(processes: int = 0) -> int:
    """Worker threads when none are given: the usable cores (at most 16), shared among
    ``processes`` worker processes (each gets its share, at least 1)."""
    return max(1, min(16, usable_cores() // max(processes, 1)))


def choose_processes(
    requested: int | str, device: torch.device | None, cores: int | None = None
) -> tuple[int, str]:
    """The Loader's execution mode: worker processes (K > 0) or in-process threads (0).

    The rule for ``processes="auto"`` (measurements in benchmarks/noisy_neighbour.py and
    the README's performance section): worker threads share the training loop's GIL, and
    a Python-bound training step runs +60-70% slower beside one fast-JPEG worker thread,
    against a few percent beside a worker process. That cost matters when the training
    loop is the GPU's feeder, i.e. when batches go to a CUDA device; for CPU training the
    model's own ops compete for the same cores and the threads' lower memory and instant
    start win. So:

    - batches go to CUDA and there are at least 4 cores: ``max(1, min(4, cores // 4))``
      worker processes (each runs the threaded pipeline);
    - otherwise (CPU training, or fewer than 4 cores): in-process threads.

    Returns:
        ``(processes, reason)``; the reason is shown by ``stats()``.
    """
    if requested != "auto":
        k = int(requested)
        return k, ("processes=0: in-process threads" if k == 0 else f"processes={k} given")
    cores = usable_cores() if cores is None else cores
    if device is None or device.type != "cuda":
        return 0, "auto: batches stay on the host (CPU training): in-process threads"
    if cores < 4:
        return 0, f"auto: only {cores} cores: in-process threads"
    k = max(1, min(4, cores // 4))
    return k, (
        f"auto: batches go to {device} with {cores} cores: {k} worker process(es) keep the "
        "loader's threads off the training loop's GIL"
    )


class Pipeline:
    """A loader's wiring, built by :func:`assemble`.

    Attributes:
        spec: What it was built from.
        pinned: Whether batch buffers are page-locked.
        slots: Ring slots per buffer shape.
        collator: The collator in-process workers build batches with (it owns the ring).
        processes: Worker processes (0: in-process threads).
        mode_reason: Why that execution mode was chosen.
    """

    def __init__(self, spec: PipelineSpec, pinned: bool, processes: int, reason: str) -> None:
        self.spec = spec
        self.pinned = pinned
        self._set_mode(processes, reason)
        self._pool: Any = None
        self._ring: Any = None

    def _set_mode(self, processes: int, reason: str) -> None:
        spec = self.spec
        self.processes = processes
        self.mode_reason = reason
        self.num_threads = (
            spec.num_threads if spec.num_threads is not None else default_threads(processes)
        )
        workers = self.num_threads * max(processes, 1)
        self.in_flight = spec.in_flight if spec.in_flight is not None else max(2, 2 * workers)
        self.slots = ring_slots(self.in_flight)
        self.collator = Collator(spec.collate_fn, pin_memory=self.pinned, slots=self.slots)

    def settle(self, *work: Any) -> None:
        """``processes="auto"`` only: fall back to threads when the work cannot travel.

        Worker processes started with spawn (the default once CUDA is initialised)
        receive the source, transforms and ``collate_fn`` pickled; a lambda or a local
        class cannot be. An explicit ``processes=K`` keeps K and fails at ``iter()``
        with pickle's own error; ``"auto"`` chooses threads instead and says why.
        """
        if self.spec.processes != "auto" or self.processes == 0:
            return
        import pickle

        try:
            pickle.dumps((*work, self.spec.collate_fn))
        except Exception as exc:
            self._set_mode(
                0,
                f"auto: the loader's work does not pickle for worker processes "
                f"({type(exc).__name__}: {exc}): in-process threads",
            )

    @property
    def mode(self) -> str:
        """``"threads"`` or ``"processes"``."""
        return "processes" if self.processes > 0 else "threads"

    def describe_mode(self) -> dict[str, Any]:
        """Which execution mode runs and why (for ``stats()``)."""
        return {
            "mode": self.mode,
            "processes": self.processes,
            "threads": self.num_threads,
            "in_flight": self.in_flight,
            "reason": self.mode_reason,
        }

    def workers(self, work: Any) -> tuple[Any, SlotOwner]:
        """The persistent worker-process pool (started on first use) and its slot owner.

        Args:
            work: The :class:`~fastfeed.pipeline.run.WorkSpec` every worker runs.
        """
        from fastfeed.workers.processes import ProcessPool, WorkerRecipe, default_start_method
        from fastfeed.workers.shm import SharedRing

        if self._ring is None:
            to_cuda = self.spec.device is not None and self.spec.device.type == "cuda"
            self._ring = SharedRing(self.slots, pin=self.pinned and to_cuda)
        if self._pool is None or not self._pool.alive():
            if self._pool is not None:
                self._pool.shutdown()
                if self._pool.broken is not None:  # a worker died (maybe killed while idle)
                    warnings.warn(
                        f"starting new worker processes: {self._pool.broken}", stacklevel=3
                    )
            recipe = WorkerRecipe(
                work=work,
                collate_fn=self.spec.collate_fn,
                threads=self.num_threads,
                depth=max(1, -(-self.in_flight // self.processes)),
                torch_threads=work.torch_threads,
                profile=self.spec.recorder.enabled,
            )
            self._pool = ProcessPool(
                recipe,
                self._ring,
                processes=self.processes,
                start_method=self.spec.start_method or default_start_method(),
                recorder=self.spec.recorder,
                timeout_s=self.spec.timeout_s,
                in_flight=self.in_flight,
                in_order=work.in_order,
            )
        return self._pool, self._ring

    def close(self) -> None:
        """Stop worker processes and free the shared slots. Idempotent."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    def ring_stats(self) -> dict[str, Any]:
        """Counters of the buffer ring in use (shared slots in process mode)."""
        if self._ring is not None:
            return dict(self._ring.stats(), pinned=self._ring.pin)
        return self.collator.stats()

    def deliver(
        self,
        batches: Iterator[Any],
        *,
        owner: SlotOwner | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> Tap[Any]:
        """Wire the output: ``batches`` → (device stager) → tap → the training loop.

        Args:
            batches: Host batches from the workers.
            owner: Who takes their buffers back (default: :attr:`collator`).
            on_close: Stops the stages upstream of ``batches``.
        """
        owner = self.collator if owner is None else owner
        spec = self.spec
        if spec.device is None:
            return Tap(batches, spec.recorder, release=owner.release, on_close=on_close)
        stager = DeviceStager(
            batches,
            spec.device,
            collator=owner,
            recorder=spec.recorder,
            timeout_s=spec.timeout_s,
            **spec.finish.kwargs(),
        )

        def close() -> None:
            stager.close()
            if on_close is not None:
                on_close()

        return Tap(stager, spec.recorder, on_close=close)


def assemble(spec: PipelineSpec) -> Pipeline:
    """Decide the wiring of a loader from its spec (see the module docstring)."""
    pinned = decide_pin(spec.pin_memory, spec.device, stacklevel=spec.pin_warning_stacklevel)
    processes, reason = choose_processes(spec.processes, spec.device)
    if processes > 0 and spec.device is None and spec.pin_memory:
        warnings.warn(
            "pin_memory=True with worker processes and no device: the shared batch slots "
            "are page-locked only for the device stager; give device='cuda' to pin them",
            UserWarning,
            stacklevel=spec.pin_warning_stacklevel,
        )
        pinned = False
    return Pipeline(spec, pinned, processes, reason)


def choose_worker_type(
    requested: str,
    *,
    num_workers: int,
    iterable: bool,
    worker_init_fn: bool,
    multiprocessing_context: bool,
    uses_global_rng: Callable[[], bool | None],
    persistent_workers: bool = False,
) -> tuple[str, str]:
    """The drop-in DataLoader's workers: ``"thread"`` or ``"process"``, and why.

    ``worker_type="auto"`` picks threads only where the training script observes the
    same behaviour as with torch's worker processes; any of these picks processes:

    1. a ``multiprocessing_context`` (it configures processes);
    2. a ``worker_init_fn`` (it usually seeds or configures per-process state: the RNGs,
       ``get_worker_info().dataset``; with threads that state is the training loop's);
    3. an IterableDataset with workers (torch gives each worker a copy to configure and
       iterate; threads would share one object);
    4. ``persistent_workers=True``: not a difference a script sees, but the case where
       threads stop paying off. The processes start once, their batches come back
       through reused shared-memory slots (:mod:`fastfeed._torch_compat.transport`), and
       they do not share the training loop's GIL. Measured (``python
       benchmarks/dataloader_dropin.py --rounds 7``, 2 cores, ``num_workers=2``): 3 KB
       records 410k samples/s in processes against 284k in threads, JPEG decode + crop
       2,177 images/s against 2,080;
    5. a dataset whose ``dataset[0]`` (and custom ``collate_fn``) draws from a global RNG
       (``torch``, ``random``, numpy), or whose probe read failed: torch seeds each
       worker's RNGs, threads share the training loop's, so results would differ
       between runs and the loop's own random stream would depend on loader timing.
       Calling ``get_worker_info()`` counts too (a dataset that asks is one that behaves
       per worker): torch hands batches to its workers in a fixed rotation, threads take
       them as they come free.

    Otherwise (and always with ``num_workers=0``): threads, which start at once and
    share the dataset instead of copying it (without persistent workers, processes pay
    their start every epoch: 196k samples/s against 261k in threads on 3 KB records).
    Not decidable and so not a rule: whether ``__getitem__`` is safe to call from several
    threads at once.

    Args:
        requested: ``"auto"``, ``"thread"`` or ``"process"``.
        num_workers: The loader's ``num_workers``.
        iterable: The dataset is an IterableDataset.
        worker_init_fn: One was given.
        multiprocessing_context: One was given.
        uses_global_rng: The probe (called only when the other rules do not decide).
        persistent_workers: The loader keeps its workers between epochs.

    Returns:
        ``(worker_type, reason)``; the reason is shown by ``stats()``.
    """
    if requested != "auto":
        return requested, f"worker_type={requested!r} given"
    if num_workers == 0:
        return "thread", "auto: num_workers=0 loads in the calling thread, as torch does"
    if multiprocessing_context:
        return "process", "auto: a multiprocessing_context was given"
    if worker_init_fn:
        return "process", "auto: a worker_init_fn was given (it sets per-worker process state)"
    if iterable:
        return "process", "auto: an IterableDataset with workers (each worker gets its own copy)"
    if persistent_workers:
        return "process", (
            "auto: persistent_workers=True: processes start once, return batches through "
            "reused shared-memory slots and keep off the training loop's GIL"
        )
    probe = uses_global_rng()
    if probe is None:
        return (
            "process",
            "auto: the probe read of dataset[0] failed or did not finish, so nothing is assumed",
        )
    if probe:
        return "process", (
            "auto: reading dataset[0] drew from a global RNG (torch/random/numpy) or called "
            "get_worker_info(), both of which differ per worker process"
        )
    return "thread", (
        "auto: map-style dataset, no worker_init_fn or multiprocessing_context, and "
        "dataset[0] draws from no global RNG: threads behave as torch's processes"
    )
