"""Exactly-once ledger records: a source, a decode, a torch dataset and the run checker.

:class:`LedgerSource` serves record ``i`` as ``i`` (8 bytes) plus a 64-bit content hash of
``(i, salt)`` (8 bytes), optionally padded. :class:`LedgerDecode` is a fixed-shape
transform that checks the hash and writes ``[index, hash]`` into the batch row (corrupt
bytes raise :class:`~fastfeed.errors.DecodeError`). :class:`Ledger` checks a whole run:
every expected index delivered exactly once with the right content, and the skipped
indices exactly the injected set.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from fastfeed.errors import DecodeError
from fastfeed.sources.base import Record, Source

__all__ = [
    "LEDGER_RECORD_BYTES",
    "Ledger",
    "LedgerDataset",
    "LedgerDecode",
    "LedgerSource",
    "decode_ledger_record",
    "ledger_hash",
    "ledger_record",
    "write_tiny_files",
]

#: Bytes of a ledger record without padding: index (int64 LE) + hash (int64 LE).
LEDGER_RECORD_BYTES = 16
_HASH_MASK = (1 << 63) - 1  # keep hashes positive int64, so they fit a torch.int64 row


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
        not_delivered = set(np.flatnonzero(self._expected & (self._counts == 0)).tolist())
        missing = sorted(not_delivered - skipped_set)
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
