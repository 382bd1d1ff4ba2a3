"""``fastfeed.DataLoader``: a drop-in for :class:`torch.utils.data.DataLoader`.

``from fastfeed import DataLoader`` and nothing else changes: the constructor has torch's
signature, defaults and validation (it *is* a subclass whose ``__init__`` runs torch's),
attributes, ``len()`` and batches. What changes is how ``num_workers`` run:

- ``worker_type="thread"``: worker threads of this process (no pickled dataset copies,
  no shared-memory IPC of batches, instant start);
- ``worker_type="process"``: torch's own worker processes; their batches come back
  through reused shared-memory slots (:mod:`fastfeed._torch_compat.transport`: 1.7-3.1x
  torch's rate on 3 KB records, 40-60% of its CPU per batch in the training process);
- ``worker_type="auto"`` (default): threads only where the script's observable
  behaviour is the same as with torch's processes, else processes; processes also with
  ``persistent_workers=True``, where they are the faster of the two. The rule is
  :func:`fastfeed.pipeline.assemble.choose_worker_type`; ``loader.worker_type`` and
  ``loader.worker_type_reason`` say what was chosen and why.

Both keep torch's semantics for: the order of batches and of RNG draws (same
``generator``, same order, epoch after epoch); several live iterators over one loader
(``zip(dl, dl)``, ``next(iter(dl))`` inside a loop); errors (the *original* exception
object reaches the loop, fastfeed's context added as a note); ``timeout`` (raising
:class:`~fastfeed.errors.LoaderTimeoutError`, also a RuntimeError). Added:
``state_dict()`` / ``load_state_dict()`` for exact mid-epoch resume, ``device=``,
``stats()``, and a forked child that iterates an inherited loader gets its own workers.

Thread workers, where they differ from processes (``auto`` picks processes for each):

- one dataset object is shared by the threads (torch gives each worker a copy):
  ``__getitem__`` must be safe to call from several threads at once;
- the process's RNGs are shared: a dataset drawing from ``torch``/``random``/``numpy``
  global RNGs is not reproducible across runs, and a ``worker_init_fn`` reseeding them
  would reseed the training loop (fastfeed restores them and warns);
- ``torch.utils.data.get_worker_info()`` answers per thread (``worker_method="thread"``),
  but threads take batches as they come free where torch rotates them over its workers,
  so per-worker state (a generator seeded from ``get_worker_info().seed``) sees other
  batches; it is hidden (None) while torch's ``default_collate`` runs, which would
  otherwise allocate shared memory that threads do not need;
- an IterableDataset gets one ``iter()`` per worker thread, like torch's processes: a
  dataset that shards itself by ``get_worker_info()`` is sharded across threads, one that
  configures ``get_worker_info().dataset`` in place would configure the shared object;
- ``multiprocessing_context`` is a ConfigError (threads start no processes).

Raised as :class:`~fastfeed.errors.ConfigError` (a ValueError) at construction, where
torch fails later or cannot apply: ``timeout > 0`` with ``num_workers=0``,
``prefetch_factor=0`` with workers, an unknown ``worker_type``, an unusable ``device``.
``pin_memory=True`` without an accelerator warns once per loader (torch: once per epoch).
"""

from __future__ import annotations

import copy
import functools
import os
import warnings
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch
from torch.utils.data import DataLoader as _TorchDataLoader
from torch.utils.data import IterableDataset

from fastfeed._torch_compat import torch_private as _tp
from fastfeed._torch_compat.fetch import Fetch
from fastfeed._torch_compat.process import ProcessIter, start_process_iter
from fastfeed._torch_compat.rngstate import probe_global_rng
from fastfeed._torch_compat.state import (
    Epoch,
    TrackedSampler,
    check_state,
    fresh_state,
    own_generator,
    start_epoch,
)
from fastfeed._torch_compat.threads import RNG_WARNING, Pool, ThreadIter
from fastfeed.errors import ConfigError
from fastfeed.pipeline.assemble import (
    Pipeline,
    PipelineSpec,
    assemble,
    choose_worker_type,
    usable_cores,
)
from fastfeed.pipeline.staging import resolve_device
from fastfeed.profiling import Recorder
from fastfeed.stats import LoaderStats

