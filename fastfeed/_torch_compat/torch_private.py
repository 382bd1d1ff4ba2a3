"""Every access to torch's private DataLoader machinery, in one guarded module.

fastfeed's drop-in :class:`~fastfeed.DataLoader` needs a few things torch does not
publish. They all live here, each behind a small function that says what it needs, so a
torch upgrade that moves one breaks one function (and its test) instead of the loader:

- ``torch.utils.data._utils.worker``: :class:`WorkerInfo`, the module global
  ``_worker_info`` and the function ``get_worker_info`` (made thread-aware, below), and
  its ``ExceptionWrapper`` name (swapped inside worker processes, below);
- ``torch._utils.ExceptionWrapper``: subclassed to carry the original exception;
- the loader's ``_index_sampler``, ``_auto_collation``, ``_IterableDataset_len_called``
  and ``_iterator``; a multiprocessing iterator's ``_index_sampler``, ``_shutdown`` and
  ``_shutdown_workers``.

**Thread-local ``get_worker_info()``.** torch's ``get_worker_info()`` returns a module
global set once in each worker process. One global cannot answer differently per thread,
so no patch-free way exists. :func:`install_thread_worker_info` replaces the *code* of
torch's function (once, idempotent) by one that first reads a :class:`threading.local`
(set only inside fastfeed's worker threads) and otherwise returns torch's global exactly
as before. Replacing the code object rather than the module attribute also reaches names
bound before fastfeed was imported (``from torch.utils.data import get_worker_info``).
Everywhere except a fastfeed worker thread the answer is unchanged: None in the main
thread, torch's ``WorkerInfo`` in a torch worker process.
"""

from __future__ import annotations

import os
import pickle
import threading
from collections.abc import Callable
from typing import Any

import torch.utils.data._utils.worker as _worker_mod
from torch.utils.data import default_collate
from torch.utils.data._utils.worker import WorkerInfo

from fastfeed._torch_compat.errors import add_context
from fastfeed.errors import describe_indices

try:  # where torch keeps it (2.x); one guarded import
    from torch._utils import ExceptionWrapper as _TorchExceptionWrapper
except ImportError:  # pragma: no cover - a torch that moved it: keep torch's own errors
    _TorchExceptionWrapper = None  # type: ignore[assignment,misc]

__all__ = [
    "THREAD_INFO",
    "OriginalExceptionWrapper",
    "WorkerInfo",
    "WorkerInit",
    "abandon_torch_iterator",
    "auto_collation",
    "default_collate",
    "fetch_note",
    "index_sampler",
    "install_thread_worker_info",
    "install_worker_exception_wrapper",
    "len_called",
    "on_fetch_start",
    "set_persistent_index_sampler",
    "shutdown_torch_iterator",
    "torch_worker_info",
]

#: Per-thread worker info, set only inside fastfeed's worker threads (attribute ``info``);
#: ``calls``, a list, counts the calls made outside them (the auto probe's thread).
THREAD_INFO = threading.local()
_ATTR = "_fastfeed_thread_worker_info"  # the name the new code reads in torch's module
_install_lock = threading.Lock()
_installed = False


def _thread_aware_get_worker_info() -> Any:  # pragma: no cover - runs as torch's code
    # Globals resolved in torch's worker module: _worker_info and the name below.
    local = _fastfeed_thread_worker_info  # type: ignore[name-defined]  # noqa: F821
    info = getattr(local, "info", None)
    if info is None:
        calls = getattr(local, "calls", None)  # set by worker_type="auto"'s probe read
        if calls is not None:
            calls.append(1)
        return _worker_info  # type: ignore[name-defined]  # noqa: F821
    return info


