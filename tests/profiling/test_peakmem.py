"""PeakRSS: a process tree's peak memory, sampled from a child process."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from fastfeed._peakmem import PeakRSS
from fastfeed._procio import tree_pss_bytes

linux = pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
MB = 2**20


def _children() -> set[int]:
    me = os.getpid()
    out = set()
    for task in os.listdir(f"/proc/{me}/task"):
        with open(f"/proc/{me}/task/{task}/children") as f:
            out |= {int(p) for p in f.read().split()}
    return out


@linux
@pytest.mark.parametrize("measure", ["rss", "pss"])
def test_a_transient_peak_is_caught_from_a_child_process(measure: str) -> None:
    kwargs = {} if measure == "rss" else {"measure": tree_pss_bytes}
    before = _children()
    with PeakRSS(interval_s=0.005, **kwargs) as peak:
        assert peak.sampler == "process" and len(_children() - before) == 1
        assert "fastfeed-rss-0" not in [t.name for t in threading.enumerate()]
        block = np.ones(200 * MB // 8)  # written: resident
        time.sleep(0.3)
        del block
        time.sleep(0.1)
    assert peak.peak_bytes - peak.start_bytes >= 150 * MB
    assert _children() == before  # the sampler exited and was reaped


@linux
def test_the_sampler_leaves_itself_out_of_the_tree() -> None:
    # The child Python is ~15 MB resident; counted, it would show up as a rise.
    with PeakRSS(interval_s=0.005) as peak:
        time.sleep(0.3)
    assert peak.peak_bytes - peak.start_bytes < 8 * MB


def test_any_other_measure_is_sampled_by_a_thread() -> None:
    calls = []

    def measure(pid: int | None) -> int:
        calls.append(pid)
        return 1000 + len(calls)

    with PeakRSS(interval_s=0.01, measure=measure) as peak:
        assert peak.sampler == "thread"
        time.sleep(0.1)
    assert peak.start_bytes == 1001 and peak.peak_bytes == 1000 + len(calls)
    assert len(calls) >= 4 and set(calls) == {os.getpid()}
