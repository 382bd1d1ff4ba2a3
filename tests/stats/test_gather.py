"""Every rank's figures under torch.distributed: the slowest rank and the stragglers."""

from __future__ import annotations

import json
import math
import os
import time

import pytest

from fastfeed.profiling import Recorder, Stage
from fastfeed.stats import LoaderStats
from fastfeed.stats.gather import stragglers
from fastfeed.stats.model import RankSummary


def _rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rec = Recorder()
        # Rank 1 is starved: it waits 40 ms of each 50 ms step; rank 0 waits 1 ms.
        wait = 0.04 if rank == 1 else 0.001
        t = time.perf_counter()
        rec.add(Stage.READ, t - 0.01, t, 0.001, items=8)
        rec.consumer_step(wait, None)
        for _ in range(10):
            rec.add(Stage.READ, t - 0.01, t, 0.001, items=8)
            rec.consumer_step(wait, 0.05)
        stats = LoaderStats.collect(rec, batch_size=8, num_threads=2)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(stats.to_dict() | {"summary": stats.summary(details=True)}, f)
        # Leave together (tearing gloo down under a peer can abort it); a CPU all_reduce,
        # not barrier(), which may touch CUDA in these forked children when it is present.
        dist.all_reduce(torch.zeros(1))
    finally:
        dist.destroy_process_group()


def test_distributed_gathers_ranks_and_names_the_straggler(tmp_path) -> None:
    import torch.multiprocessing as mp

    init_file = str(tmp_path / "init")
    mp.start_processes(
        _rank_main, args=(2, init_file, str(tmp_path)), nprocs=2, start_method="spawn"
    )
    for rank in (0, 1):
        d = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert d["rank"] == rank and d["world_size"] == 2
        assert [r["rank"] for r in d["ranks"]] == [0, 1]
        assert d["ranks"][1]["stall_fraction"] == pytest.approx(0.8)
        assert d["ranks"][0]["stall_fraction"] == pytest.approx(0.02)
        assert d["ranks"][1]["bound"] == "input-bound"
        assert d["ranks"][0]["bound"] == "compute-bound"
        assert d["slowest_rank"] == 1
        assert d["stragglers"] == [1]
        assert "slowest is rank 1" in d["summary"]
    assert math.isclose(
        json.loads((tmp_path / "rank0.json").read_text())["ranks"][1]["wait_per_step_s"], 0.04
    )


def test_stragglers_are_measured_against_the_median() -> None:
    def rank(r: int, wait: float) -> RankSummary:
        return RankSummary(r, wait / 0.1, wait, 0.1, 100.0, "input-bound", "io")

    assert stragglers([]) == (None, [])
    ranks = [rank(0, 0.010), rank(1, 0.011), rank(2, 0.012), rank(3, 0.050)]
    # median 11.5 ms; margin max(5.75 ms, 5 ms): only rank 3 is a straggler.
    assert stragglers(ranks) == (3, [3])
    even = [rank(0, 0.010), rank(1, 0.012)]
    assert stragglers(even) == (1, [])