def install_thread_worker_info() -> bool:
    """Make torch's ``get_worker_info()`` answer fastfeed's worker threads. Idempotent.

    Returns:
        True when installed (now or before); False if torch's function has an unexpected
        shape (then worker threads see None, as before, and fastfeed's own
        :func:`fastfeed.get_worker_info` still answers).
    """
    global _installed
    with _install_lock:
        if _installed:
            return True
        fn = getattr(_worker_mod, "get_worker_info", None)
        code = getattr(fn, "__code__", None)
        if code is None or code.co_freevars or not hasattr(_worker_mod, "_worker_info"):
            return False
        setattr(_worker_mod, _ATTR, THREAD_INFO)
        names: dict[str, Any] = {"co_name": code.co_name, "co_filename": __file__}
        if hasattr(code, "co_qualname"):  # Python 3.11+
            names["co_qualname"] = code.co_qualname
        new = _thread_aware_get_worker_info.__code__.replace(
            **names,
        )
        fn.__code__ = new  # type: ignore[union-attr]
        _installed = True
        return True


def torch_worker_info() -> Any:
    """torch's own answer: the module global (a torch worker process), else None."""
    return getattr(_worker_mod, "_worker_info", None)


def index_sampler(loader: Any) -> Any:
    """The sampler torch draws indices from (batch sampler with auto-collation)."""
    return loader._index_sampler


def auto_collation(loader: Any) -> bool:
    """Whether torch batches samples itself (``batch_sampler`` is set)."""
    return bool(loader._auto_collation)


def len_called(loader: Any) -> int | None:
    """What ``len(loader)`` reported for an IterableDataset (torch's over-length warning)."""
    return getattr(loader, "_IterableDataset_len_called", None)


def set_persistent_index_sampler(loader: Any, sampler: Any) -> bool:
    """Point the persistent multiprocessing iterator's next ``_reset`` at ``sampler``.

    Returns:
        True when there is such an iterator (and it was pointed), else False.
    """
    it = getattr(loader, "_iterator", None)
    if it is None or not hasattr(it, "_index_sampler"):
        return False
    it._index_sampler = sampler
    return True