__all__ = ["DataLoader", "get_worker_info"]

_T_co = TypeVar("_T_co", covariant=True)

_WORKER_TYPES = ("auto", "thread", "process")
_THREADS_PER_CORE = 8  # worker threads per usable core before torch's warning is given


def get_worker_info() -> Any:
    """Worker information for the calling thread, like torch's ``get_worker_info``.

    In a fastfeed worker thread: a ``WorkerInfo`` with ``id`` (0..num_workers-1),
    ``num_workers``, ``seed`` (base seed + id), ``dataset`` (the shared dataset object)
    and ``worker_method="thread"``. Elsewhere (the main thread, or a torch worker process):
    torch's answer. Since torch's own ``get_worker_info()`` answers the same once a
    fastfeed thread pool started, either may be used.
    """
    info = getattr(_tp.THREAD_INFO, "info", None)
    return info if info is not None else _tp.torch_worker_info()


class DataLoader(_TorchDataLoader[_T_co], Generic[_T_co]):
    """:class:`torch.utils.data.DataLoader` with thread or process workers; a drop-in.

    Every torch argument keeps its meaning, default and validation (see the module
    docstring for the few, explicit, differences of thread workers). The extra
    arguments are keyword-only.

    Args:
        dataset: Map-style or iterable-style dataset, as torch.
        batch_size: Samples per batch; None disables auto-batching.
        shuffle: Reshuffle every epoch (map-style only).
        sampler: Index order; mutually exclusive with ``shuffle``.
        batch_sampler: Yields lists of indices; mutually exclusive with ``batch_size``,
            ``shuffle``, ``sampler`` and ``drop_last``.
        num_workers: Workers (threads or processes, see ``worker_type``); 0 loads in the
            calling thread.
        collate_fn: Merges samples into a batch (``default_collate``; ``default_convert``
            without auto-batching).
        pin_memory: Return batches in page-locked memory (needs an accelerator; without
            one: a single warning, ordinary memory).
        drop_last: Drop the last incomplete batch.
        timeout: Longest wait for one batch, seconds (0: no limit); needs workers.
            Raises :class:`LoaderTimeoutError`.
        worker_init_fn: Called with the worker id at the start of each worker.
        multiprocessing_context: Start method of worker processes (fork, spawn,
            forkserver or a context); ConfigError with ``worker_type="thread"``.
        generator: RNG of the default RandomSampler and of the base seed.
        prefetch_factor: Batches queued ahead per worker (default 2 with workers).
        persistent_workers: Keep the workers alive between epochs.
        pin_memory_device: Deprecated in torch; the current accelerator is used.
        in_order: Yield batches in sampler order; False yields them as they finish.
        device: Move each batch to this device (e.g. ``"cuda"``) before yielding it.
        worker_type: ``"auto"`` (default), ``"thread"`` or ``"process"``.
        profile: Record stage times into :attr:`recorder` (False: no timing at all).

    Attributes:
        recorder: The :class:`~fastfeed.profiling.Recorder` of this loader.
        worker_type: ``"thread"`` or ``"process"``: what runs the workers.
        worker_type_reason: Why (the rule of ``"auto"`` that decided, or "given").
        device: The :class:`torch.device` batches are moved to, or None.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler: Any = None,
        batch_sampler: Any = None,
        num_workers: int = 0,
        collate_fn: Callable[[Any], Any] | None = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        timeout: float = 0,
        worker_init_fn: Callable[[int], None] | None = None,
        multiprocessing_context: Any = None,
        generator: torch.Generator | None = None,
        *,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        pin_memory_device: str = "",
        in_order: bool = True,
        device: str | torch.device | None = None,
        worker_type: str = "auto",
        profile: bool = True,
    ) -> None:
        if worker_type not in _WORKER_TYPES:
            raise ConfigError(
                f"worker_type must be one of {_WORKER_TYPES}, got worker_type={worker_type!r}"
            )
        # Read by check_worker_number_rationality(); the real choice is made below.
        self.worker_type = worker_type
        super().__init__(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            batch_sampler=batch_sampler,
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=pin_memory,
            drop_last=drop_last,
            timeout=timeout,
            worker_init_fn=worker_init_fn,
            multiprocessing_context=multiprocessing_context,
            generator=generator,
            prefetch_factor=prefetch_factor,
            persistent_workers=persistent_workers,
            pin_memory_device=pin_memory_device,
            in_order=in_order,
        )
        if worker_type == "thread" and multiprocessing_context is not None:
            raise ConfigError(
                f"multiprocessing_context={multiprocessing_context!r} only applies to "
                "worker processes; thread workers start none (drop the argument, or pass "
                "worker_type='process' or 'auto')"
            )
        if timeout > 0 and num_workers == 0:
            raise ConfigError(
                f"timeout={timeout} needs num_workers > 0: loading in the calling thread "
                "cannot be interrupted (torch raises an AssertionError on iter() here)"
            )
        if num_workers > 0 and self.prefetch_factor == 0:
            raise ConfigError(
                "prefetch_factor=0 with num_workers > 0 would queue no batch at all; "
                "pass prefetch_factor >= 1 (torch asserts the same on iter())"
            )
        self.worker_type, self.worker_type_reason = choose_worker_type(
            worker_type,
            num_workers=num_workers,
            iterable=isinstance(dataset, IterableDataset),
            worker_init_fn=worker_init_fn is not None,
            multiprocessing_context=multiprocessing_context is not None,
            uses_global_rng=self._probe_global_rng,
            persistent_workers=bool(persistent_workers),
        )
        self.check_worker_number_rationality()
        self.device = None if device is None else resolve_device(device)
        self.recorder = Recorder(enabled=profile)
        if self.pin_memory and self.pin_memory_device:
            warnings.warn(
                "pin_memory_device is deprecated (as in torch): the current accelerator is "
                f"used; ignoring pin_memory_device={self.pin_memory_device!r}",
                stacklevel=2,
            )
        self._pipeline = self._assemble(pin_warning_stacklevel=5)
        self._init_running_state()

    def _init_running_state(self) -> None:
        self._pool: Pool | None = None  # the persistent thread pool (persistent_workers)
        self._pool_user: weakref.ReferenceType[ThreadIter] | None = None
        self._live: weakref.WeakSet[Any] = weakref.WeakSet()  # engine iterators, for close()
        self._latest: weakref.ReferenceType[Epoch] | None = None  # for state_dict()
        self._resume: dict[str, Any] | None = None
        self._torch_iter_pid = os.getpid()

    def _probe_global_rng(self) -> bool | None:
        """Does reading (and collating) sample 0 draw from a global RNG? (auto's probe)."""
        getitems = _tp.auto_collation(self) and bool(getattr(self.dataset, "__getitems__", None))
        return probe_global_rng(self.dataset, self.collate_fn, getitems=getitems)

    # -- pickling ---------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        # Like torch's, the loader pickles (spawn-based launchers do that); its running
        # state (workers, iterators, figures) does not travel.
        state = self.__dict__.copy()
        for name in ("_pool", "_pool_user", "_live", "_latest", "_iterator", "_pipeline"):
            state[name] = None
        state["recorder"] = None
        state["_profile"] = self.recorder.enabled
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        profile = state.pop("_profile", True)
        # Bypasses torch's __setattr__ guard, which forbids setting e.g. batch_size.
        self.__dict__.update(state)
        self.__dict__["recorder"] = Recorder(enabled=profile)
        self._init_running_state()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # given where the loader was built already
            self.__dict__["_pipeline"] = self._assemble()

    # -- configuration --------------------------------------------------------------

    def check_worker_number_rationality(self) -> None:
        """torch's warning about too many workers.

        For worker processes as torch (more than the usable cores); for threads only
        beyond ``_THREADS_PER_CORE`` per core: more threads than cores is fine for work
        that releases the GIL, a thousand is not.
        """
        worker_type = getattr(self, "worker_type", "auto")
        if worker_type == "auto":
            return  # decided (and checked) at the end of __init__
        if worker_type == "process" or self.num_workers > _THREADS_PER_CORE * usable_cores():
            super().check_worker_number_rationality()

    def _assemble(self, pin_warning_stacklevel: int = 4) -> Pipeline:
        """This loader's wiring, decided by the one assembly point."""
        return assemble(
            PipelineSpec(
                recorder=self.recorder,
                in_flight=self._in_flight(),
                device=self.device,
                pin_memory=bool(self.pin_memory),
                collate_fn=self.collate_fn,
                timeout_s=self.timeout or None,
                num_threads=self.num_workers,
                pin_warning_stacklevel=pin_warning_stacklevel,
            )
        )

    def _in_flight(self) -> int:
        """Batches a thread pool keeps in flight or ready (torch's prefetch_factor * workers)."""
        return (self.prefetch_factor or 1) * max(self.num_workers, 1)

    @property
    def _iterable(self) -> bool:
        return isinstance(self.dataset, IterableDataset)

    # -- iteration ----------------------------------------------------------------------

    def __iter__(self) -> Epoch:  # type: ignore[override]
        self._forget_if_forked()
        resume, self._resume = self._resume, None
        sampler = None if self._iterable else _tp.index_sampler(self)
        tracked, at_iter, user_rng = start_epoch(resume, self.generator, sampler)
        try:
            inner: ThreadIter | ProcessIter
            if self.worker_type == "process" and self.num_workers > 0:
                inner = start_process_iter(self, tracked)
            else:
                inner = self._thread_iter(tracked)
        finally:
            if user_rng is not None:
                torch.set_rng_state(user_rng)  # a resumed iter() leaves it as it found it
        self._live.add(inner)
        epoch = Epoch(
            self._pipeline.deliver(inner), inner, tracked, self.generator, self._iterable, at_iter
        )
        if resume is not None:
            epoch.catch_up(resume["batches_yielded"])
        self._latest = weakref.ref(epoch)
        return epoch

    def _forget_if_forked(self) -> None:
        """In a forked child: drop (never touch) the parent's workers, start afresh."""
        if os.getpid() == self._torch_iter_pid:
            return
        if self._pool is not None:
            self._pool.abandon()
            self._pool = None
        self._pool_user = None
        self._live = weakref.WeakSet()
        torch_iter = getattr(self, "_iterator", None)
        if torch_iter is not None:
            _tp.abandon_torch_iterator(torch_iter)
            self._iterator = None
        self._torch_iter_pid = os.getpid()

    def _thread_iter(self, tracked: TrackedSampler | None) -> ThreadIter:
        # torch's order: iter(index sampler), then the base-seed draw.
        sampler = tracked if tracked is not None else _tp.index_sampler(self)
        sampler_iter = iter(sampler)
        persistent = bool(self.persistent_workers) and self.num_workers > 0
        pool = self._pool
        user = self._pool_user() if self._pool_user is not None else None
        shared = persistent and pool is not None and not pool.closed
        if shared and user is not None and user.live:
            shared = False  # another live iterator has the persistent pool: a pool of its own
        fresh = not shared
        if fresh:
            base_seed = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator))
            pool = self._new_pool(base_seed)
            if persistent and (self._pool is None or self._pool.closed):
                self._pool = pool
        assert pool is not None
        main_iter = None
        if self._iterable and self.num_workers == 0:
            # Like torch's single-process fetcher: iter(dataset) in the caller's thread.
            main_iter = iter(self.dataset)
        it = ThreadIter(
            pool,
            sampler_iter,
            owns_pool=pool is not self._pool,
            ahead=(self.prefetch_factor or 1) * self.num_workers,
            timeout=self.timeout,
            sampler_len=functools.partial(len, sampler),
            iterable=self._iterable,
            main_iter=main_iter,
            len_called=_tp.len_called(self),
            dataset=self.dataset,
        )
        if pool is self._pool:
            self._pool_user = weakref.ref(it)
        if fresh and self.worker_init_fn is not None and self.num_workers > 0:
            for worker_id, names in pool.wait_inits():
                warnings.warn(
                    RNG_WARNING.format(names=", ".join(names), id=worker_id), stacklevel=3
                )
        return it

    def _new_pool(self, base_seed: int) -> Pool:
        if self.num_workers > 0:
            _tp.install_thread_worker_info()
        fetch = Fetch(
            self.dataset,
            iterable=self._iterable,
            auto_collation=_tp.auto_collation(self),
            drop_last=self.drop_last,
            collator=self._pipeline.collator,
            recorder=self.recorder,
        )
        return Pool(
            fetch,
            num_threads=self.num_workers,
            depth=self._in_flight(),
            in_order=self.in_order,
            timeout_s=self.timeout or None,
            recorder=self.recorder,
            worker_init_fn=self.worker_init_fn,
            base_seed=base_seed,
        )

    # -- resume -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where the latest epoch stands, for an exact mid-epoch resume; JSON-serializable.

        Save it beside the model; a new loader built with the same arguments continues
        with :meth:`load_state_dict` then ``iter()``. What it holds and the limits are in
        :mod:`fastfeed._torch_compat.state` (exact with ``in_order=True``).
        """
        if self._resume is not None:  # loaded, not iterated yet: still where it stood
            return copy.deepcopy(self._resume)
        epoch = self._latest() if self._latest is not None else None
        if epoch is not None and not epoch.finished:
            return epoch.state()
        pool_alive = self._pool is not None and not self._pool.closed
        torch_alive = getattr(self, "_iterator", None) is not None
        persistent_running = pool_alive if self.worker_type == "thread" else torch_alive
        own = own_generator(_tp.index_sampler(self), self.generator)
        base_draw = not persistent_running
        return fresh_state(self.generator, self._iterable, base_draw=base_draw, own=own)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next ``iter()`` continue where ``state`` (:meth:`state_dict`) stood.

        Raises:
            ConfigError: ``state`` is not a state of this class.
        """
        self._resume = check_state(state)
        self.close()  # persistent workers start afresh, as in the resumed run

    # -- the rest -----------------------------------------------------------------------

    def stats(self, *, gather: bool = False) -> LoaderStats:
        """What this loader measured so far, with a verdict: is training input-bound?

        Args:
            gather: Also gather every rank's figures under torch.distributed and name the
                slowest rank. A collective call: every rank must make it.
        """
        return LoaderStats.collect(
            self.recorder,
            batch_size=self.batch_size,
            num_threads=self.num_workers,
            source=self.dataset,
            source_kind="dataset",
            device=self.device,
            execution={
                "mode": "processes" if self.worker_type == "process" else "threads",
                "worker_type": self.worker_type,
                "processes": self.num_workers if self.worker_type == "process" else 0,
                "reason": self.worker_type_reason,
            },
            gather=gather,
        )

    def close(self) -> None:
        """Stop every worker this loader runs (persistent ones included). Idempotent.

        Also happens when the loader is garbage collected and at interpreter exit. An
        iterator stopped mid-epoch raises on its next ``next()`` instead of ending early.
        """
        self._forget_if_forked()
        for it in list(self._live):
            it.close(by_loader=True)
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        torch_iter = getattr(self, "_iterator", None)
        if torch_iter is not None:  # torch's persistent multiprocessing iterator
            _tp.shutdown_torch_iterator(torch_iter)
            self._iterator = None
