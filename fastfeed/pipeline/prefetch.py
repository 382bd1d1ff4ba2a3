"""A bounded, ordered thread pipeline: run ``fn(task)`` ahead of the consumer.

:class:`Prefetcher` pulls tasks (typically one batch of indices each) from an iterator,
runs ``fn`` on ``num_threads`` named worker threads, and hands ``(task, result)`` pairs
to the consumer in task order (or completion order with ``in_order=False``).

- Bounded: at most ``depth`` tasks are in flight or finished-but-unconsumed, so memory
  stays fixed however slow the consumer is.
- Exceptions travel as values and are re-raised in the consumer at the position of the
  task that failed (torchdata.nodes does the same).
- Nothing blocks forever: workers poll a stop event, the consumer's wait has
  ``timeout_s``, and :meth:`Prefetcher.close` (idempotent; also run when the prefetcher
  is garbage collected and at interpreter exit) joins the threads within 2 s.
- Instrumented: the consumer's wait and step times, the workers' put-wait (blocked on a
  full pipeline: the consumer is slow) and the queue depth go to a
  :class:`~fastfeed.profiling.Recorder`.
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Generic, TypeVar

from fastfeed._threads import ExceptionBox, join_all, start_thread
from fastfeed.errors import ConfigError, LoaderTimeoutError
from fastfeed.profiling import Queue, Recorder

__all__ = ["Prefetcher"]

T = TypeVar("T")
R = TypeVar("R")

_POLL_S = 0.05  # how often blocked threads look at the stop event, seconds
_JOIN_S = 2.0  # close() waits at most this long for workers, seconds


class _Shared(Generic[T, R]):
    """State shared by the workers and the consumer.

    Kept apart from :class:`Prefetcher` so the worker threads do not reference the
    Prefetcher itself: dropping the last reference to it then finalizes it and stops them.
    """

    def __init__(
        self,
        tasks: Iterator[T],
        fn: Callable[[T], R],
        depth: int,
        recorder: Recorder,
        thread_init: Callable[[], None] | None,
    ) -> None:
        self.tasks = tasks
        self.fn = fn
        self.depth = depth
        self.recorder = recorder
        self.thread_init = thread_init
        self.stop = threading.Event()
        self.slots = threading.Semaphore(depth)
        self.task_lock = threading.Lock()
        self.cond = threading.Condition()
        self.seq = itertools.count()
        self.dispatched = 0  # tasks taken from the iterator (guarded by task_lock)
        self.exhausted = False  # the task iterator is finished (guarded by task_lock)
        self.in_flight: dict[int, T] = {}  # guarded by cond
        self.done: dict[int, tuple[T, R | ExceptionBox]] = {}  # guarded by cond
        self.live_workers = 0  # guarded by cond
        self.fatal: BaseException | None = None  # a worker could not start (guarded by cond)
        self.threads: list[threading.Thread] = []

    def take(self) -> tuple[int, T] | None:
        """Next (seq, task) from the iterator, or None when finished or stopping."""
        with self.task_lock:
            if self.exhausted or self.stop.is_set():
                return None
            try:
                task = next(self.tasks)
            except StopIteration:
                self.exhausted = True
                return None
            except BaseException as exc:
                # The iterator itself failed: deliver the error at this position (the
                # worker does not call fn on it), and take nothing more.
                self.exhausted = True
                task = ExceptionBox(exc)  # type: ignore[assignment]  # the iterator failed here
            seq = next(self.seq)
            self.dispatched += 1
            # Registered before task_lock is released: a consumer must never see the
            # iterator exhausted while a taken task is in nobody's books.
            with self.cond:
                self.in_flight[seq] = task
            return seq, task

    def worker(self) -> None:
        try:
            if self.thread_init is not None:
                try:
                    self.thread_init()
                except BaseException as exc:
                    with self.cond:
                        self.fatal = exc
                    return
            while not self.stop.is_set():
                t0 = time.perf_counter()
                while not self.slots.acquire(timeout=_POLL_S):
                    if self.stop.is_set():
                        return
                put_wait = time.perf_counter() - t0
                item = self.take()
                if item is None:
                    self.slots.release()
                    return
                seq, task = item
                try:
                    if isinstance(task, ExceptionBox):
                        raise task.exc
                    result: R | ExceptionBox = self.fn(task)
                except BaseException as exc:  # travels to the consumer, re-raised there
                    result = ExceptionBox(exc)
                with self.cond:
                    del self.in_flight[seq]
                    self.done[seq] = (task, result)
                    depth = len(self.done)
                    self.cond.notify_all()
                self.recorder.queue(
                    Queue.BATCHES, depth=depth, capacity=self.depth, put_wait_s=put_wait
                )
                # Hold no reference to the handed-over batch while waiting for room: a
                # pinned-ring slot is reused only once nothing outside the ring holds it.
                del task, result, item
        finally:
            with self.cond:
                self.live_workers -= 1
                self.cond.notify_all()

    def shutdown(self, join_s: float = _JOIN_S) -> list[threading.Thread]:
        """Stop the workers and join them; returns threads still alive after ``join_s``."""
        self.stop.set()
        with self.cond:
            self.cond.notify_all()
        # Wake workers blocked on a full pipeline now rather than at their next poll; the
        # pipeline is finished, so over-releasing the (unbounded) semaphore is harmless.
        for _ in self.threads:
            self.slots.release()
        alive = join_all(self.threads, join_s)
        self.threads = alive
        return alive


class Prefetcher(Generic[T, R]):
    """Run ``fn`` over ``tasks`` on worker threads, ahead of the consumer, bounded.

    Iterating yields ``(task, result)``. An exception raised by ``fn`` (or by the task
    iterator) is re-raised by ``__next__`` at that task's position; the prefetcher stays
    usable, so the caller decides whether to skip or stop.

    Args:
        tasks: The work items, pulled lazily (and under a lock) by the workers.
        fn: Called once per task on a worker thread.
        num_threads: Worker threads; 0 runs ``fn`` inline in the consumer's thread (with
            a ``timeout_s``, on one helper thread, one task at a time, so the wait can
            time out).
        depth: Tasks in flight plus finished-but-unconsumed, at most (>= 1).
        in_order: Yield in task order (deterministic); False yields in completion order.
        timeout_s: Longest the consumer waits for the next result, seconds; None waits
            as long as workers are alive (still waking up to notice :meth:`close`).
        describe: Describes a task in a timeout message (e.g. its indices).
        recorder: Receives the ``batches`` queue figures (the training loop's wait and
            step are timed by the consumer tap, :mod:`fastfeed.pipeline.tap`).
        thread_init: Run once at the start of each worker thread.
        role: Thread names are ``fastfeed-<role>-<n>``.
    """

    def __init__(
        self,
        tasks: Iterable[T],
        fn: Callable[[T], R],
        *,
        num_threads: int,
        depth: int,
        in_order: bool = True,
        timeout_s: float | None = None,
        describe: Callable[[T], str] = repr,
        recorder: Recorder | None = None,
        thread_init: Callable[[], None] | None = None,
        role: str = "worker",
    ) -> None:
        if num_threads < 0:
            raise ConfigError(f"num_threads must be >= 0, got {num_threads}")
        if depth < 1:
            raise ConfigError(f"depth (batches in flight) must be >= 1, got {depth}")
        if timeout_s is not None and timeout_s < 0:
            raise ConfigError(f"timeout must be >= 0 seconds, got {timeout_s}")
        self.num_threads = num_threads
        self.in_order = in_order
        self.timeout_s = timeout_s or None  # torch semantics: 0 means no timeout
        self.describe = describe
        self.recorder = recorder if recorder is not None else Recorder(enabled=False)
        # Inline work cannot be interrupted: with a timeout, run it one task at a time on
        # one helper thread so the consumer's wait can end with LoaderTimeoutError.
        threads = 1 if num_threads == 0 and self.timeout_s is not None else num_threads
        depth = 1 if threads != num_threads else depth
        self._inline = threads == 0
        self._shared: _Shared[T, R] = _Shared(iter(tasks), fn, depth, self.recorder, thread_init)
        self._next_out = 0
        self._closed = False
        if threads > 0:
            sh = self._shared
            with sh.cond:
                sh.live_workers = threads
            for _ in range(threads):
                sh.threads.append(start_thread(role, sh.worker))
        self._finalizer = weakref.finalize(self, _Shared.shutdown, self._shared)

    def __iter__(self) -> Iterator[tuple[T, R]]:
        return self

    def __next__(self) -> tuple[T, R]:
        if self._closed:
            raise StopIteration
        t_enter = time.perf_counter()
        if self._inline:
            item = self._next_inline()
        else:
            item = self._next_threaded(t_enter)
        task, result = item
        if isinstance(result, ExceptionBox):
            result.reraise()
        return task, result  # type: ignore[return-value]

    def _next_inline(self) -> tuple[T, R | ExceptionBox]:
        sh = self._shared
        got = sh.take()
        if got is None:
            raise StopIteration
        seq, task = got
        try:
            if isinstance(task, ExceptionBox):
                raise task.exc
            return task, sh.fn(task)
        except BaseException as exc:
            return task, ExceptionBox(exc)
        finally:
            with sh.cond:
                del sh.in_flight[seq]

    def _next_threaded(self, t_enter: float) -> tuple[T, R | ExceptionBox]:
        sh = self._shared
        deadline = None if self.timeout_s is None else t_enter + self.timeout_s
        with sh.cond:
            while True:
                if sh.stop.is_set():  # closed from another thread: stop waiting now
                    raise StopIteration
                if self.in_order:
                    item = sh.done.pop(self._next_out, None)
                    if item is not None:
                        self._next_out += 1
                elif sh.done:
                    item = sh.done.pop(min(sh.done))
                else:
                    item = None
                if item is not None:
                    depth = len(sh.done)
                    break
                if sh.fatal is not None:
                    raise sh.fatal
                if not sh.in_flight and not sh.done and (sh.exhausted or sh.live_workers == 0):
                    # Finished: every dispatched task was consumed (or workers stopped).
                    raise StopIteration
                remaining = _POLL_S if deadline is None else deadline - time.perf_counter()
                if remaining <= 0:
                    raise self._timeout_error()
                sh.cond.wait(min(remaining, _POLL_S))
        sh.slots.release()
        self.recorder.queue(
            Queue.BATCHES,
            depth=depth,
            capacity=sh.depth,
            get_wait_s=time.perf_counter() - t_enter,
        )
        return item

    def _timeout_error(self) -> LoaderTimeoutError:
        tasks = [t for t in self._shared.in_flight.values() if not isinstance(t, ExceptionBox)]
        shown = "; ".join(self.describe(t) for t in tasks[:4])
        more = f" and {len(tasks) - 4} more" if len(tasks) > 4 else ""
        return LoaderTimeoutError(
            f"no batch arrived within timeout={self.timeout_s:g} s; still in flight: "
            f"{shown or 'nothing (the workers are idle)'}{more}",
            in_flight=[i for t in tasks for i in _indices_of(t)],
        )

    @property
    def in_flight(self) -> list[T]:
        """Tasks the workers are running right now."""
        with self._shared.cond:
            return list(self._shared.in_flight.values())

    @property
    def threads(self) -> list[threading.Thread]:
        """The worker threads (empty once closed and joined)."""
        return list(self._shared.threads)

    def close(self, join_s: float | None = None) -> None:
        """Stop the workers and join them within 2 s (or ``join_s``). Idempotent.

        A worker blocked inside ``fn`` (a read that never returns) cannot be interrupted;
        it is a daemon thread, so it never keeps the interpreter alive, and it exits as
        soon as ``fn`` returns. ``join_s=0`` stops without waiting (after a timeout,
        where a worker is known to be stuck).
        """
        self._closed = True
        if join_s is None or not self._finalizer.alive:
            self._finalizer()
        else:
            self._finalizer.detach()
            self._shared.shutdown(join_s)

    def __enter__(self) -> Prefetcher[T, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _indices_of(task: object) -> Sequence[int]:
    indices = getattr(task, "indices", None)
    return list(indices) if indices is not None else []
