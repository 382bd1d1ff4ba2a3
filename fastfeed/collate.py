"""Collate samples into batches: straight into a batch buffer, or generically.

Two paths, one object (:class:`Collator`), used by both :class:`fastfeed.Loader` and
:class:`fastfeed.DataLoader`:

- **Fixed shape**: :meth:`Collator.new_batch` returns an uninitialised ``(n, *shape)``
  buffer and the workers write each sample into its row (no per-sample tensor, no
  ``torch.stack``). :meth:`Collator.release` tells the collator the consumer is done
  with a buffer, so a ring implementation can reuse it.
- **Generic**: :meth:`Collator.collate` runs the user's ``collate_fn`` (torch's
  ``default_collate`` by default) on ragged or nested samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import default_collate

__all__ = ["Collator"]


class Collator:
    """Builds batches for the loader's worker threads.

    Args:
        collate_fn: Generic collate for samples that are not written into a buffer;
            torch's ``default_collate`` when None.
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any] | None = None) -> None:
        self.collate_fn = collate_fn if collate_fn is not None else default_collate

    def new_batch(self, n: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised ``(n, *shape)`` tensor whose rows the workers fill."""
        return torch.empty((n, *shape), dtype=dtype)

    def collate(self, samples: list[Any]) -> Any:
        """Collate samples with ``collate_fn``."""
        return self.collate_fn(samples)

    def labels(self, labels: Sequence[int | None]) -> torch.Tensor | None:
        """Labels as an int64 tensor, or None when the source has none."""
        if not labels or labels[0] is None:
            return None
        return torch.tensor(labels, dtype=torch.int64)

    def release(self, batch: Any) -> None:
        """The consumer has moved past ``batch``; its buffers may be reused."""
