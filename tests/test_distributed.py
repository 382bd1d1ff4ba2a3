"""Loader under a real torch.distributed process group (gloo, several local processes)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp_mp

from fastfeed.loader import Loader
from fastfeed.testing import ledger_source

N = 101  # not divisible by 2 or 3, so padding and dropping both matter
BATCH = 8

_CASES = [
    (even, drop_last, shuffle)
    for even in ("pad", "drop")
    for drop_last in (False, True)
    for shuffle in (False, True)
]


def _rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = []
        for even, drop_last, shuffle in _CASES:
            # rank / world_size come from the initialized process group.
            loader = Loader(
                ledger_source(N),
                batch_size=BATCH,
                shuffle=shuffle,
                seed=4,
                drop_last=drop_last,
                even_batches=even,
                num_threads=2,
            )
            loader.set_epoch(1)
            batches = []
            for batch in loader:
                # A collective per step, as DDP does: hangs if batch counts differ.
                t = torch.ones(1)
                dist.all_reduce(t)
                assert int(t.item()) == world
                batches.append(batch.indices)
            results.append(
                {
                    "rank": loader.rank,
                    "world": loader.world_size,
                    "len": len(loader),
                    "batches": batches,
                }
            )
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        # Leave together (tearing gloo down under a peer can abort it); a CPU all_reduce,
        # not barrier(), which may touch CUDA in these forked children when it is present.
        dist.all_reduce(torch.zeros(1))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_shard_the_epoch(world: int, tmp_path: Path) -> None:
    # fork: the children inherit the imported torch, so a group starts in well under 1 s.
    # Not once CUDA is initialized in this process (CUDA tests ran before): a forked child
    # of a CUDA process can abort on a lock held by a driver thread at fork time.
    method = "spawn" if torch.cuda.is_initialized() else "fork"
    tmp_mp.start_processes(
        _rank_main,
        args=(world, str(tmp_path / "pg_init"), str(tmp_path)),
        nprocs=world,
        join=True,
        start_method=method,
    )
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    reference = Loader(ledger_source(N), batch_size=BATCH, seed=4, shuffle=True, num_threads=0)
    for c, (even, drop_last, shuffle) in enumerate(_CASES):
        runs = [per_rank[r][c] for r in range(world)]
        assert [run["rank"] for run in runs] == list(range(world))
        assert all(run["world"] == world for run in runs)
        counts = {len(run["batches"]) for run in runs}
        assert len(counts) == 1, f"ranks disagree on batches per epoch: {counts}"
        assert counts == {runs[0]["len"]}
        shards = [[i for b in run["batches"] for i in b] for run in runs]
        per = -(-N // world) if even == "pad" else N // world
        expected_len = (per // BATCH) * BATCH if drop_last else per
        assert all(len(s) == expected_len for s in shards)
        union = Counter(i for s in shards for i in s)
        order = reference.sampler.global_order(1).tolist() if shuffle else list(range(N))
        if even == "drop":
            # Disjoint shards, covering the epoch's order minus its tail.
            assert all(c == 1 for c in union.values())
            if not drop_last:
                assert set(union) == set(order[: N - N % world])
        elif not drop_last:
            # The union is the whole epoch; padding repeats the head of the global order.
            pad = per * world - N
            assert set(union) == set(range(N))
            assert sum(union.values()) == N + pad
            assert sorted(i for i, c in union.items() if c == 2) == sorted(order[:pad])
        else:
            assert all(c <= 2 for c in union.values())
