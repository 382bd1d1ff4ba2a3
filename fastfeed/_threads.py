"""Small thread helpers: named daemon threads, bounded joins, captured exceptions."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["ExceptionBox", "join_all", "start_thread"]

_counters: dict[str, itertools.count] = {}
_counters_lock = threading.Lock()


def _next_number(role: str) -> int:
    with _counters_lock:
        return next(_counters.setdefault(role, itertools.count()))


def start_thread(role: str, target: Callable[..., Any], *args: Any) -> threading.Thread:
    """Start a daemon thread named ``fastfeed-<role>-<n>``.

    Daemon, so a thread stuck in a blocking read can never keep the interpreter alive;
    every owner still joins its threads on close.
    """
    thread = threading.Thread(
        target=target, args=args, name=f"fastfeed-{role}-{_next_number(role)}", daemon=True
    )
    thread.start()
    return thread


def join_all(threads: Iterable[threading.Thread], timeout_s: float) -> list[threading.Thread]:
    """Join threads within one shared deadline; return those still alive."""
    deadline = time.monotonic() + timeout_s
    alive = []
    for t in threads:
        if t is threading.current_thread():
            continue
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            alive.append(t)
    return alive


class ExceptionBox:
    """Carries an exception from a worker thread to the consumer, to be re-raised there."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def reraise(self) -> None:
        raise self.exc
