"""Which buffers come from the ring: pinned ones always, unpinned ones from 4 MiB."""

from __future__ import annotations

import pytest
import torch

from fastfeed import DataLoader
from fastfeed.pipeline import collate
from fastfeed.pipeline.collate import RING_MIN_BYTES, Collator


@pytest.fixture(autouse=True)
def production_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(collate, "RING_MIN_BYTES", 4 << 20)  # undo the folder's fixture


def test_small_unpinned_buffers_are_plain_allocations() -> None:
    c = Collator(slots=4)
    assert c.ring_min_bytes == RING_MIN_BYTES == 4 << 20
    for _ in range(3):
        small = c.new_batch(256, (3072,), torch.uint8)  # 786 KB
        assert small.shape == (256, 3072) and small.dtype == torch.uint8
        c.release(small)
    stats = c.stats()
    assert (stats["allocations"], stats["reuses"], stats["live_slots"]) == (0, 0, 0)


def test_buffers_from_the_threshold_up_come_from_the_ring() -> None:
    c = Collator(slots=4)
    rows = (4 << 20) // (3 * 224 * 224)  # 27 images: just under 4 MiB
    under = c.new_batch(rows, (3, 224, 224), torch.uint8)
    over = c.new_batch(rows + 1, (3, 224, 224), torch.uint8)
    assert under.numel() < 4 << 20 <= over.numel()
    c.release(under)
    c.release(over)
    ptr = over.data_ptr()
    del over  # a slot is rewritten only once nothing references it
    again = c.new_batch(rows + 1, (3, 224, 224), torch.uint8)
    assert again.data_ptr() == ptr  # the released slot came back
    stats = c.stats()
    assert (stats["allocations"], stats["reuses"]) == (1, 1)


def test_dataloader_batches_are_unchanged_by_the_threshold() -> None:
    data = [torch.full((3,), i, dtype=torch.int32) for i in range(10)]
    got = [b.tolist() for b in DataLoader(data, batch_size=4)]
    assert got == [[[i] * 3 for i in range(k, min(k + 4, 10))] for k in range(0, 10, 4)]


def test_small_unpinned_tensor_batches_take_torchs_rule_without_the_slot_checks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torch.utils.data import default_collate

    def no_checks(batch: object) -> bool:
        raise AssertionError("the slot checks ran for a plain allocation")

    monkeypatch.setattr(collate, "_stackable", no_checks)
    c = Collator(slots=4)
    samples = [(torch.full((3072,), i, dtype=torch.uint8), i) for i in range(256)]  # 786 KB
    xs, ys = c.collate(samples)
    want_xs, want_ys = default_collate(samples)
    assert torch.equal(xs, want_xs) and torch.equal(ys, want_ys)
    assert xs.dtype == torch.uint8 and ys.dtype == torch.int64
    # Ragged, mixed-dtype and grad-requiring batches: torch's results and errors.
    mixed = [torch.ones(2, dtype=torch.float32), torch.ones(2, dtype=torch.float64)]
    assert c.collate(mixed).dtype == default_collate(mixed).dtype == torch.float64
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        c.collate([torch.ones(2), torch.ones(3)])
    grad = c.collate([torch.ones(2, requires_grad=True)] * 3)
    assert grad.requires_grad and grad.grad_fn is not None
    assert c.stats()["allocations"] == 0
