"""The one assembly point: pinning, ring size, stager, slot release and loop timing."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch

import fastfeed as ff
from fastfeed.errors import ConfigError, SampleError
from fastfeed.pipeline.assemble import PipelineSpec, assemble, decide_pin, ring_slots
from fastfeed.pipeline.staging import COPIES_IN_FLIGHT
from fastfeed.profiling import Recorder
from fastfeed.testing import LedgerDecode, LedgerSource

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")


def test_pin_defaults_to_the_device_and_never_warns_when_not_asked():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decide_pin(None, None) is False
        assert decide_pin(None, torch.device("cpu")) is False
        assert decide_pin(False, torch.device("cpu")) is False


@no_cuda
def test_pin_requested_without_cuda_warns_once_per_loader_at_the_callers_line():
    for make in (
        lambda: ff.Loader(LedgerSource(8), LedgerDecode(), pin_memory=True, num_threads=1),
        lambda: ff.DataLoader(list(range(8)), batch_size=4, pin_memory=True),
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loader = make()
            for _ in range(2):
                list(loader)
        pins = [w for w in caught if "pin_memory" in str(w.message)]
        assert len(pins) == 1, [str(w.message) for w in pins]
        assert "no accelerator (CUDA) is available" in str(pins[0].message)
        assert pins[0].filename == __file__
        assert loader._pipeline.pinned is False


def test_ring_size_is_in_flight_plus_the_stagers_copies():
    assert ring_slots(6) == 6 + COPIES_IN_FLIGHT
    pipe = assemble(PipelineSpec(recorder=Recorder(), in_flight=3))
    assert pipe.slots == 3 + COPIES_IN_FLIGHT and pipe.collator.ring.slots == pipe.slots
    ld = ff.Loader(LedgerSource(8), LedgerDecode(), num_threads=2, prefetch=5)
    assert ld._pipeline.slots == 5 + COPIES_IN_FLIGHT
    dl = ff.DataLoader(list(range(8)), num_workers=2, prefetch_factor=3)
    assert dl._pipeline.slots == 6 + COPIES_IN_FLIGHT


def test_defaults_for_threads_processes_and_prefetch_come_from_one_place(monkeypatch):
    import fastfeed.pipeline.assemble as asm

    monkeypatch.setattr(asm, "usable_cores", lambda: 8)
    pipe = assemble(PipelineSpec(recorder=Recorder(), num_threads=None))
    assert (pipe.processes, pipe.num_threads, pipe.in_flight) == (0, 8, 16)
    pipe = assemble(PipelineSpec(recorder=Recorder(), num_threads=None, processes=2))
    assert (pipe.processes, pipe.num_threads, pipe.in_flight) == (2, 4, 16)
    assert pipe.describe_mode()["reason"] == "processes=2 given"


def test_validation_happens_at_construction():
    with pytest.raises(ConfigError, match="invalid device"):
        ff.Loader(LedgerSource(4), device="gpu0")
    with pytest.raises(ConfigError, match="mean and std together"):
        ff.Loader(LedgerSource(4), device="cpu", mean=(0.5,))
    with pytest.raises(ConfigError, match="processes"):
        ff.Loader(LedgerSource(4), processes=-1)
    with pytest.raises(ConfigError, match="start_method"):
        ff.Loader(LedgerSource(4), processes=1, start_method="thread")
    with pytest.raises(ConfigError, match="invalid device"):
        ff.DataLoader(list(range(4)), device="gpu0")


def test_the_tap_is_the_only_timer_and_releases_slots_without_a_stager():
    src = LedgerSource(64)
    with ff.Loader(src, LedgerDecode(), batch_size=8, num_threads=2) as ld:
        for _ in ld:
            pass
        snap = ld.recorder.snapshot()
        stats = ld._pipeline.ring_stats()
    assert snap["steps"] == 7 and snap["first_batches"] == 1  # 8 hand-overs, one timer
    assert stats["reuses"] > 0 and stats["retired"] == 0


def test_sample_error_reads_the_same_raised_and_after_pickling():
    err = SampleError(None, "batch 3 (indices [1, 2]; first at k1)", "collate", ValueError("x"))
    assert (
        str(err) == "batch 3 (indices [1, 2]; first at k1) failed in stage 'collate': ValueError: x"
    )
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.index is None and again.stage == "collate"
    one = SampleError(4, "a/b.jpg", "decode", OSError("bad"))
    assert (
        str(pickle.loads(pickle.dumps(one)))
        == str(one)
        == ("sample 4 (a/b.jpg) failed in stage 'decode': OSError: bad")
    )


def test_a_partial_batch_pickles_with_its_own_rows_only():
    src = LedgerSource(70)
    with ff.Loader(src, LedgerDecode(), batch_size=64, num_threads=1) as ld:
        full, last = list(ld)
    assert len(last.indices) == 6
    assert len(pickle.dumps(last)) < len(pickle.dumps(full)) / 2
    again = pickle.loads(pickle.dumps(last))
    assert again.indices == last.indices and torch.equal(again.data, last.data)
    assert again.data.untyped_storage().nbytes() == 6 * 2 * 8  # 6 rows of 2 int64


@pytest.mark.cuda
def test_dataloader_pin_and_cuda_device_reuses_ring_slots():
    """DataLoader(pin_memory=True, device='cuda') once gave the stager no collator, so every
    pinned slot was retired instead of reused."""
    data = [torch.full((3, 32, 32), float(i)) for i in range(256)]
    dl = ff.DataLoader(data, batch_size=16, num_workers=2, pin_memory=True, device="cuda")
    for _ in range(2):
        for k, x in enumerate(dl):
            assert x.is_cuda and x[0, 0, 0, 0].item() == 16 * k
    stats = dl._pipeline.ring_stats()
    assert stats["pinned"] and stats["reuses"] > 0 and stats["retired"] == 0


@pytest.mark.cuda
def test_processes_to_cuda_register_the_shared_ring_and_match_threads():
    src = LedgerSource(2000)
    kw = dict(batch_size=64, shuffle=True, seed=1)
    ref = [b.data.clone() for b in ff.Loader(src, LedgerDecode(), num_threads=2, **kw)]
    with ff.Loader(
        src, LedgerDecode(), num_threads=2, processes=2, device="cuda", start_method="spawn", **kw
    ) as ld:
        got = []
        for x, _y in ld:
            torch.cuda._sleep(1_000_000)  # a busy compute stream
            got.append(x)
        stats = ld._pipeline.ring_stats()
    torch.cuda.synchronize()
    assert len(got) == len(ref) and all(
        torch.equal(g.cpu(), r) for g, r in zip(got, ref, strict=True)
    )
    assert stats["pinned"] and stats["reuses"] > 0 and stats["retired"] == 0
