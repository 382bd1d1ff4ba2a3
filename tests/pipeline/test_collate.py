"""Collator: ring-backed batches, held-batch integrity, generic collate parity, pin warning."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from fastfeed.errors import ConfigError
from fastfeed.pipeline.collate import Collator
from fastfeed.pipeline.prefetch import Prefetcher

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA fallback")


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _fill(out: torch.Tensor, index: int) -> None:
    """What a worker does: write sample ``index`` into its row (deterministic content)."""
    out.copy_(torch.arange(out.numel(), dtype=torch.int64).view(out.shape) * 7 + index)


def _expected(shape: tuple[int, ...], indices: list[int]) -> torch.Tensor:
    base = torch.arange(int(np.prod(shape)), dtype=torch.int64).view(shape) * 7
    rows = [base + i for i in indices]
    return torch.stack(rows).to(torch.int32)


class _Task:
    def __init__(self, indices: list[int]) -> None:
        self.indices = indices


def test_new_batch_reuses_slots_after_release():
    col = Collator(slots=2)
    a = col.new_batch(4, (3, 2), torch.uint8)
    assert a.shape == (4, 3, 2) and a.dtype == torch.uint8
    a_ptr = _ptr(a)
    col.release(a)
    del a
    b = col.new_batch(4, (3, 2), torch.uint8)
    assert _ptr(b) == a_ptr
    assert col.stats() == {
        "pinned": False,
        "allocations": 1,
        "reuses": 1,
        "retired": 0,
        "live_slots": 1,
        "live_bytes": 24,
    }


def test_held_batches_never_change_over_200_iterations():
    """Hold every 3rd batch (as a user logging or accumulating metrics would) while two
    worker threads keep filling ring slots; every held batch must still equal its reference."""
    shape = (3, 4, 4)
    col = Collator(slots=4)
    tasks = [_Task(list(range(i * 8, i * 8 + 8))) for i in range(200)]

    def build(task: _Task) -> tuple[torch.Tensor, torch.Tensor]:
        images = col.new_batch(len(task.indices), shape, torch.int32)
        for row, index in enumerate(task.indices):
            _fill(images[row], index)
        return images, col.labels([i % 10 for i in task.indices])

    held = []
    with Prefetcher(tasks, build, num_threads=2, depth=2) as pf:
        prev = None
        for n, (task, batch) in enumerate(pf):
            if prev is not None:
                col.release(prev)  # the consumer moved past the previous batch
            if n % 3 == 0:
                held.append((task.indices, batch))
            prev = batch
        col.release(prev)
        del prev, batch
    assert len(held) == 67
    for indices, (images, labels) in held:
        assert torch.equal(images, _expected(shape, indices)), f"batch {indices[:2]} changed"
        assert labels.tolist() == [i % 10 for i in indices]
    st = col.stats()
    # The test exercised reuse: most batches came from recycled slots, the kept ones not.
    assert st["reuses"] > 200
    assert st["allocations"] <= 2 * (4 + st["retired"])
    held_ptrs = [_ptr(images) for _, (images, _) in held]
    assert len(set(held_ptrs)) == len(held_ptrs)


def test_labels_go_into_an_int64_buffer_or_none():
    col = Collator()
    labels = col.labels([3, 1, 4])
    assert labels.dtype == torch.int64 and labels.tolist() == [3, 1, 4]
    assert col.ring.owns(labels)
    assert col.labels([None, None]) is None
    assert col.labels([]) is None


def _assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def test_generic_collate_matches_default_collate_and_stacks_into_slots():
    samples = [
        {
            "image": torch.full((3, 2, 2), i, dtype=torch.uint8),
            "pair": (np.arange(4, dtype=np.float32) + i, i),
            "score": 0.5 * i,
            "name": f"s{i}",
        }
        for i in range(5)
    ]
    col = Collator(slots=3)
    ours = col.collate(samples)
    _assert_same(ours, default_collate(samples))
    assert col.ring.owns(ours["image"]) and col.ring.owns(ours["pair"][0])
    assert not col.ring.owns(ours["pair"][1])  # Python ints: a small tensor of their own
    image_ptr = _ptr(ours["image"])
    col.release(ours)
    del ours
    again = col.collate(samples)
    assert _ptr(again["image"]) == image_ptr  # the slot came back


def test_ragged_samples_fail_as_in_torch_and_a_custom_collate_handles_them():
    ragged = [torch.ones(2), torch.ones(3)]
    col = Collator()
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        col.collate(ragged)

    def pad(samples):
        return torch.nn.utils.rnn.pad_sequence(samples, batch_first=True)

    padded = Collator(pad).collate(ragged)
    assert padded.tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]


def test_tensors_that_cannot_go_into_a_slot_keep_torch_semantics():
    col = Collator()
    grad = [torch.ones(2, requires_grad=True) for _ in range(3)]
    out = col.collate(grad)
    assert out.requires_grad and out.grad_fn is not None and not col.ring.owns(out)
    mixed = [torch.ones(2, dtype=torch.float32), torch.ones(2, dtype=torch.float64)]
    _assert_same(col.collate(mixed), default_collate(mixed))
    assert col.stats()["allocations"] == 0


def test_slots_zero_allocates_fresh_buffers():
    col = Collator(slots=0)
    a = col.new_batch(2, (2,), torch.float32)
    b = col.new_batch(2, (2,), torch.float32)
    assert _ptr(a) != _ptr(b)
    col.release(a)  # nothing to do, no error
    assert col.stats() == {"pinned": False}
    with pytest.raises(ConfigError, match="slots must be >= 0"):
        Collator(slots=-1)


def test_release_ignores_foreign_tensors_and_repeats():
    col = Collator(slots=1)
    batch = (col.new_batch(2, (2,), torch.float32), torch.ones(3), "meta", 5)
    col.release(batch)
    col.release(batch)  # stager and loader may both release: the first one counts
    assert col.stats()["reuses"] == 0
    del batch
    col.new_batch(2, (2,), torch.float32)
    assert col.stats()["reuses"] == 1


@no_cuda
def test_pin_memory_without_cuda_degrades_to_ordinary_memory_silently():
    # Whether to pin, and the warning, are the assembly point's (tests/pipeline).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        col = Collator(pin_memory=True, slots=2)
        for i in range(30):
            images = col.new_batch(4, (2,), torch.float32)
            images.fill_(i)
            batch = (images, col.labels([1, 2, 3, 4]))
            merged = col.collate([{"x": torch.ones(2)}, {"x": torch.zeros(2)}])
            assert torch.equal(batch[0], torch.full((4, 2), float(i)))
            assert merged["x"].tolist() == [[1.0, 1.0], [0.0, 0.0]]
            col.release(batch)
            col.release(merged)
        assert col.pinned is False and col.pin_memory is True


@pytest.mark.cuda
def test_pinned_batches_held_by_the_user_survive_their_own_async_copies():
    """pin_memory=True without a stager: the training loop copies with
    .cuda(non_blocking=True) itself; batches it keeps must never change and pinned host
    memory must not grow (freed slots go back to torch's caching host allocator)."""
    shape = (3, 8, 8)
    col = Collator(pin_memory=True, slots=4)
    assert col.pinned
    held, gpu_sums = [], []
    for n in range(300):
        indices = list(range(n * 4, n * 4 + 4))
        images = col.new_batch(4, shape, torch.int32)
        assert images.is_pinned()
        for row, index in enumerate(indices):
            _fill(images[row], index)
        batch = (images, col.labels(indices))
        x = batch[0].cuda(non_blocking=True)
        torch.cuda._sleep(100_000)  # the step runs late, the copy may still be queued
        gpu_sums.append(x.to(torch.int64).sum())
        if n % 3 == 0:
            held.append((indices, batch))
        col.release(batch)
        del batch, images, x
    torch.cuda.synchronize()
    for indices, (images, labels) in held:
        assert torch.equal(images, _expected(shape, indices))
        assert labels.tolist() == indices
    for n, s in enumerate(gpu_sums):
        assert s.item() == int(_expected(shape, list(range(n * 4, n * 4 + 4))).sum())

    # Without kept batches, pinned memory stops growing once torch's caching host
    # allocator has enough blocks for the batches in flight (a loss.item() every 10 steps
    # keeps the CPU from running arbitrarily far ahead of the GPU).
    host_allocs = []
    for n in range(600):
        images = col.new_batch(4, shape, torch.int32)
        images.fill_(n)
        x = images.cuda(non_blocking=True)
        torch.cuda._sleep(100_000)
        total = x.sum()
        col.release(images)
        del images, x
        if n % 10 == 9:
            assert total.item() == n * 4 * 3 * 8 * 8
        if n in (100, 599):
            host_allocs.append(_host_allocs())
    if host_allocs[0] is not None:
        assert host_allocs[1] == host_allocs[0], f"pinned blocks grew: {host_allocs}"


def _host_allocs() -> int | None:
    """cudaHostAlloc calls so far (torch's caching host allocator), None if not reported."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    return stats().get("num_host_alloc") if stats is not None else None


_NUMBER_BATCHES = [
    [3, 1, 4, 1, 5],  # ints -> int64
    [1, True, 0],  # an int first, bools among them -> int64
    [True, False, True],  # bools only -> bool
    [1, 2.5],  # a float among ints -> torch's inference (float32)
    [1, torch.tensor(2)],  # a 0-d tensor among ints
    [1, np.int32(3)],  # a numpy integer among ints
    [2**62, -(2**62)],  # large, still int64
    [0.5, 2.25, -1e300],  # floats -> float64
    [1.5, True, 2],  # ints and bools among floats -> float64
    [1.5, np.float32(2.0)],
    [float("nan"), float("inf")],
    [1.5, 2**70],  # an int numpy cannot hold -> torch's rule
]

_BAD_NUMBER_BATCHES = [
    [1, 2**63],  # overflows int64
    [1, "a"],
    [1, None],
    [1, [2]],
    [1.5, None],
    [1.5, 1j],
    [1, np.uint64(2**63)],
]


@pytest.mark.parametrize("batch", _NUMBER_BATCHES, ids=repr)
def test_number_batches_collate_to_what_default_collate_gives(batch):
    got = Collator().collate(batch)
    want = default_collate(batch)
    # Same dtype, shape and values (NaN where torch has NaN), bit for bit.
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert got.untyped_storage().resizable()  # an ordinary tensor, as torch.tensor makes
    # Inside tuples (a sample's label) too, e.g. 3 KB records with an int label.
    pairs = [(torch.full((2,), k), v) for k, v in enumerate(batch)]
    xs, ys = Collator().collate(pairs)
    want_xs, want_ys = default_collate(pairs)
    assert torch.equal(xs, want_xs)
    torch.testing.assert_close(ys, want_ys, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("batch", _BAD_NUMBER_BATCHES, ids=repr)
def test_number_batches_torch_rejects_fail_with_torch_error(batch):
    with pytest.raises(Exception) as want:
        default_collate(batch)
    with pytest.raises(type(want.value)) as got:
        Collator().collate(batch)
    assert str(got.value) == str(want.value)


def test_a_changed_label_never_shares_memory_with_the_next_batch():
    col = Collator()
    first = col.collate([1, 2, 3])
    second = col.collate([4, 5, 6])
    first += 10
    assert second.tolist() == [4, 5, 6] and first.tolist() == [11, 12, 13]
