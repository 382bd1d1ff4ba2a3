"""Helpers for testing loaders: ledgers, fake and faulty sources, subprocess children that
cannot hang, resource counters, synthetic images.

Shipped with fastfeed (like ``torch.testing``) so tests, benchmarks and examples import
them the same way: ``from fastfeed.testing import LedgerSource, Ledger, Child``. No
pytest dependency.

- **Ledger records** (:mod:`fastfeed.testing.ledger`): :class:`LedgerSource`,
  :class:`LedgerDecode`, :class:`LedgerDataset` and :class:`Ledger`, which checks that a
  run delivered every expected index exactly once with intact content.
- **Sources** (:mod:`fastfeed.testing.sources`): :class:`ListSource`,
  :class:`BlockingSource`, and :class:`FaultySource`, which raises, stalls or corrupts
  chosen records; :func:`chaos_plan` draws a reproducible fault plan.
- **Children and threads** (:mod:`fastfeed.testing.children`): :class:`Child` /
  :func:`run_child` run Python snippets whose thread stacks are dumped instead of hanging;
  :func:`run_in_threads` joins with a shared deadline.
- **Resource counters** (:mod:`fastfeed.testing.resources`): :class:`ResourceSnapshot`,
  :func:`open_fds`, :func:`thread_names`, :func:`rss_bytes`.
- **Synthetic data** (:mod:`fastfeed.testing.images`): :func:`color_jpeg`,
  :func:`random_image`, :func:`make_image_folder`, :func:`write_lmdb`.
"""

from __future__ import annotations

from fastfeed.testing.children import (
    Child,
    ChildHungError,
    ChildResult,
    call_counter,
    hold_live_loaders,
    run_child,
    run_in_threads,
)
from fastfeed.testing.images import (
    color_jpeg,
    decode_color_index,
    encode_jpeg,
    make_image_folder,
    random_image,
    write_lmdb,
)
from fastfeed.testing.ledger import (
    LEDGER_RECORD_BYTES,
    Ledger,
    LedgerDataset,
    LedgerDecode,
    LedgerSource,
    decode_ledger_record,
    ledger_hash,
    ledger_record,
    write_tiny_files,
)
from fastfeed.testing.resources import (
    ResourceSnapshot,
    open_fd_count,
    open_fds,
    rss_bytes,
    thread_names,
)
from fastfeed.testing.sources import (
    BlockingSource,
    FaultySource,
    InjectedError,
    ListSource,
    chaos_plan,
    corrupt_bytes,
    ledger_source,
)

__all__ = [
    "LEDGER_RECORD_BYTES",
    "BlockingSource",
    "Child",
    "ChildHungError",
    "ChildResult",
    "FaultySource",
    "InjectedError",
    "Ledger",
    "LedgerDataset",
    "LedgerDecode",
    "LedgerSource",
    "ListSource",
    "ResourceSnapshot",
    "call_counter",
    "chaos_plan",
    "color_jpeg",
    "corrupt_bytes",
    "decode_color_index",
    "decode_ledger_record",
    "encode_jpeg",
    "hold_live_loaders",
    "ledger_hash",
    "ledger_record",
    "ledger_source",
    "make_image_folder",
    "open_fd_count",
    "open_fds",
    "random_image",
    "rss_bytes",
    "run_child",
    "run_in_threads",
    "thread_names",
    "write_lmdb",
    "write_tiny_files",
]
