"""PinnedRing: slot reuse order, retention of referenced slots, batch-structure helpers."""

from __future__ import annotations

import threading
from collections import OrderedDict, namedtuple
from types import MappingProxyType

import pytest
import torch

import fastfeed.pipeline.buffers as buffers
from fastfeed.errors import ConfigError
from fastfeed.pipeline.buffers import PinnedRing, map_tensors, tensor_leaves
from fastfeed.testing import run_in_threads


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _FakeEvent:
    """Stands in for a torch.cuda.Event: query() says whether the GPU work completed."""

    def __init__(self, done: bool) -> None:
        self.done = done

    def query(self) -> bool:
        return self.done


def test_slots_are_reused_least_recently_handed_out_first():
    ring = PinnedRing(3)
    first = [ring.acquire(4, (2,), torch.float32) for _ in range(3)]
    ptrs = [_ptr(t) for t in first]
    assert len(set(ptrs)) == 3
    for t in first:
        assert ring.release(t) is True
    del first, t
    again = [_ptr(ring.acquire(4, (2,), torch.float32)) for _ in range(6)]
    # Each acquire drops its view at once, so the ring cycles through the three slots.
    assert again == ptrs + ptrs
    st = ring.stats()
    assert (st.allocations, st.reuses, st.retired, st.live_slots) == (3, 6, 0, 3)
    assert st.live_bytes == 3 * 4 * 2 * 4


def test_a_referenced_slot_is_never_handed_out_again():
    ring = PinnedRing(2)
    a = ring.acquire(3, (5,), torch.int64)
    a_ptr = _ptr(a)
    ring.release(a)
    row = a[1]  # a derived view, e.g. a logged sample
    del a
    b = ring.acquire(3, (5,), torch.int64)
    assert _ptr(b) != a_ptr
    ring.release(b)
    del b
    arr = row.numpy()  # numpy views count as references too
    del row
    c = ring.acquire(3, (5,), torch.int64)
    assert _ptr(c) != a_ptr
    del c, arr
    assert _ptr(ring.acquire(3, (5,), torch.int64)) == a_ptr


def test_full_ring_retires_kept_batches_and_never_blocks():
    ring = PinnedRing(2)
    kept = []
    for i in range(5):
        t = ring.acquire(2, (3,), torch.float32)
        t.fill_(i)
        ring.release(t)
        kept.append(t)
    st = ring.stats()
    assert (st.allocations, st.reuses, st.retired, st.live_slots) == (5, 0, 3, 2)
    for i, t in enumerate(kept):
        assert torch.equal(t, torch.full((2, 3), float(i)))
    assert len({_ptr(t) for t in kept}) == 5
    # A retired slot is no longer the ring's: releasing it again is ignored.
    assert ring.release(kept[0]) is False
    assert ring.owns(kept[-1]) and not ring.owns(kept[0])


def test_a_short_last_batch_gets_its_own_exact_buffer_and_pickles_small():
    import pickle

    ring = PinnedRing(2)
    full = ring.acquire(8, (3,), torch.uint8)
    ptr = _ptr(full)
    ring.release(full)
    short = ring.acquire(5, (3,), torch.uint8)
    assert short.shape == (5, 3) and short.is_contiguous()
    assert _ptr(short) != ptr  # not a view of the full slot ...
    assert short.untyped_storage().nbytes() == 15  # ... but exactly its own rows
    assert len(pickle.dumps(short)) < len(pickle.dumps(full))
    assert ring.stats().allocations == 1  # the ring's slot stays free for the next epoch
    del full
    again = ring.acquire(8, (3,), torch.uint8)
    assert _ptr(again) == ptr and ring.stats().reuses == 1


def test_shapes_and_dtypes_get_separate_slots():
    ring = PinnedRing(1)
    a = ring.acquire(2, (3,), torch.float32)
    b = ring.acquire(2, (3,), torch.float64)
    c = ring.acquire(2, (4,), torch.float32)
    assert len({_ptr(a), _ptr(b), _ptr(c)}) == 3
    assert ring.stats().live_slots == 3


def test_a_dropped_unreleased_pageable_slot_is_reused():
    # A worker that failed after acquiring never releases; pageable memory has no
    # asynchronous readers, so the slot comes back once nothing references it.
    ring = PinnedRing(1)
    ptr = _ptr(ring.acquire(2, (2,), torch.float32))
    assert _ptr(ring.acquire(2, (2,), torch.float32)) == ptr
    assert ring.stats().allocations == 1