def shutdown_torch_iterator(it: Any) -> None:
    """Stop a torch multiprocessing iterator's worker processes (torch's own shutdown)."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def abandon_torch_iterator(it: Any) -> None:
    """Forget a torch iterator inherited across ``fork`` without touching its workers.

    Its worker processes and queues belong to the parent; joining or messaging them from
    the child would hang or fail. Marking it shut down makes its ``__del__`` a no-op.
    """
    if hasattr(it, "_shutdown"):
        it._shutdown = True


# -- the original exception across processes -------------------------------------------


def _picklable(exc: BaseException) -> bool:
    try:
        back = pickle.loads(pickle.dumps(exc))
    except Exception:
        return False
    return type(back) is type(exc)


if _TorchExceptionWrapper is not None:

    class OriginalExceptionWrapper(_TorchExceptionWrapper):  # type: ignore[misc,valid-type]
        """torch's ExceptionWrapper that also carries the exception object itself.

        torch re-creates a worker's exception as ``type(msg)``: attributes (``errno``,
        ``filename``, custom fields) and arguments are lost, and types whose constructor
        takes other arguments become RuntimeError. This wrapper pickles the original
        (when it round-trips) with the worker's traceback as a note, and ``reraise``
        raises that object; otherwise torch's behaviour is kept.
        """

        def __init__(self, exc_info: Any = None, where: str = "in background") -> None:
            super().__init__(exc_info, where)
            import sys

            exc = (exc_info or sys.exc_info())[1]
            self.original: BaseException | None = None
            if exc is not None and _picklable(exc):
                from fastfeed._torch_compat.errors import add_context

                add_context(exc, f"fastfeed: raised {where}; {self.exc_msg.rstrip()}")
                exc.__traceback__ = None
                self.original = exc

        def reraise(self) -> None:
            if self.original is not None:
                raise self.original
            super().reraise()

else:  # pragma: no cover
    OriginalExceptionWrapper = None  # type: ignore[assignment,misc]


def install_worker_exception_wrapper() -> None:
    """Inside a torch worker process: report exceptions with the original object."""
    if OriginalExceptionWrapper is not None and hasattr(_worker_mod, "ExceptionWrapper"):
        setattr(_worker_mod, "ExceptionWrapper", OriginalExceptionWrapper)  # noqa: B010


class WorkerInit:
    """The ``worker_init_fn`` fastfeed gives torch's worker processes (picklable).

    Installs :class:`OriginalExceptionWrapper` in the worker and, given a
    ``fetch_hook``, :func:`on_fetch_start` (before the worker's first fetch), then calls
    the user's ``worker_init_fn`` (if any), so errors of ``worker_init_fn`` itself keep
    their type.
    """

    def __init__(
        self,
        user_fn: Callable[[int], None] | None,
        fetch_hook: Callable[[], None] | None = None,
    ) -> None:
        self.user_fn = user_fn
        self.fetch_hook = fetch_hook

    def __call__(self, worker_id: int) -> None:
        install_worker_exception_wrapper()
        # Always wrapped: a failing sample's error names its index. With a hook, the
        # fetch is timed too (False: batches come without stage times).
        on_fetch_start(self.fetch_hook)
        if self.user_fn is not None:
            self.user_fn(worker_id)


# -- stage times in torch's worker processes ------------------------------------------


def on_fetch_start(hook: Callable[[], None] | None) -> bool:
    """In a torch worker process: call ``hook()`` as each batch's fetch starts, and name
    the failing sample in a note on an exception of a map-style fetch (:func:`fetch_note`).

    torch's worker loop runs ``fetcher.fetch(index)``, which reads the samples and then
    calls ``collate_fn``; the collate wrapper of the process slots times the rest. The
    fetcher classes of *this* process are wrapped (a worker process's own copy of the
    module: the training process is untouched). Idempotent.

    Returns:
        False where torch has no such fetcher classes (the read is then not timed).
    """
    try:
        from torch.utils.data._utils import fetch as fetch_mod
    except ImportError:  # pragma: no cover - a torch without the module
        return False
    names = ("_MapDatasetFetcher", "_IterableDatasetFetcher")
    classes: list[Any] = [getattr(fetch_mod, n, None) for n in names]
    if any(c is None or "fetch" not in vars(c) for c in classes):
        return False
    for cls in classes:
        original = vars(cls)["fetch"]
        original = getattr(original, "_fastfeed_original", original)
        named = cls.__name__ == "_MapDatasetFetcher"  # its indices are the dataset's keys
        cls.fetch = _hooked(original, hook, named=named)
    return True


def _hooked(
    original: Callable[..., Any], hook: Callable[[], None] | None, *, named: bool
) -> Callable[..., Any]:
    def fetch(self: Any, possibly_batched_index: Any) -> Any:
        if hook is not None:
            hook()
        try:
            return original(self, possibly_batched_index)
        except Exception as exc:
            if named:
                add_context(exc, fetch_note(exc, possibly_batched_index))
            raise

    fetch._fastfeed_original = original  # type: ignore[attr-defined]
    return fetch


def fetch_note(exc: BaseException, index: Any) -> str:
    """Where a map-style fetch in a torch worker process failed: the sample when torch's
    read loop (``dataset[idx] for idx in ...``) was running, else the batch.

    The sample is the ``idx`` local of torch's fetch frame in the traceback; a dataset
    with ``__getitems__`` or a failing ``collate_fn`` leaves only the batch to name.
    """
    info = _worker_mod.get_worker_info()
    who = "DataLoader worker process" + ("" if info is None else f" {info.id}")
    tb = exc.__traceback__
    sample: Any = _NO_SAMPLE
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_filename.endswith(_TORCH_FETCH) and "idx" in frame.f_locals:
            sample = frame.f_locals["idx"]
        tb = tb.tb_next
    batch = describe_indices(index) if isinstance(index, (list, tuple)) else repr(index)
    if sample is not _NO_SAMPLE:
        return f"fastfeed: sample {sample!r} failed in {who} (batch {batch})"
    return f"fastfeed: batch {batch} failed in {who}"


_NO_SAMPLE = object()
_TORCH_FETCH = os.path.join("_utils", "fetch.py")  # torch.utils.data._utils.fetch
