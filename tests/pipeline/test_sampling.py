"""Epoch orders: shuffle per (seed, epoch), rank shards, batches, resume state."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from fastfeed.errors import ConfigError
from fastfeed.pipeline.sampling import EpochProgress, EpochSampler, resolve_rank


def _flat(batches: list[np.ndarray]) -> list[int]:
    return [int(i) for b in batches for i in b]


def test_sequential_batches_and_len() -> None:
    s = EpochSampler(10, batch_size=4)
    assert len(s) == 3
    assert [b.tolist() for b in s.batches(0)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    s = EpochSampler(10, batch_size=4, drop_last=True)
    assert len(s) == 2
    assert _flat(s.batches(0)) == list(range(8))
    assert s.samples_per_epoch == 8


def test_shuffle_is_a_permutation_seeded_by_seed_and_epoch() -> None:
    s = EpochSampler(1000, batch_size=7, shuffle=True, seed=3)
    e0, e1 = _flat(s.batches(0)), _flat(s.batches(1))
    assert sorted(e0) == list(range(1000)) and sorted(e1) == list(range(1000))
    assert e0 != e1 and e0 != list(range(1000))
    again = EpochSampler(1000, batch_size=7, shuffle=True, seed=3)
    assert _flat(again.batches(0)) == e0
    other_seed = EpochSampler(1000, batch_size=7, shuffle=True, seed=4)
    assert _flat(other_seed.batches(0)) != e0
    # The batch size does not change the order, only how it is cut.
    assert _flat(EpochSampler(1000, batch_size=50, shuffle=True, seed=3).batches(0)) == e0


def test_negative_seed_and_empty_source() -> None:
    s = EpochSampler(5, batch_size=2, shuffle=True, seed=-1)
    assert sorted(_flat(s.batches(-2))) == [0, 1, 2, 3, 4]
    empty = EpochSampler(0, batch_size=2, shuffle=True)
    assert len(empty) == 0 and empty.batches(0) == []


@pytest.mark.parametrize("n", [1, 2, 10, 11, 101])
@pytest.mark.parametrize("world", [2, 3])
def test_pad_shards_cover_everything_with_equal_sizes(n: int, world: int) -> None:
    samplers = [
        EpochSampler(n, batch_size=4, shuffle=True, seed=1, rank=r, world_size=world)
        for r in range(world)
    ]
    shards = [_flat(s.batches(5)) for s in samplers]
    per_rank = -(-n // world)
    assert all(len(sh) == per_rank for sh in shards)
    assert len({len(s) for s in samplers}) == 1
    union = Counter(i for sh in shards for i in sh)
    assert set(union) == set(range(n))
    # Exactly the padding repeats: the first samples of the global order.
    pad = per_rank * world - n
    order = samplers[0].global_order(5).tolist()
    repeated = Counter()
    for k in range(pad):
        repeated[order[k % n]] += 1
    assert sum(union.values()) == n + pad
    assert {i: c - 1 for i, c in union.items() if c > 1} == {i: c for i, c in repeated.items() if c}


@pytest.mark.parametrize("n", [10, 11, 101])
@pytest.mark.parametrize("world", [2, 3])
def test_drop_shards_are_disjoint(n: int, world: int) -> None:
    shards = [
        _flat(
            EpochSampler(
                n, batch_size=3, shuffle=True, rank=r, world_size=world, even_batches="drop"
            ).batches(0)
        )
        for r in range(world)
    ]
    assert all(len(sh) == n // world for sh in shards)
    flat = [i for sh in shards for i in sh]
    assert len(flat) == len(set(flat)) == (n // world) * world
    assert set(flat) <= set(range(n))


def test_rank_shard_is_strided_like_distributed_sampler() -> None:
    s = EpochSampler(10, batch_size=100, rank=1, world_size=3)
    # padded order 0..9 + [0, 1]; rank 1 takes positions 1, 4, 7, 10.
    assert _flat(s.batches(0)) == [1, 4, 7, 0]


def test_invalid_arguments() -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        EpochSampler(10, batch_size=0)
    with pytest.raises(ConfigError, match="even_batches"):
        EpochSampler(10, batch_size=1, even_batches="wrap")
    with pytest.raises(ConfigError, match="rank"):
        EpochSampler(10, batch_size=1, rank=3, world_size=3)
    with pytest.raises(ConfigError, match="both"):
        resolve_rank(1, None)
    assert resolve_rank(None, None) == (0, 1)


def test_progress_marks_out_of_order() -> None:
    p = EpochProgress(epoch=2)
    p.mark([2, 4])
    assert (p.position, p.ahead) == (0, {2, 4})
    assert p.remaining(6) == [0, 1, 3, 5]
    p.mark([0])
    assert (p.position, p.ahead) == (1, {2, 4})
    p.mark([1])
    assert (p.position, p.ahead) == (3, {4})
    p.mark([3, 5])
    assert (p.position, p.ahead) == (6, set())
    assert p.complete(6) and p.remaining(6) == []


def test_state_round_trip_is_json_and_validated() -> None:
    s = EpochSampler(100, batch_size=10, shuffle=True)
    p = EpochProgress(epoch=3, position=4, ahead={6, 8}, failures=2)
    state = json.loads(json.dumps(p.to_state(7, s.describe())))
    assert state["position"] == 4 and state["ahead"] == [6, 8] and state["seed"] == 7
    seed, back = EpochProgress.from_state(state, s.describe(), len(s))
    assert seed == 7 and back == p
    other = EpochSampler(100, batch_size=20, shuffle=True)
    with pytest.raises(ConfigError, match="batch_size: saved 10, now 20"):
        EpochProgress.from_state(state, other.describe(), len(other))
    with pytest.raises(ConfigError, match="outside"):
        EpochProgress.from_state({**state, "position": 11}, s.describe(), len(s))
    with pytest.raises(ConfigError, match="version"):
        EpochProgress.from_state({**state, "version": 99}, s.describe(), len(s))