def test_async_readers_need_a_completed_ready_event_before_reuse():
    ring = PinnedRing(2)
    ring._async_readers = True  # the policy for pinned slots, exercised without a GPU
    a = ring.acquire(2, (2,), torch.float32)
    a_ptr = _ptr(a)
    event = _FakeEvent(done=False)
    ring.release(a, ready_event=event)
    del a
    b = ring.acquire(2, (2,), torch.float32)
    assert _ptr(b) != a_ptr  # the copy reading slot a has not completed
    ring.release(b, ready_event=_FakeEvent(done=True))
    del b
    event.done = True
    assert _ptr(ring.acquire(2, (2,), torch.float32)) == a_ptr  # oldest first, now complete


def test_async_readers_without_ready_event_are_retired_not_reused():
    ring = PinnedRing(2)
    ring._async_readers = True
    a = ring.acquire(2, (2,), torch.float32)
    a_ptr = _ptr(a)
    ring.release(a)  # went to the user, who may have issued copies we cannot see
    del a
    assert ring.stats().retired == 1
    assert _ptr(ring.acquire(2, (2,), torch.float32)) != a_ptr
    # Dropped without a release at all: also never reused.
    c = ring.acquire(2, (2,), torch.float32)
    c_ptr = _ptr(c)
    del c
    d = ring.acquire(2, (2,), torch.float32)
    assert _ptr(d) != c_ptr


def test_without_use_counts_every_batch_gets_a_fresh_buffer(monkeypatch):
    monkeypatch.setattr(buffers, "_use_count", None)
    ring = PinnedRing(2)
    for _ in range(4):
        t = ring.acquire(2, (2,), torch.float32)
        ring.release(t)
        del t
    st = ring.stats()
    assert (st.allocations, st.reuses) == (4, 0)
    assert st.live_slots == 2


def test_concurrent_workers_never_share_a_live_buffer():
    ring = PinnedRing(3)
    errors: list[str] = []

    def worker(wid: int) -> None:
        for it in range(150):
            t = ring.acquire(16, (32,), torch.int64)
            t.fill_(wid * 1000 + it)
            threading.Event().wait(0)  # let the others run in between
            if not bool((t == wid * 1000 + it).all()):
                errors.append(f"worker {wid} iteration {it} saw foreign data")
            ring.release(t)
            del t

    run_in_threads(worker, 4, timeout_s=30)
    assert errors == []
    assert ring.stats().reuses > 0


def test_ring_rejects_bad_sizes():
    with pytest.raises(ConfigError, match="at least 1 slot"):
        PinnedRing(0)
    with pytest.raises(ConfigError, match="-1 rows"):
        PinnedRing(1).acquire(-1, (2,), torch.float32)


def test_clear_forgets_all_slots():
    ring = PinnedRing(2)
    kept = ring.acquire(2, (2,), torch.float32)
    ring.clear()
    st = ring.stats()
    assert (st.live_slots, st.live_bytes, st.retired) == (0, 0, 0)
    assert not ring.owns(kept)


class _IndexedBatch(tuple):
    """Like the Loader's batch type: a tuple subclass carrying ``.indices``."""


Pair = namedtuple("Pair", ["x", "y"])


def test_map_tensors_keeps_types_and_attributes():
    batch = _IndexedBatch((torch.ones(2), torch.zeros(2, dtype=torch.int64)))
    batch.indices = [4, 5]
    out = map_tensors(batch, lambda t: t + 1)
    assert type(out) is _IndexedBatch and out.indices == [4, 5]
    assert torch.equal(out[0], torch.full((2,), 2.0)) and torch.equal(out[1], torch.ones(2).long())

    nested = {
        "pair": Pair(torch.ones(1), [torch.zeros(1), "name"]),
        "meta": OrderedDict(id=torch.tensor([7])),
        "text": "abc",
        "n": 3,
    }
    out2 = map_tensors(nested, lambda t: t * 10)
    assert type(out2["pair"]) is Pair and out2["pair"].x.item() == 10
    assert out2["pair"].y[1] == "name" and out2["text"] == "abc" and out2["n"] == 3
    assert type(out2["meta"]) is OrderedDict and out2["meta"]["id"].item() == 70

    proxy = map_tensors(MappingProxyType({"a": torch.ones(1)}), lambda t: t * 3)
    assert proxy["a"].item() == 3

    class Tagged(list):
        pass

    tagged = Tagged([torch.ones(1)])
    tagged.tag = "t"
    out3 = map_tensors(tagged, lambda t: t - 1)
    assert type(out3) is Tagged and out3.tag == "t" and out3[0].item() == 0
    assert tagged[0].item() == 1  # the input is not modified


def test_tensor_leaves_depth_first():
    a, b, c = torch.ones(1), torch.zeros(1), torch.ones(2)
    assert [id(t) for t in tensor_leaves({"k": (a, [b]), "z": c, "s": "x"})] == [
        id(a),
        id(b),
        id(c),
    ]
