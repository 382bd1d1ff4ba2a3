"""Subprocess children that cannot hang silently, and thread helpers.

A :class:`Child` runs a Python snippet with ``faulthandler`` armed, so a hung child prints
every thread's stack (on ``SIGUSR1`` from the parent, or by itself before its deadline)
and the test fails with those stacks instead of hanging. :func:`run_in_threads` runs a
function on several threads with a shared join deadline.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Child",
    "ChildHungError",
    "ChildResult",
    "call_counter",
    "hold_live_loaders",
    "run_child",
    "run_in_threads",
]

#: The directory holding the ``fastfeed`` package (the repository root in a checkout).
#: Children get it first on ``PYTHONPATH`` and run in it, so they import this fastfeed.
PACKAGE_PARENT = Path(__file__).resolve().parents[2]

_PREAMBLE = """\
import faulthandler as _fh, signal as _sig, sys as _sys
_fh.register(_sig.SIGUSR1, all_threads=True)
_fh.dump_traceback_later({dump_s}, exit=True)
"""


@dataclass
class ChildResult:
    """What a finished child did.

    Attributes:
        returncode: Exit status (negative: killed by that signal).
        stdout: Everything the child printed.
        stderr: Everything it wrote to stderr (thread stacks when it hung).
        duration_s: Wall time from start to exit, seconds.
    """

    returncode: int
    stdout: str
    stderr: str
    duration_s: float


class ChildHungError(AssertionError):
    """A child did not finish in time; the message holds its thread stacks."""


class Child:
    """A Python child process running ``code``, with its thread stacks one signal away.

    The child's ``faulthandler`` dumps every thread's stack on ``SIGUSR1`` (the parent
    sends it when a deadline passes) and by itself just before ``timeout_s`` (then exits),
    so a hang is reported with stacks instead of blocking the test run. The child runs in
    :data:`PACKAGE_PARENT` with it first on ``PYTHONPATH``, so it imports the same fastfeed
    as the parent (``from fastfeed.testing import ...`` works).

    Args:
        code: Python source (dedented).
        timeout_s: The child's own deadline, seconds.
        env: Extra environment variables.
    """

    def __init__(self, code: str, *, timeout_s: float = 60.0, env: Mapping[str, str] | None = None):
        self.timeout_s = timeout_s
        child_env = dict(os.environ)
        path = [str(PACKAGE_PARENT)]
        if child_env.get("PYTHONPATH"):
            path.append(child_env["PYTHONPATH"])
        child_env["PYTHONPATH"] = os.pathsep.join(path)
        child_env["PYTHONUNBUFFERED"] = "1"
        child_env.update(env or {})
        source = _PREAMBLE.format(dump_s=max(1.0, timeout_s - 1.0)) + textwrap.dedent(code)
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", source],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=str(PACKAGE_PARENT),
            env=child_env,
        )
        self._out = bytearray()

    def wait_for(self, marker: str, timeout_s: float = 30.0) -> None:
        """Block until the child prints a line containing ``marker``.

        Raises:
            ChildHungError: The marker did not come in time (stacks in the message).
            AssertionError: The child exited without printing it.
        """
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout_s
        want = marker.encode()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while want not in self._out:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._hung(f"no {marker!r} from the child within {timeout_s} s")
                if not sel.select(min(left, 0.5)):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    res = self.finish(5.0)
                    raise AssertionError(
                        f"child exited ({res.returncode}) before printing {marker!r}\n"
                        f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
                    )
                self._out += chunk

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the child."""
        self.proc.send_signal(sig)

    def finish(self, timeout_s: float | None = None) -> ChildResult:
        """Wait for the child to exit (``timeout_s``, default its own deadline + 5 s).

        Raises:
            ChildHungError: It did not exit in time; the message holds its thread stacks.
        """
        limit = self.timeout_s + 5.0 if timeout_s is None else timeout_s
        try:
            out, err = self.proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            self._hung(f"the child did not exit within {limit} s")
        return ChildResult(
            self.proc.returncode,
            (bytes(self._out) + out).decode(errors="replace"),
            err.decode(errors="replace"),
            time.monotonic() - self.t0,
        )

    def _hung(self, why: str) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)  # faulthandler: dump every thread
            time.sleep(1.0)
            self.proc.kill()
        out, err = self.proc.communicate(timeout=10.0)
        raise ChildHungError(
            f"{why}\nstdout:\n{(bytes(self._out) + out).decode(errors='replace')}\n"
            f"stderr (thread stacks):\n{err.decode(errors='replace')}"
        )

    def kill(self) -> None:
        """Kill the child if it still runs (cleanup)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=10.0)


def run_child(
    code: str, *, timeout_s: float = 60.0, env: Mapping[str, str] | None = None
) -> ChildResult:
    """Run ``code`` in a :class:`Child` to completion and return its result."""
    child = Child(code, timeout_s=timeout_s, env=env)
    try:
        return child.finish()
    finally:
        child.kill()


_KEEP_ALIVE: list[Any] = []


def hold_live_loaders() -> None:
    """Leave a Loader and a DataLoader running mid-epoch, referenced until exit.

    For interpreter-exit tests (a module-level function, so ``spawn`` can pickle it):
    the process then ends with both iterators live and workers inside slow reads.
    Prints ``LIVE-LOADERS`` once both delivered a batch.
    """
    from fastfeed.dataloader import DataLoader
    from fastfeed.loader import Loader
    from fastfeed.testing.ledger import LedgerDataset, LedgerDecode, LedgerSource

    loader = Loader(LedgerSource(4096, delay_s=0.01), LedgerDecode(), batch_size=8, num_threads=2)
    it = iter(loader)
    next(it)
    compat: DataLoader[Any] = DataLoader(
        LedgerDataset(4096, delay_s=0.01), batch_size=8, num_workers=2
    )
    compat_it = iter(compat)
    next(compat_it)
    _KEEP_ALIVE.extend([loader, it, compat, compat_it])
    print("LIVE-LOADERS", flush=True)


def call_counter() -> tuple[Callable[[], int], Callable[[], None]]:
    """A thread-safe counter: returns (get, increment)."""
    lock = threading.Lock()
    box = [0]

    def inc() -> None:
        with lock:
            box[0] += 1

    return (lambda: box[0]), inc


def run_in_threads(fn: Callable[[int], None], n: int, timeout_s: float = 60.0) -> None:
    """Run ``fn(0) .. fn(n-1)`` on ``n`` named threads at once; join them all.

    Fails (AssertionError) when a thread is still running after ``timeout_s``, shared
    by all threads.
    """
    threads = [threading.Thread(target=fn, args=(k,), name=f"fastfeed-test-{k}") for k in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"threads still running after {timeout_s} s: {alive}"
