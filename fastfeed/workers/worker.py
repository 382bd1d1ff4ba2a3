"""The worker process's side: receive tasks, run the threaded pipeline, send layouts back.

Runs in each ``fastfeed-worker-<k>`` process started by
:class:`~fastfeed.workers.processes.ProcessPool`: a reader thread turns the training
process's messages into a task feed, :class:`~fastfeed.pipeline.prefetch.Prefetcher`
threads run the :class:`~fastfeed.pipeline.build.BatchBuilder` on each task, writing into
the slot the task names (:class:`~fastfeed.workers.shm.SlotWriter`), and the main thread
sends each result back. A watchdog thread ends the process when the training process is
gone.
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
import traceback
from collections import deque
from multiprocessing.connection import Connection
from typing import Any

import torch

from fastfeed.errors import FastFeedError
from fastfeed.pipeline.collate import Collator
from fastfeed.pipeline.prefetch import Prefetcher
from fastfeed.profiling import Recorder
from fastfeed.workers.shm import SlotWriter

__all__ = ["worker_main"]

_POLL_S = 0.05  # how often a blocked feed looks at its closed flag, seconds
_PARENT_CHECK_S = 0.2  # how often a worker checks that the training process lives, seconds


class _SpanLog(Recorder):
    """A recorder that keeps each thread's spans for the current task, to send back."""

    def __init__(self) -> None:
        super().__init__(enabled=True)
        self._tls_spans = threading.local()

    def add(  # type: ignore[override]  # keeps the span for the training process instead
        self, stage: Any, start_s: float, end_s: float, cpu_s: float, **kw: Any
    ) -> None:
        spans = getattr(self._tls_spans, "spans", None)
        if spans is not None:
            spans.append((stage, start_s, end_s, cpu_s, kw))

    def begin(self) -> None:
        self._tls_spans.spans = []

    def take(self) -> list[tuple[Any, ...]]:
        spans = getattr(self._tls_spans, "spans", None) or []
        self._tls_spans.spans = None
        return spans


class _Feed:
    """Tasks received from the training process, for the worker's prefetcher threads."""

    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, item: Any) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify()

    def drop_generation(self, gen: int) -> list[Any]:
        """Remove queued tasks of epoch generation ``gen`` (abandoned); returns them."""
        with self._cond:
            dropped = [m for m in self._items if m[1] == gen]
            self._items = deque(m for m in self._items if m[1] != gen)
            return dropped

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> Any:
        with self._cond:
            while not self._items:
                if self._closed:
                    raise StopIteration
                self._cond.wait(_POLL_S)
            return self._items.popleft()


def _exception_payload(exc: BaseException) -> bytes:
    """The exception pickled for the training process; a described stand-in if it cannot be."""
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)
        return data
    except Exception:
        text = "".join(traceback.format_exception(exc)).rstrip()
        stand_in = FastFeedError(
            f"{type(exc).__name__}: {exc} (the original exception could not be pickled "
            f"out of the worker process; its traceback there:\n{text})"
        )
        return pickle.dumps(stand_in)


def _watch_parent(parent_pid: int, stop: threading.Event) -> None:
    # The training process is gone (SIGKILL included): exit at once, so the kernel frees
    # the shared slots with their last user. PR_SET_PDEATHSIG would fire when the
    # *thread* that forked exits, so the parent pid is polled instead.
    while not stop.wait(_PARENT_CHECK_S):
        if os.getppid() != parent_pid:
            os._exit(0)


def worker_main(
    recipe: Any,
    worker_id: int,
    parent_pid: int,
    tasks_conn: Connection,
    results_conn: Connection,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training process's
    stop = threading.Event()
    threading.Thread(
        target=_watch_parent, args=(parent_pid, stop), name="fastfeed-parentwatch", daemon=True
    ).start()
    if recipe.torch_threads is not None:
        torch.set_num_threads(recipe.torch_threads)
    writer = SlotWriter(parent_pid)
    collator = Collator(recipe.collate_fn, slots=0)
    collator.ring = writer  # type: ignore[assignment]  # rows go straight into the slot
    recorder = _SpanLog() if recipe.profile else Recorder(enabled=False)
    builder = recipe.work.builder(collator, recorder, 0)
    feed = _Feed()
    cancelled: set[int] = set()
    send_lock = threading.Lock()

    def send(msg: Any) -> None:
        with send_lock:
            results_conn.send(msg)

    def receive() -> None:
        try:
            while True:
                msg = tasks_conn.recv()
                if msg is None:
                    break
                kind = msg[0]
                if kind == "task":
                    feed.put(msg)
                elif kind == "cancel":
                    cancelled.add(msg[1])
                    for m in feed.drop_generation(msg[1]):
                        send(("skip", m[1], m[2], m[3]))
                elif kind == "forget":
                    writer.forget(msg[1])
        except (EOFError, OSError):
            pass
        finally:
            feed.close()

    def run(msg: Any) -> Any:
        _, gen, seq, slot, slot_fd, task = msg
        if gen in cancelled:
            return ("skip", gen, seq, slot)
        if isinstance(recorder, _SpanLog):
            recorder.begin()
        try:
            writer.bind(slot, slot_fd)
            res = builder(task)
            spans = recorder.take() if isinstance(recorder, _SpanLog) else []
            if res.data is None:
                return ("empty", gen, seq, slot, res.number, res.failures, spans)
            layout = writer.layout(res.data, res.labels)
            return ("ok", gen, seq, layout, res.number, res.indices, res.failures, spans)
        except BaseException as exc:
            spans = recorder.take() if isinstance(recorder, _SpanLog) else []
            return ("err", gen, seq, slot, _exception_payload(exc), spans)

    reader = threading.Thread(target=receive, name="fastfeed-taskfeed", daemon=True)
    reader.start()
    prefetcher: Prefetcher[Any, Any] = Prefetcher(
        feed,
        run,
        num_threads=recipe.threads,
        depth=recipe.depth,
        in_order=False,
        role=f"w{worker_id}",
    )
    try:
        for _msg, out in prefetcher:
            send(out)
    except (BrokenPipeError, EOFError, OSError):
        pass  # the training process went away
    finally:
        prefetcher.close()
        stop.set()
        writer.close()
