"""Shared reliability harness: exactly-once ledgers, fault injection, subprocess runs, counters.

The pieces, each usable on its own:

- **Ledger records.** :class:`LedgerSource` serves record ``i`` as ``i`` (8 bytes) plus a
  64-bit content hash of ``(i, salt)`` (8 bytes), optionally padded. :class:`LedgerDecode`
  is a fixed-shape transform that checks the hash and writes ``[index, hash]`` into the
  batch row (corrupt bytes raise :class:`~fastfeed.errors.DecodeError`).
  :class:`Ledger` checks a whole run: every expected index delivered exactly once with the
  right content, and the skipped indices exactly the injected set.
- **Fault injection.** :class:`FaultySource` wraps any source: raise at chosen indices,
  stall (for a fixed time, or until :meth:`FaultySource.release`, bounded), corrupt the
  bytes, or run a callback before a read (e.g. delete the file mid-epoch).
  :func:`chaos_plan` draws a reproducible random fault plan.
- **Subprocesses.** :class:`Child` runs a Python snippet with ``faulthandler`` armed, so a
  hung child prints every thread's stack (on ``SIGUSR1`` from the parent, or by itself
  before its deadline) and the test fails with those stacks instead of hanging.
- **Counters.** :func:`open_fd_count`, :func:`thread_names`, :class:`ResourceSnapshot`,
  :func:`rss_bytes` (from ``/proc/self``).
- **Data.** Colour-coded JPEGs whose decoded pixels name their index
  (:func:`color_jpeg`, :func:`decode_color_index`), tiny files written fast
  (:func:`write_tiny_files`) and LMDBs in fastfeed's format with arbitrary values
  (:func:`write_lmdb`, zero-byte values included).

Used by ``tests/reliability/`` and ``benchmarks/soak.py`` (which puts ``tests/``
on ``sys.path``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import selectors
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastfeed.errors import DecodeError
from fastfeed.sources.base import Record, Source

__all__ = [
    "LEDGER_RECORD_BYTES",
    "Child",
    "ChildHungError",
    "ChildResult",
    "FaultySource",
    "InjectedError",
    "Ledger",
    "LedgerDataset",
    "LedgerDecode",
    "LedgerSource",
    "ResourceSnapshot",
    "chaos_plan",
    "color_jpeg",
    "corrupt_bytes",
    "decode_color_index",
    "decode_ledger_record",
    "hold_live_loaders",
    "ledger_hash",
    "ledger_record",
    "open_fd_count",
    "rss_bytes",
    "run_child",
    "thread_names",
    "write_lmdb",
    "write_tiny_files",
]

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent

#: Bytes of a ledger record without padding: index (int64 LE) + hash (int64 LE).
LEDGER_RECORD_BYTES = 16
_HASH_MASK = (1 << 63) - 1  # keep hashes positive int64, so they fit a torch.int64 row

# --------------------------------------------------------------------------------------
# Ledger records
# --------------------------------------------------------------------------------------


def ledger_hash(index: int, salt: int = 0) -> int:
    """The content hash of record ``index``: 63 bits of BLAKE2b over ``(index, salt)``."""
    digest = hashlib.blake2b(
        index.to_bytes(8, "little", signed=True) + salt.to_bytes(8, "little", signed=True),
        digest_size=8,
    ).digest()
    return int.from_bytes(digest, "little") & _HASH_MASK


def ledger_record(index: int, salt: int = 0, pad_bytes: int = 0) -> bytes:
    """Record bytes of ``index``: index and hash (16 bytes), then ``pad_bytes`` of ``0xAB``."""
    return (
        index.to_bytes(8, "little", signed=True)
        + ledger_hash(index, salt).to_bytes(8, "little")
        + b"\xab" * pad_bytes
    )


def decode_ledger_record(data: Any, salt: int = 0) -> tuple[int, int]:
    """Return ``(index, hash)`` of a ledger record.

    Raises:
        DecodeError: Fewer than 16 bytes, or a hash that does not match the index
            (corrupt bytes).
    """
    view = memoryview(data).cast("B")
    if view.nbytes < LEDGER_RECORD_BYTES:
        raise DecodeError(f"ledger record too short: {view.nbytes} bytes")
    index = int.from_bytes(view[:8], "little", signed=True)
    digest = int.from_bytes(view[8:16], "little")
    if index < 0 or digest != ledger_hash(index, salt):
        raise DecodeError(f"ledger record corrupt: index field {index}, hash {digest:#x}")
    return index, digest


class LedgerSource(Source):
    """``n`` ledger records computed on demand (no memory per record); label ``i % 10``.

    Args:
        n: Number of records.
        salt: Mixed into every hash, so two sources' records differ.
        pad_bytes: Extra bytes per record (bigger records, same check).
        delay_s: Sleep this long per record read, seconds (slow storage).
    """

    def __init__(self, n: int, *, salt: int = 0, pad_bytes: int = 0, delay_s: float = 0.0):
        super().__init__()
        self.n = int(n)
        self.salt = salt
        self.pad_bytes = pad_bytes
        self.delay_s = delay_s

    def __len__(self) -> int:
        return self.n

    def describe(self, index: int) -> str:
        return f"ledger[{index}]"

    def _read_one(self, index: int) -> Record:
        if self.delay_s:
            time.sleep(self.delay_s)
        return Record(ledger_record(index, self.salt, self.pad_bytes), index % 10)


class LedgerDecode:
    """Fixed-shape transform: checks a ledger record and writes ``[index, hash]`` (int64).

    Args:
        salt: The salt the records were written with.
    """

    def __init__(self, salt: int = 0) -> None:
        self.salt = salt

    def sample_spec(self) -> tuple[tuple[int, ...], torch.dtype]:
        return (2,), torch.int64

    def __call__(self, data: Any, out: torch.Tensor | None = None) -> torch.Tensor:
        index, digest = decode_ledger_record(data, self.salt)
        if out is None:
            out = torch.empty(2, dtype=torch.int64)
        out[0] = index
        out[1] = digest
        return out


class LedgerDataset(torch.utils.data.Dataset):
    """Map-style torch dataset of ledger samples, for ``DataLoader``.

    Item ``i`` is ``(tensor([i, hash]), i % 10)``; ``delay_s`` sleeps per item.
    """

    def __init__(self, n: int, *, salt: int = 0, delay_s: float = 0.0) -> None:
        self.n = n
        self.salt = salt
        self.delay_s = delay_s

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.n:
            raise IndexError(index)
        if self.delay_s:
            time.sleep(self.delay_s)
        return torch.tensor([index, ledger_hash(index, self.salt)]), index % 10


class Ledger:
    """Checks that a run delivered every expected index exactly once, with intact content.

    Feed it every batch with :meth:`add` (fastfeed ``Batch`` objects, or ``(data, labels)``
    pairs whose ``data`` rows are ``[index, hash]``), then call :meth:`check`. Counts live
    in a preallocated array, so a ledger's memory does not grow while a run fills it (the
    soak run measures RSS with one alive).

    Args:
        expected: The indices the run must cover (delivered or skipped); non-negative.
        salt: The salt of the ledger records.
        check_labels: Also require ``label == index % 10``.
    """

    def __init__(self, expected: Iterable[int], *, salt: int = 0, check_labels: bool = True):
        exp = np.fromiter(expected, dtype=np.int64)
        if exp.size and exp.min() < 0:
            raise ValueError("Ledger expects non-negative indices")
        self.size = int(exp.max()) + 1 if exp.size else 0
        self._expected = np.zeros(self.size, dtype=bool)
        self._expected[exp] = True
        self._counts = np.zeros(self.size, dtype=np.int32)
        self._outside: Counter[int] = Counter()  # delivered indices beyond 0..size-1
        self.salt = salt
        self.check_labels = check_labels
        self.errors: list[str] = []
        self.batches = 0

    def reset(self) -> None:
        """Forget everything delivered (reuse for the next epoch, same expected set)."""
        self._counts[:] = 0
        self._outside.clear()
        self.errors.clear()
        self.batches = 0

    def _count(self, index: int) -> None:
        if 0 <= index < self.size:
            self._counts[index] += 1
        else:
            self._outside[index] += 1

    def add(self, batch: Any) -> None:
        """Record one batch; content mismatches are collected for :meth:`check`."""
        data, labels = batch[0], batch[1]
        rows = data.tolist() if isinstance(data, torch.Tensor) else [list(r) for r in data]
        indices = getattr(batch, "indices", None)
        if indices is not None and len(indices) != len(rows):
            self.errors.append(f"batch {self.batches}: {len(rows)} rows, {len(indices)} indices")
        label_list = labels.tolist() if isinstance(labels, torch.Tensor) else labels
        for j, (index, digest) in enumerate(rows):
            if indices is not None and j < len(indices) and indices[j] != index:
                self.errors.append(
                    f"batch {self.batches} row {j}: data of {index} under index {indices[j]}"
                )
            if digest != ledger_hash(index, self.salt):
                self.errors.append(f"batch {self.batches} row {j}: bad hash for {index}")
            if self.check_labels and label_list is not None and label_list[j] != index % 10:
                self.errors.append(f"batch {self.batches} row {j}: label {label_list[j]}")
            self._count(index)
        self.batches += 1

    def add_indices(self, indices: Iterable[int]) -> None:
        """Record delivered indices without content (e.g. image batches checked elsewhere)."""
        for i in indices:
            self._count(int(i))
        self.batches += 1

    @property
    def delivered(self) -> set[int]:
        """Indices delivered at least once."""
        return set(np.flatnonzero(self._counts).tolist()) | set(self._outside)

    @property
    def total(self) -> int:
        """Samples delivered, duplicates included."""
        return int(self._counts.sum()) + sum(self._outside.values())

    def problems(self, skipped: Iterable[int] = (), injected: Iterable[int] = ()) -> list[str]:
        """Everything wrong with the run so far (empty when exact)."""
        skipped_list = [int(i) for i in skipped]
        skipped_set, injected_set = set(skipped_list), set(injected)
        out = list(self.errors[:10])
        dup = np.flatnonzero(self._counts > 1).tolist()
        dup += sorted(i for i, c in self._outside.items() if c > 1)
        if dup:
            out.append(f"{len(dup)} delivered more than once: {dup[:10]}")
        if len(skipped_list) != len(skipped_set):
            twice = sorted(i for i, c in Counter(skipped_list).items() if c > 1)
            out.append(f"skipped listed more than once: {twice[:10]}")
        delivered = self.delivered
        both = sorted(skipped_set & delivered)
        if both:
            out.append(f"{len(both)} both delivered and skipped: {both[:10]}")
        missing = set(np.flatnonzero(self._expected & (self._counts == 0)).tolist())
        missing = sorted(missing - skipped_set)
        if missing:
            out.append(f"{len(missing)} neither delivered nor skipped: {missing[:10]}")
        extra = np.flatnonzero(~self._expected & (self._counts > 0)).tolist()
        extra += sorted(self._outside)
        if extra:
            out.append(f"{len(extra)} delivered but not expected: {extra[:10]}")
        if skipped_set != injected_set:
            out.append(
                f"skipped != injected: skipped-only {sorted(skipped_set - injected_set)[:10]}, "
                f"injected-only {sorted(injected_set - skipped_set)[:10]}"
            )
        return out

    def check(self, skipped: Iterable[int] = (), injected: Iterable[int] = ()) -> None:
        """Assert the run was exact.

        Raises:
            AssertionError: Listing duplicates, missing, unexpected, corrupt or wrongly
                skipped indices.
        """
        found = self.problems(skipped, injected)
        if found:
            raise AssertionError("ledger not exact: " + "; ".join(found))


# --------------------------------------------------------------------------------------
# Fault injection
# --------------------------------------------------------------------------------------


class InjectedError(RuntimeError):
    """The exception :class:`FaultySource` raises at its ``raise_at`` indices."""


def corrupt_bytes(data: Any) -> bytes:
    """Flip every bit of the first 16 bytes: breaks ledger hashes and image headers alike."""
    raw = bytes(data)
    head = bytes(b ^ 0xFF for b in raw[:LEDGER_RECORD_BYTES])
    return head + raw[LEDGER_RECORD_BYTES:]


class FaultySource(Source):
    """Wraps a source and injects faults at chosen indices.

    Args:
        inner: The source to wrap (``describe``, ``len``, ``hint`` pass through).
        raise_at: Reads of these indices raise :class:`InjectedError` (every time).
        stall_at: Reads of these indices block: for ``stall_s`` seconds, or, when
            ``stall_s`` is None, until :meth:`release` (at most ``max_stall_s``).
        corrupt_at: These records come back passed through ``corruptor``.
        on_read: ``{index: callback}``; each callback runs once, before the first read of
            its index (e.g. delete another record's file).
        stall_s: Length of a stall, seconds; None stalls until released.
        max_stall_s: Upper bound of an unreleased stall, so no test hangs forever.
        corruptor: Turns record bytes into corrupt bytes (default :func:`corrupt_bytes`).

    Attributes:
        fired: ``{"raise" | "stall" | "corrupt": set of indices}`` that actually happened.
        stalled: Set once a read is blocked in a stall (tests wait on it).
    """

    def __init__(
        self,
        inner: Source,
        *,
        raise_at: Iterable[int] = (),
        stall_at: Iterable[int] = (),
        corrupt_at: Iterable[int] = (),
        on_read: Mapping[int, Callable[[], None]] | None = None,
        stall_s: float | None = None,
        max_stall_s: float = 30.0,
        corruptor: Callable[[Any], bytes] = corrupt_bytes,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.classes = inner.classes
        self.raise_at = frozenset(raise_at)
        self.stall_at = frozenset(stall_at)
        self.corrupt_at = frozenset(corrupt_at)
        self._on_read = dict(on_read or {})
        self.stall_s = stall_s
        self.max_stall_s = max_stall_s
        self.corruptor = corruptor
        self.fired: dict[str, set[int]] = {"raise": set(), "stall": set(), "corrupt": set()}
        self.stalled = threading.Event()
        self._released = threading.Event()
        self._lock = threading.Lock()

    def release(self) -> None:
        """End every current and future unbounded stall."""
        self._released.set()

    def __len__(self) -> int:
        return len(self.inner)

    def describe(self, index: int) -> str:
        return self.inner.describe(index)

    def hint(self, indices: Iterable[int]) -> None:
        self.inner.hint(indices)

    def _note(self, kind: str, index: int) -> None:
        with self._lock:
            self.fired[kind].add(index)

    def _before(self, index: int) -> None:
        callback = None
        if self._on_read:
            with self._lock:
                callback = self._on_read.pop(index, None)
        if callback is not None:
            callback()
        if index in self.stall_at:
            self._note("stall", index)
            self.stalled.set()
            if self.stall_s is None:
                self._released.wait(self.max_stall_s)
            else:
                time.sleep(self.stall_s)
        if index in self.raise_at:
            self._note("raise", index)
            raise InjectedError(f"injected fault reading {self.describe(index)}")

    def _after(self, index: int, rec: Record) -> Record:
        if index in self.corrupt_at:
            self._note("corrupt", index)
            return Record(self.corruptor(rec.data), rec.label)
        return rec

    def _read_one(self, index: int) -> Record:
        self._before(index)
        return self._after(index, self.inner.read(index))

    def _read_many(self, indices: Sequence[int]) -> list[Record]:
        for i in indices:
            self._before(i)
        recs = self.inner.read_many(indices)
        return [self._after(i, r) for i, r in zip(indices, recs, strict=True)]

    def close(self) -> None:
        """Release stalls and close the wrapped source too."""
        self.release()
        super().close()
        self.inner.close()


def chaos_plan(
    n: int, rate: float, seed: int = 0, kinds: Sequence[str] = ("raise", "stall", "corrupt")
) -> dict[str, set[int]]:
    """A reproducible random fault plan: about ``rate * n`` indices, split among ``kinds``.

    Returns:
        ``{kind: indices}``; an index gets at most one fault.
    """
    rng = np.random.default_rng(seed)
    hit = np.flatnonzero(rng.random(n) < rate)
    kind_of = rng.integers(0, len(kinds), size=hit.size)
    plan: dict[str, set[int]] = {k: set() for k in kinds}
    for i, k in zip(hit.tolist(), kind_of.tolist(), strict=True):
        plan[kinds[k]].add(i)
    return plan


# --------------------------------------------------------------------------------------
# Subprocess runs that cannot hang silently
# --------------------------------------------------------------------------------------

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
    so a hang is reported with stacks instead of blocking the test run. ``tests/`` and the
    repository root are on the child's ``sys.path`` (``from harness import ...`` works).

    Args:
        code: Python source (dedented).
        timeout_s: The child's own deadline, seconds.
        env: Extra environment variables.
    """

    def __init__(self, code: str, *, timeout_s: float = 60.0, env: Mapping[str, str] | None = None):
        self.timeout_s = timeout_s
        child_env = dict(os.environ)
        path = [str(TESTS_DIR), str(REPO_DIR)]
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
            cwd=str(REPO_DIR),
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

    loader = Loader(LedgerSource(4096, delay_s=0.01), LedgerDecode(), batch_size=8, num_threads=2)
    it = iter(loader)
    next(it)
    compat = DataLoader(LedgerDataset(4096, delay_s=0.01), batch_size=8, num_workers=2)
    compat_it = iter(compat)
    next(compat_it)
    _KEEP_ALIVE.extend([loader, it, compat, compat_it])
    print("LIVE-LOADERS", flush=True)


# --------------------------------------------------------------------------------------
# Resource counters
# --------------------------------------------------------------------------------------


def open_fd_count() -> int:
    """Open file descriptors of this process (``/proc/self/fd``, minus the listing's own)."""
    return len(os.listdir("/proc/self/fd")) - 1


def open_fds() -> dict[int, str]:
    """``{fd: target}`` of this process's open descriptors (for failure messages)."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the listing's own descriptor, closed by now
            continue
    return out


def thread_names() -> list[str]:
    """Names of this process's live Python threads, sorted."""
    return sorted(t.name for t in threading.enumerate() if t.is_alive())


def rss_bytes() -> int:
    """Resident set size of this process, bytes (``/proc/self/statm``)."""
    with open("/proc/self/statm", encoding="ascii") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


@dataclass
class ResourceSnapshot:
    """Threads and file descriptors at one moment.

    Attributes:
        threads: Live thread names, sorted.
        fds: ``{fd: target}``.
    """

    threads: list[str] = field(default_factory=thread_names)
    fds: dict[int, str] = field(default_factory=open_fds)

    def excess_over(self, baseline: ResourceSnapshot) -> str:
        """What this snapshot holds beyond ``baseline`` ('' when nothing)."""
        extra_threads = list((Counter(self.threads) - Counter(baseline.threads)).elements())
        extra_fds = {fd: t for fd, t in self.fds.items() if baseline.fds.get(fd) != t}
        parts = []
        if extra_threads:
            parts.append(f"{len(extra_threads)} extra thread(s): {sorted(extra_threads)[:10]}")
        if len(self.fds) > len(baseline.fds):
            parts.append(f"{len(self.fds) - len(baseline.fds)} extra fd(s): {extra_fds}")
        return "; ".join(parts)

    @classmethod
    def settle(cls, baseline: ResourceSnapshot, timeout_s: float = 3.0) -> ResourceSnapshot:
        """Poll until nothing exceeds ``baseline`` (or ``timeout_s`` passes); return the last."""
        deadline = time.monotonic() + timeout_s
        snap = cls()
        while snap.excess_over(baseline) and time.monotonic() < deadline:
            time.sleep(0.02)
            snap = cls()
        return snap


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------

_COLOR_STEP = 6
_COLOR_BASE = 16


def _index_color(index: int) -> tuple[int, int, int]:
    if not 0 <= index < 36:
        raise ValueError(f"colour-coded images hold indices 0..35, got {index}")
    red = _COLOR_BASE + _COLOR_STEP * index
    return red, 255 - red, 128


def color_jpeg(index: int, size: tuple[int, int] = (64, 48), noise: float = 6.0) -> bytes:
    """A JPEG whose mean red level encodes ``index`` (0..35), with noise so it is photo-like.

    Args:
        index: The index to encode.
        size: (width, height) in pixels.
        noise: Standard deviation of the added noise, grey levels.
    """
    from PIL import Image  # Pillow is a fastfeed dependency; import only when used

    width, height = size
    rng = np.random.default_rng(index)
    pixels = np.empty((height, width, 3), dtype=np.float32)
    pixels[:] = _index_color(index)
    pixels += rng.normal(0.0, noise, size=pixels.shape).astype(np.float32)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def decode_color_index(row: torch.Tensor) -> int:
    """The index a decoded CHW (or HWC) uint8 row of :func:`color_jpeg` encodes."""
    channels_first = row.shape[0] == 3
    red = row[0] if channels_first else row[..., 0]
    return round((float(red.float().mean()) - _COLOR_BASE) / _COLOR_STEP)


def write_tiny_files(folder: str | os.PathLike[str], n: int, salt: int = 0) -> list[str]:
    """Write ``n`` ledger records as files ``folder/<i>.bin`` (fast: raw ``os.write``).

    Returns:
        The paths, in index order.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"{i:07d}.bin")
        fd = os.open(path, flags, 0o644)
        try:
            os.write(fd, ledger_record(i, salt))
        finally:
            os.close(fd)
        paths.append(path)
    return paths


def write_lmdb(
    path: str | os.PathLike[str],
    payloads: Sequence[bytes],
    labels: Sequence[int] | None = None,
) -> str:
    """Write an LMDB in fastfeed's format (``fastfeed.packing``'s keys) holding ``payloads``.

    Unlike ``pack``, any value is accepted (zero-byte, corrupt), so tests can plant bad
    records. Returns the directory path.
    """
    import lmdb  # fastfeed dependency; imported where needed

    from fastfeed.sources.lmdb import FORMAT_VERSION, LABELS_KEY, META_KEY, record_key

    path = os.fspath(path)
    total = sum(len(p) for p in payloads)
    env = lmdb.open(path, subdir=True, map_size=max(1 << 20, 4 * total + (1 << 20)), lock=False)
    try:
        with env.begin(write=True) as txn:
            for i, p in enumerate(payloads):
                txn.put(record_key(i), bytes(p))
            meta = {
                "format_version": FORMAT_VERSION,
                "count": len(payloads),
                "classes": None,
                "has_labels": labels is not None,
                "has_paths": False,
            }
            txn.put(META_KEY, json.dumps(meta).encode())
            if labels is not None:
                txn.put(LABELS_KEY, np.asarray(labels, dtype="<i8").tobytes())
        env.sync(True)
    finally:
        env.close()
    return path
