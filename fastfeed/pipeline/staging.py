"""Copy batches onto the device on a side CUDA stream, ahead of the training loop.

:class:`DeviceStager` runs one thread (``fastfeed-stager-<n>``) that takes host batches
from an iterator and, for a CUDA device:

1. issues ``non_blocking`` copies of every tensor leaf on its own CUDA stream, so the
   copy engine works while the training loop's kernels run on theirs;
2. optionally finishes the batch on the GPU, still on the side stream: uint8 → float32,
   ``(x - mean) / std`` and ``channels_last`` (4x fewer bytes cross PCIe than float32);
3. records an event, waits for it (with the GIL released; two copies stay queued so the
   copy engine never idles), reports the measured GPU copy time as the ``copy`` stage,
   and gives the host buffers back to the collator's ring: the copy is complete, and
   the device batch is a fresh tensor, so the slot can be rewritten without any
   batch the user holds ever changing;
4. hands the device batch over through a bounded queue (``staged``).

The consumer side (``__next__``, in the training loop's thread) makes the consumer's
current stream wait on the batch's event (``current_stream().wait_event``) before the
batch is used, and calls ``record_stream`` on every device tensor for that stream, so the
caching allocator never gives the memory to another tensor while the training step may
still read it. (The training loop's wait and step times are taken by the consumer tap
after it, :mod:`fastfeed.pipeline.tap`.)

For ``device="cpu"`` the same thread and queue run without streams or events (the
"copy" is ``Tensor.to("cpu")``, a no-op for CPU tensors), which is how the logic is
tested on machines without a GPU.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from fastfeed._threads import ExceptionBox, join_all, start_thread
from fastfeed.errors import (
    ConfigError,
    FastFeedError,
    LoaderTimeoutError,
    SampleError,
    describe_indices,
)
from fastfeed.pipeline.buffers import map_tensors, tensor_leaves
from fastfeed.profiling import Queue, Recorder, Stage

__all__ = ["COPIES_IN_FLIGHT", "DeviceStager", "resolve_device"]

_POLL_S = 0.05  # how often blocked waits look at the stop event, seconds
_JOIN_S = 2.0  # close() waits at most this long for the stager thread, seconds
COPIES_IN_FLIGHT = 2  # queued copies per stream: the next one is ready when one ends

_END = object()  # the upstream iterator is exhausted


class _Staged:
    """A device batch and the event its consumer stream must wait on (None on CPU)."""

    __slots__ = ("batch", "event")

    def __init__(self, batch: Any, event: Any) -> None:
        self.batch = batch
        self.event = event


class _Flight:
    """A batch whose copy was issued but not yet confirmed complete."""

    __slots__ = ("cpu_s", "device_batch", "done", "host", "issued_at", "items", "nbytes", "start")

    def __init__(self) -> None:
        self.host: Any = None
        self.device_batch: Any = None
        self.start: Any = None  # timing event before the copy (CUDA)
        self.done: Any = None  # event after the copy and finishing (CUDA)
        self.issued_at = 0.0
        self.cpu_s = 0.0
        self.items = 0
        self.nbytes = 0


class _Finisher:
    """uint8 → float32, per-channel normalization and channels_last for 4-D leaves."""

    def __init__(
        self,
        device: torch.device,
        to_float: bool,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        channels_last: bool,
    ) -> None:
        if (mean is None) != (std is None):
            raise ConfigError("mean and std must be given together (one value per channel)")
        self.to_float = to_float
        self.channels_last = channels_last
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        if mean is not None and std is not None:
            mean_l, std_l = [float(m) for m in mean], [float(s) for s in std]
            if not mean_l or len(mean_l) != len(std_l):
                raise ConfigError(
                    f"mean and std need one value per channel, got {len(mean_l)} means "
                    f"and {len(std_l)} stds"
                )
            if any(s == 0.0 for s in std_l):
                raise ConfigError(f"std must not contain 0, got {std_l}")
            self.mean = torch.tensor(mean_l, dtype=torch.float32, device=device).view(1, -1, 1, 1)
            self.std = torch.tensor(std_l, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.active = to_float or channels_last or self.mean is not None

    def __call__(self, batch: Any) -> Any:
        if not self.active:
            return batch
        found: list[bool] = []
        out = map_tensors(batch, lambda t: self._finish(t, found))
        if not found:
            shapes = [tuple(t.shape) for t in tensor_leaves(batch)]
            raise ConfigError(
                "to_float / mean / std / channels_last apply to 4-D image batches "
                f"(N, C, H, W), but this batch has none: tensor shapes {shapes}"
            )
        return out

    def _finish(self, t: torch.Tensor, found: list[bool]) -> torch.Tensor:
        if t.dim() != 4:
            return t  # labels, masks, metadata: left as they are
        found.append(True)
        if self.mean is not None and t.shape[1] != self.mean.shape[1]:
            raise ConfigError(
                f"mean/std have {self.mean.shape[1]} channels but the batch is "
                f"{tuple(t.shape)} (N, C, H, W) with C={t.shape[1]}"
            )
        fmt = torch.channels_last if self.channels_last else torch.preserve_format
        src = t
        if (self.to_float or self.mean is not None) and t.dtype != torch.float32:
            # One kernel converts and lays out; normalizing needs floats anyway.
            t = t.to(dtype=torch.float32, memory_format=fmt)
        elif self.channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        if self.mean is not None and self.std is not None:
            if t.untyped_storage().data_ptr() == src.untyped_storage().data_ptr():
                t = torch.sub(t, self.mean)  # never normalize the caller's tensor in place
            else:
                t = t.sub_(self.mean)
            t = t.div_(self.std)
        return t


class _StagerState:
    """State shared by the stager thread and the consumer.

    Kept apart from :class:`DeviceStager` so the thread holds no reference to it: dropping
    the last reference to the stager finalizes it and stops the thread.
    """

    def __init__(
        self,
        batches: Iterator[Any],
        device: torch.device,
        finisher: _Finisher,
        collator: Any,
        recorder: Recorder,
        depth: int,
    ) -> None:
        self.upstream: Iterator[Any] | None = batches
        self.device = device
        self.cuda = device.type == "cuda"
        self.finisher = finisher
        self.collator = collator
        self.recorder = recorder
        self.depth = depth
        self.stream: Any = torch.cuda.Stream(device) if self.cuda else None
        self.stop = threading.Event()
        self.cond = threading.Condition()
        self.ready: deque[Any] = deque()  # _Staged, ExceptionBox or _END (guarded by cond)
        self.thread: threading.Thread | None = None

    # -- stager thread -------------------------------------------------------------------

    def run(self) -> None:
        try:
            if self.cuda:
                with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
                    self._loop()
            else:
                self._loop()
        except BaseException as exc:  # a bug or a CUDA failure: the consumer must hear of it
            self._put(ExceptionBox(exc))
        finally:
            self.upstream = None  # let a generator upstream be collected
            self._put(_END)

    def _loop(self) -> None:
        pending: deque[_Flight] = deque()
        in_flight = COPIES_IN_FLIGHT if self.cuda else 1
        upstream = self.upstream
        assert upstream is not None
        while not self.stop.is_set():
            try:
                host = next(upstream)
            except StopIteration:
                break
            except BaseException as exc:  # re-raised at its position (the loader decides)
                self._drain(pending)
                self._put(ExceptionBox(exc))
                continue
            try:
                pending.append(self._issue(host))
            except BaseException as exc:
                self._drain(pending)
                self._put(ExceptionBox(_copy_error(host, exc)))
                continue
            while len(pending) >= in_flight and not self.stop.is_set():
                self._complete(pending.popleft())
        self._drain(pending)

    def _drain(self, pending: deque[_Flight]) -> None:
        while pending and not self.stop.is_set():
            self._complete(pending.popleft())

    def _issue(self, host: Any) -> _Flight:
        f = _Flight()
        f.host = host
        leaves = tensor_leaves(host)
        f.nbytes = sum(t.numel() * t.element_size() for t in leaves)
        indices = _indices_of(host)
        if indices is not None:
            f.items = len(indices)
        else:
            f.items = leaves[0].shape[0] if leaves and leaves[0].dim() > 0 else 0
        f.issued_at = time.perf_counter()
        c0 = time.thread_time()
        if self.cuda:
            f.start = torch.cuda.Event(enable_timing=True)
            f.start.record(self.stream)
            dev = map_tensors(host, lambda t: t.to(self.device, non_blocking=True))
            f.device_batch = self.finisher(dev)
            # blocking=True: synchronize() sleeps instead of spinning a core.
            f.done = torch.cuda.Event(enable_timing=True, blocking=True)
            f.done.record(self.stream)
        else:
            f.device_batch = self.finisher(map_tensors(host, lambda t: t.to(self.device)))
        f.cpu_s = time.thread_time() - c0
        return f

    def _complete(self, f: _Flight) -> None:
        if f.done is not None:
            f.done.synchronize()  # releases the GIL; a copy always finishes
            end = time.perf_counter()
            # The GPU's own measure of this copy (+ finishing), not time spent queued.
            start = end - f.start.elapsed_time(f.done) / 1000.0
        else:
            end = time.perf_counter()
            start = f.issued_at
        self.recorder.add(Stage.COPY, start, end, f.cpu_s, items=f.items, nbytes=f.nbytes)
        if self.collator is not None:
            # The copy is complete and nothing else saw these host buffers: the ring may
            # rewrite them as soon as the references below are gone.
            self.collator.release(f.host, ready_event=f.done)
        f.host = None
        self._put(_Staged(f.device_batch, f.done))

    def _put(self, item: Any) -> None:
        t0 = time.perf_counter()
        with self.cond:
            while len(self.ready) >= self.depth and item is not _END:
                if self.stop.is_set():
                    return
                self.cond.wait(_POLL_S)
            self.ready.append(item)
            depth = len(self.ready)
            self.cond.notify_all()
        if item is not _END:
            self.recorder.queue(
                Queue.STAGED, depth=depth, capacity=self.depth, put_wait_s=time.perf_counter() - t0
            )

    # -- consumer ------------------------------------------------------------------------

    def get(self, timeout_s: float | None) -> Any:
        t0 = time.perf_counter()
        deadline = None if timeout_s is None else t0 + timeout_s
        with self.cond:
            while not self.ready:
                thread = self.thread
                if thread is None or not thread.is_alive():
                    return _END  # ended without its end marker (only if killed mid-put)
                remaining = _POLL_S if deadline is None else deadline - time.perf_counter()
                if remaining <= 0:
                    raise LoaderTimeoutError(
                        f"no batch left the device stager within timeout={timeout_s:g} s "
                        f"(copying to {self.device})"
                    )
                self.cond.wait(min(remaining, _POLL_S))
            item = self.ready.popleft()
            depth = len(self.ready)
            self.cond.notify_all()
        if item is not _END:
            self.recorder.queue(
                Queue.STAGED, depth=depth, capacity=self.depth, get_wait_s=time.perf_counter() - t0
            )
        return item

    def shutdown(self) -> list[threading.Thread]:
        """Stop the thread and join it within 2 s; returns it if still alive."""
        self.stop.set()
        with self.cond:
            self.ready.clear()  # drop staged device batches now, not at collection
            self.cond.notify_all()
        threads = [self.thread] if self.thread is not None else []
        alive = join_all(threads, _JOIN_S)
        with self.cond:
            self.ready.clear()
        if self.cuda and not alive:
            # Kernels still queued on the side stream read mean/std, which were allocated
            # on another stream: let them finish before those can be freed.
            self.stream.synchronize()
        return alive


class DeviceStager:
    """Iterate device batches, copied ahead of the training loop on a side stream.

    Args:
        batches: Host batches: tensors or nested tuples/lists/dicts of tensors (tuple
            subclasses and their attributes, e.g. ``.indices``, are kept).
        device: Target device (``"cuda"``, ``"cuda:1"``, ``torch.device``, or ``"cpu"``).
        collator: The :class:`~fastfeed.pipeline.collate.Collator` that built the batches; each
            host batch is released to it once its copy is complete.
        recorder: Receives the ``copy`` stage and the ``staged`` queue.
        to_float: Convert 4-D integer batches (N, C, H, W) to float32 on the device (the
            values are not rescaled: fold 1/255 into ``mean``/``std``).
        mean: Per-channel mean subtracted on the device, in the data's units (e.g.
            ``(123.7, 116.3, 103.5)`` for uint8 images); implies float32.
        std: Per-channel standard deviation divided by on the device, same units.
        channels_last: Return 4-D batches in ``torch.channels_last`` memory format.
        timeout_s: Longest the training loop waits for one batch, seconds; None waits as
            long as the stager thread lives (upstream timeouts still apply).
        depth: Device batches staged ahead of the consumer (device memory: about
            ``depth + 3`` batches).

    Raises:
        ConfigError: A CUDA device without CUDA, bad ``mean``/``std`` or ``depth``.
    """

    def __init__(
        self,
        batches: Iterable[Any],
        device: str | torch.device | int,
        *,
        collator: Any = None,
        recorder: Recorder | None = None,
        to_float: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        channels_last: bool = False,
        timeout_s: float | None = None,
        depth: int = 2,
    ) -> None:
        dev = resolve_device(device)
        if depth < 1:
            raise ConfigError(f"depth (staged batches) must be >= 1, got {depth}")
        if timeout_s is not None and timeout_s < 0:
            raise ConfigError(f"timeout must be >= 0 seconds, got {timeout_s}")
        self.device = dev
        self.timeout_s = timeout_s or None
        self.recorder = recorder if recorder is not None else Recorder(enabled=False)
        finisher = _Finisher(dev, to_float, mean, std, channels_last)
        self._state = _StagerState(iter(batches), dev, finisher, collator, self.recorder, depth)
        self._closed = False
        self._finished = False
        self._state.thread = start_thread("stager", self._state.run)
        self._finalizer = weakref.finalize(self, _StagerState.shutdown, self._state)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._closed or self._finished:
            raise StopIteration
        item = self._state.get(self.timeout_s)
        if item is _END:
            self._finished = True
            self._finalizer()  # the thread has ended: join it now
            raise StopIteration
        if isinstance(item, _Staged) and item.event is not None:
            consumer = torch.cuda.current_stream(self.device)
            # The training step's kernels may not start before the copy has landed ...
            consumer.wait_event(item.event)
            # ... and the allocator must not reuse this memory while they still run.
            for t in tensor_leaves(item.batch):
                if t.device.type == "cuda":
                    t.record_stream(consumer)
        if isinstance(item, ExceptionBox):
            item.reraise()
        return item.batch

    @property
    def stream(self) -> Any:
        """The side CUDA stream copies run on (None for a CPU device)."""
        return self._state.stream

    @property
    def threads(self) -> list[threading.Thread]:
        """The stager thread while it runs (empty once joined)."""
        t = self._state.thread
        return [t] if t is not None and t.is_alive() else []

    def close(self) -> None:
        """Stop the stager thread and join it within 2 s. Idempotent.

        The thread stops between batches; if it is blocked inside the upstream iterator
        (close that first), it is a daemon and exits as soon as the upstream returns.
        """
        self._closed = True
        self._finalizer()

    def __enter__(self) -> DeviceStager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_device(device: str | torch.device | int) -> torch.device:
    """The one device rule of fastfeed: ``cuda[:i]`` that exists, or ``cpu``.

    Raises:
        ConfigError: Not a device, CUDA without CUDA, a GPU index that does not exist, or
            another device type (the stager copies to CUDA or the CPU).
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"invalid device {device!r}: not a torch device ({exc})") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={str(device)!r} but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device={str(device)!r} but only {torch.cuda.device_count()} GPU(s) exist"
            )
    elif dev.type != "cpu":
        raise ConfigError(f"device={str(device)!r}: the stager copies to 'cuda' or 'cpu' only")
    return dev


def _copy_error(host: Any, exc: BaseException) -> BaseException:
    """Name the batch in a copy failure; configuration errors pass through unchanged."""
    if isinstance(exc, FastFeedError):
        return exc
    indices = _indices_of(host) or []
    where = (
        f"batch of indices {describe_indices(indices)}" if indices else "batch (indices unknown)"
    )
    err = SampleError(indices[0] if indices else None, where, Stage.COPY, exc)
    err.__cause__ = exc
    return err


def _indices_of(batch: Any) -> list[int] | None:
    """The dataset indices a batch carries (the Loader's ``.indices``), if any."""
    if isinstance(batch, torch.Tensor):
        return None  # Tensor.indices is the sparse-tensor method, not dataset indices
    indices = getattr(batch, "indices", None)
    if indices is None or callable(indices):
        return None
    return list(indices)
