"""``_WorkerPool``: the named thread pool behind every concurrent read of fastfeed.

Used by :class:`~fastfeed.sources.files.FileSource` for ``read_many``, by
:class:`~fastfeed.sources.lmdb.LMDBSource` for cold reads and run page-ins, and by
:func:`fastfeed.pack` for its readers; importable from :mod:`fastfeed.sources.files` too.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from fastfeed.errors import SourceError

__all__ = ["_WorkerPool"]

_T = TypeVar("_T")


class _WorkerPool:
    """A tiny pool of named daemon threads that run one ``map`` at a time with the caller.

    ``map(fn, n)`` runs ``fn(k)`` for ``k in range(n)``: the calling thread and up to
    ``n - 1`` pool threads pull ``k`` from a shared counter, so load balances itself and a
    call costs one queue put per helper. The first exception stops the others and is
    re-raised in the caller. Threads start on first use, end after ``idle_s`` without work
    (the next ``map`` starts them again) and stop on :meth:`close` or :meth:`stop`.

    Args:
        size: Number of pool threads (the caller is an extra participant).
        role: Thread names are ``fastfeed-<role>-<n>``.
        idle_s: Seconds a thread waits for work before it ends.
    """

    _POLL_S = 0.5  # how often idle workers check the stop flag
    IDLE_S = 60.0  # an idle read pool costs nothing but its threads; end them after this

    def __init__(self, size: int, role: str, idle_s: float | None = None) -> None:
        self.size = max(0, int(size))
        self.role = role
        self.idle_s = float(self.IDLE_S if idle_s is None else idle_s)
        self._tasks: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        # Held while threads start or end and while a map hands out its jobs, so an idle
        # thread never ends between a map seeing it alive and putting its job.
        self._start_lock = threading.Lock()
        self._serial = itertools.count()

    def threads(self) -> list[threading.Thread]:
        """The pool threads now alive."""
        with self._start_lock:
            return [t for t in self._threads if t.is_alive()]

    def _start_locked(self) -> None:
        self._threads = [t for t in self._threads if t.is_alive()]
        while len(self._threads) < self.size:
            t = threading.Thread(
                target=self._worker,
                name=f"fastfeed-{self.role}-{next(self._serial)}",
                daemon=True,
            )
            t.start()
            self._threads.append(t)

    def _worker(self) -> None:
        idle = 0.0
        while not self._stop.is_set():
            try:
                job = self._tasks.get(timeout=min(self._POLL_S, self.idle_s))
            except queue.Empty:
                idle += min(self._POLL_S, self.idle_s)
                if idle >= self.idle_s:
                    with self._start_lock:
                        if self._tasks.empty():
                            me = threading.current_thread()
                            self._threads = [t for t in self._threads if t is not me]
                            return
                continue
            if job is None:
                return
            idle = 0.0
            job()
            del job  # drop the closure (and the source it holds) while idle

    def submit(self, job: Callable[[], None]) -> bool:
        """Run ``job()`` on a pool thread, in the background (advisory work: read-ahead).

        An exception raised by ``job`` is dropped: nothing waits for a background job.

        Returns:
            False when the pool is stopped or has no threads (the job was not taken).
        """
        if self._stop.is_set() or self.size == 0:
            return False

        def advisory() -> None:
            try:
                job()
            except Exception:
                pass

        with self._start_lock:
            self._start_locked()
            self._tasks.put(advisory)
        return True

    def map(self, fn: Callable[[int], _T], n: int) -> list[_T]:
        """Return ``[fn(0), ..., fn(n-1)]``, computed by the caller and the pool threads."""
        helpers = min(self.size, n - 1)
        if helpers <= 0 or self._stop.is_set():
            return [fn(k) for k in range(n)]
        results: list[Any] = [None] * n
        counter = itertools.count()
        errors: list[BaseException] = []
        done = threading.Semaphore(0)

        def participate() -> None:
            try:
                while not errors:
                    k = next(counter)  # atomic under the GIL
                    if k >= n:
                        return
                    results[k] = fn(k)
            except BaseException as exc:  # re-raised in the caller
                errors.append(exc)

        def helper() -> None:
            try:
                participate()
            finally:
                done.release()

        with self._start_lock:
            self._start_locked()
            for _ in range(helpers):
                self._tasks.put(helper)
        participate()
        for _ in range(helpers):
            # Helpers finish within one fn() call of the counter running out; the timeout
            # loop only guards against a pool closed under our feet.
            while not done.acquire(timeout=self._POLL_S):
                if not self.threads():
                    raise SourceError(f"the {self.role} thread pool stopped during a call")
        if errors:
            raise errors[0]
        return results

    def stop(self) -> None:
        """Tell every thread to end without waiting (safe from a finalizer, any thread)."""
        self._stop.set()
        for _ in range(self.size):
            self._tasks.put(None)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop and join every thread (idempotent)."""
        self.stop()
        me = threading.current_thread()
        for t in self.threads():
            if t is not me:
                t.join(timeout_s)
        with self._start_lock:
            self._threads = []
