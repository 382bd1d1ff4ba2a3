"""fastfeed.DataLoader (thread workers) against torch.utils.data.DataLoader: same batches,
len(), errors, RNG stream; plus the thread-specific lifecycle (persistent, supersede, GC)."""

from __future__ import annotations

import gc
import math
import pickle
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.utils.data as tud
from torch.utils.data import DistributedSampler, IterableDataset, TensorDataset

import fastfeed.dataloader as compat
from fastfeed.dataloader import DataLoader as _DataLoader
from fastfeed.errors import ConfigError, FastFeedError, LoaderTimeoutError


def DataLoader(*args: Any, **kwargs: Any) -> _DataLoader[Any]:
    """The thread engine under test (``worker_type="auto"`` is covered elsewhere)."""
    kwargs.setdefault("worker_type", "thread")
    return _DataLoader(*args, **kwargs)


N = 50  # samples per dataset: enough for partial batches at every batch size

# -- datasets --------------------------------------------------------------------------


class NestedDataset(tud.Dataset):
    """Samples are nested dicts/tuples of tensors, ints, floats and strings."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "x": torch.full((2, 3), float(i)),
            "pair": (i, torch.tensor([i, -i])),
            "meta": {"name": f"s{i}", "w": i / 10},
        }


class GetitemsDataset(tud.Dataset):
    """Has __getitems__ (as torch's Subset does); records that it was used."""

    def __init__(self) -> None:
        self.calls = 0

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        raise AssertionError("__getitems__ must be used for batches")

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        self.calls += 1
        return [(torch.tensor([i, i * i]), i % 7) for i in indices]


class RangeIterable(IterableDataset):
    """Yields N samples; never shards itself."""

    def __init__(self, n: int = N, with_len: bool = True) -> None:
        self.n = n
        self.with_len = with_len

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        for i in range(self.n):
            yield torch.tensor([float(i)]), i

    def __len__(self) -> int:
        if not self.with_len:
            raise TypeError("RangeIterable has no len()")
        return self.n


class ShardingIterable(IterableDataset):
    """Shards itself by get_worker_info(), as torch's documentation shows."""

    def __iter__(self) -> Iterator[int]:
        info = tud.get_worker_info()
        start, step = (0, 1) if info is None else (info.id, info.num_workers)
        return iter(range(start, N, step))


def make_dataset(kind: str) -> Any:
    if kind == "tensor":
        return TensorDataset(torch.arange(N * 2, dtype=torch.float32).view(N, 2), torch.arange(N))
    if kind == "nested":
        return NestedDataset()
    if kind == "getitems":
        return GetitemsDataset()
    if kind == "iterable":
        return RangeIterable()
    if kind == "sharding":
        return ShardingIterable()
    raise AssertionError(kind)


class EveryThirdReversed(tud.Sampler[int]):
    """A custom sampler: every third index, backwards."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.n - 1, -1, -3))

    def __len__(self) -> int:
        return len(range(self.n - 1, -1, -3))


class GrowingBatches(tud.Sampler[list[int]]):
    """A custom batch sampler: batches of 1, 2, 3, ... indices."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Iterator[list[int]]:
        start, size = 0, 1
        while start < self.n:
            yield list(range(start, min(start + size, self.n)))
            start += size
            size += 1

    def __len__(self) -> int:
        return sum(1 for _ in self)


# -- comparing --------------------------------------------------------------------------


def assert_same(a: Any, b: Any, path: str = "batch") -> None:
    """Recursive equality: tensors by dtype/shape/values, containers by type and content."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a!r} != {b!r}"
        assert torch.equal(a, b), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: len {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def assert_same_epochs(ours: list[Any], theirs: list[Any]) -> None:
    assert len(ours) == len(theirs), f"{len(ours)} batches != torch's {len(theirs)}"
    for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert_same(a, b, f"batch {k}")


def fastfeed_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fastfeed-dataloader-")]


# -- the parity matrix ------------------------------------------------------------------

MAP_KINDS = ["tensor", "nested", "getitems"]
SAMPLERS = ["default", "shuffle", "custom", "distributed"]
BATCH_SIZES = [1, 3, 64]
WORKERS = [0, 2, 8]


def _matrix() -> list[Any]:
    cases = []
    for kind in MAP_KINDS:
        for sampler in SAMPLERS:
            for bs in BATCH_SIZES:
                for drop_last in (False, True):
                    for nw in WORKERS:
                        cases.append((kind, sampler, bs, drop_last, nw))
        for nw in WORKERS:  # a custom batch_sampler fixes batch size and drop_last
            cases.append((kind, "batch_sampler", None, False, nw))
    for kind in ("iterable", "sharding"):  # compared with torch's worker processes
        for bs in BATCH_SIZES:
            for drop_last in (False, True):
                for nw in (0, 2):
                    cases.append((kind, "default", bs, drop_last, nw))
    return [pytest.param(*c, id="-".join(map(str, c))) for c in cases]


def _loader_kwargs(kind: str, sampler: str, bs: int | None, drop_last: bool) -> dict[str, Any]:
    """Fresh, identically seeded arguments (samplers and generators hold state)."""
    ds = make_dataset(kind)
    kw: dict[str, Any] = {"dataset": ds}
    if sampler == "batch_sampler":
        kw["batch_sampler"] = GrowingBatches(N)
        return kw
    kw.update(batch_size=bs, drop_last=drop_last)
    if sampler == "shuffle":
        kw.update(shuffle=True, generator=torch.Generator().manual_seed(1234))
    elif sampler == "custom":
        kw["sampler"] = EveryThirdReversed(N)
    elif sampler == "distributed":
        kw["sampler"] = DistributedSampler(ds, num_replicas=3, rank=1, shuffle=True, seed=7)
    return kw


def _epochs(loader: Any, n: int = 2) -> list[list[Any]]:
    out = []
    for epoch in range(n):
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        out.append(list(loader))
    return out


@pytest.mark.parametrize(("kind", "sampler", "bs", "drop_last", "nw"), _matrix())
def test_same_batches_as_torch(
    kind: str, sampler: str, bs: int | None, drop_last: bool, nw: int
) -> None:
    # Map-style batches do not depend on num_workers; an IterableDataset's do (one
    # iterator per worker), so those are compared with torch's worker processes.
    torch_nw = nw if kind in ("iterable", "sharding") else 0
    theirs_loader = tud.DataLoader(
        **_loader_kwargs(kind, sampler, bs, drop_last), num_workers=torch_nw
    )
    ours_loader = DataLoader(**_loader_kwargs(kind, sampler, bs, drop_last), num_workers=nw)
    theirs = _epochs(theirs_loader)
    ours = _epochs(ours_loader)
    for epoch in range(2):
        assert_same_epochs(ours[epoch], theirs[epoch])
    if kind != "sharding" and not (kind == "iterable" and nw > 0):
        assert len(ours_loader) == len(theirs_loader) == len(ours[0])
    if kind == "getitems":
        assert ours_loader.dataset.calls == 2 * len(ours[0])
    if sampler == "shuffle":  # both generators advanced identically (base seeds included)
        assert torch.equal(ours_loader.generator.get_state(), theirs_loader.generator.get_state())
    if sampler == "distributed" and ours[0]:  # set_epoch reshuffled the second epoch
        with pytest.raises(AssertionError):
            assert_same_epochs(ours[0], ours[1])


def test_global_rng_stream_matches_torch_without_generator() -> None:
    """shuffle=True, generator=None: torch draws seeds from the global RNG; so do we."""

    def run(cls: type, **kw: Any) -> tuple[list[Any], torch.Tensor]:
        torch.manual_seed(99)
        loader = cls(make_dataset("tensor"), batch_size=4, shuffle=True, **kw)
        epochs = [list(loader) for _ in range(2)]
        return epochs, torch.rand(3)

    theirs, after_theirs = run(tud.DataLoader)
    ours, after_ours = run(DataLoader, num_workers=3)
    for epoch in range(2):
        assert_same_epochs(ours[epoch], theirs[epoch])
    assert torch.equal(after_ours, after_theirs)


def test_persistent_workers_draw_one_base_seed_like_torch() -> None:
    """torch's persistent iterator draws the base seed once; epochs 2+ only reshuffle."""
    g_ours = torch.Generator().manual_seed(5)
    g_ref = torch.Generator().manual_seed(5)
    ours = DataLoader(
        make_dataset("tensor"),
        batch_size=8,
        shuffle=True,
        generator=g_ours,
        num_workers=2,
        persistent_workers=True,
        worker_type="thread",  # auto would start processes for persistent workers
    )
    # Reference: what torch's persistent iterator does to the generator, replayed by hand
    # (one base-seed draw, then one randperm per epoch) without starting processes.
    ref = tud.RandomSampler(make_dataset("tensor"), generator=g_ref)
    expected = []
    it = iter(ref)
    torch.empty((), dtype=torch.int64).random_(generator=g_ref)
    for epoch in range(3):
        if epoch:
            it = iter(ref)
        expected.append(list(it))
    got = [torch.cat([b[1] for b in ours]).tolist() for _ in range(3)]
    assert got == expected
    ours.close()


class EagerRandomBatches(tud.Sampler[list[int]]):
    """Draws its permutation inside __iter__ itself (not lazily) from a shared generator."""

    def __init__(self, g: torch.Generator) -> None:
        self.g = g

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(N, generator=self.g).tolist()
        return iter([order[i : i + 6] for i in range(0, N, 6)])

    def __len__(self) -> int:
        return math.ceil(N / 6)


@pytest.mark.parametrize("nw", [0, 3])
def test_eager_sampler_and_base_seed_draw_in_torchs_order(nw: int) -> None:
    """torch calls iter(batch_sampler) before drawing the base seed from the same generator."""

    def run(cls: type, **kw: Any) -> list[list[int]]:
        g = torch.Generator().manual_seed(8)
        loader = cls(make_dataset("tensor"), batch_sampler=EagerRandomBatches(g), generator=g, **kw)
        return [[b[1].tolist() for b in loader] for _ in range(2)]

    assert run(DataLoader, num_workers=nw) == run(tud.DataLoader)


def test_in_order_false_yields_every_batch_once() -> None:
    kw = _loader_kwargs("tensor", "shuffle", 3, False)
    theirs = list(tud.DataLoader(**kw))
    ours = list(
        DataLoader(**_loader_kwargs("tensor", "shuffle", 3, False), num_workers=4, in_order=False)
    )
    key = lambda b: tuple(b[1].tolist())  # noqa: E731
    assert sorted(map(key, ours)) == sorted(map(key, theirs))


# -- len() ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"batch_size": 3}, math.ceil(N / 3)),
        ({"batch_size": 3, "drop_last": True}, N // 3),
        ({"batch_size": None}, N),
        ({"batch_sampler": GrowingBatches(N)}, 10),
        ({"batch_size": 4, "sampler": EveryThirdReversed(N)}, math.ceil(17 / 4)),
    ],
)
def test_len_matches_torch_map_style(kw: dict[str, Any], expected: int) -> None:
    ds = make_dataset("tensor")
    assert len(DataLoader(ds, **kw)) == len(tud.DataLoader(ds, **kw)) == expected


@pytest.mark.parametrize(("bs", "drop_last"), [(3, False), (3, True), (None, False)])
def test_len_matches_torch_iterable(bs: int | None, drop_last: bool) -> None:
    ds = RangeIterable()
    assert len(DataLoader(ds, batch_size=bs, drop_last=drop_last, num_workers=2)) == len(
        tud.DataLoader(ds, batch_size=bs, drop_last=drop_last)
    )
    no_len = RangeIterable(with_len=False)
    with pytest.raises(TypeError, match="no len"):
        len(DataLoader(no_len, batch_size=bs, drop_last=drop_last))


def test_iterable_longer_than_reported_len_warns_like_torch() -> None:
    class Liar(RangeIterable):
        def __len__(self) -> int:
            return 3

    messages = {}
    for cls in (tud.DataLoader, DataLoader):
        loader = cls(Liar(n=5), batch_size=1)
        assert len(loader) == 3
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batches = list(loader)
        assert len(batches) == 5
        messages[cls] = [str(w.message).split(" was reported")[1] for w in caught]
    assert messages[DataLoader] == messages[tud.DataLoader]
    assert len(messages[DataLoader]) == 2  # after samples 4 and 5
    assert "to be 3(when accessing len(dataloader)), but 4 samples" in messages[DataLoader][0]


# -- argument validation -----------------------------------------------------------------

_SEQ = tud.SequentialSampler(range(N))


@pytest.mark.parametrize(
    ("kw", "names"),
    [
        ({"batch_sampler": GrowingBatches(N), "batch_size": 2}, "batch_size"),
        ({"batch_sampler": GrowingBatches(N), "shuffle": True}, "shuffle"),
        ({"batch_sampler": GrowingBatches(N), "sampler": _SEQ}, "sampler"),
        ({"batch_sampler": GrowingBatches(N), "drop_last": True}, "drop_last"),
        ({"sampler": _SEQ, "shuffle": True}, "shuffle"),
        ({"batch_size": None, "drop_last": True}, "drop_last"),
        ({"num_workers": -1}, "num_workers"),
        ({"timeout": -1}, "timeout"),
        ({"prefetch_factor": 2}, "prefetch_factor"),
        ({"persistent_workers": True}, "persistent_workers"),
        ({"num_workers": 2, "prefetch_factor": -1}, "prefetch_factor"),
        ({"multiprocessing_context": "spawn"}, "multiprocessing_context"),
        ({"dataset": RangeIterable(), "shuffle": True}, "shuffle"),
        ({"dataset": RangeIterable(), "sampler": _SEQ}, "sampler"),
        ({"dataset": RangeIterable(), "batch_sampler": GrowingBatches(N)}, "batch_sampler"),
    ],
)
def test_invalid_arguments_raise_torchs_errors(kw: dict[str, Any], names: str) -> None:
    kw = {"dataset": make_dataset("tensor"), **kw}
    with pytest.raises(Exception) as theirs:
        tud.DataLoader(**kw)
    with pytest.raises(Exception) as ours:
        DataLoader(**kw)
    assert type(ours.value) is type(theirs.value)
    assert str(ours.value) == str(theirs.value)
    assert names.split("_")[0] in str(ours.value)


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        ({"worker_type": "greenlet"}, "worker_type"),
        ({"num_workers": 2, "multiprocessing_context": "spawn"}, "multiprocessing_context"),
        ({"timeout": 1.0}, "timeout"),
        ({"num_workers": 2, "prefetch_factor": 0}, "prefetch_factor"),
        ({"device": "no-such-device"}, "device"),
    ],
)
def test_what_threads_cannot_honour_is_a_config_error(kw: dict[str, Any], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        DataLoader(make_dataset("tensor"), **kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_device_cuda_without_cuda_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"device='cuda'.*CUDA is not available"):
        DataLoader(make_dataset("tensor"), device="cuda")


def test_attributes_match_torch() -> None:
    ds = make_dataset("tensor")
    init = lambda wid: None  # noqa: E731
    g = torch.Generator()
    kw = dict(
        batch_size=5,
        shuffle=True,
        num_workers=2,
        drop_last=True,
        timeout=2.5,
        worker_init_fn=init,
        generator=g,
        persistent_workers=True,
        in_order=False,
    )
    ours, theirs = DataLoader(ds, **kw), tud.DataLoader(ds, **kw)
    assert isinstance(ours, tud.DataLoader)
    for name in (
        "dataset",
        "batch_size",
        "num_workers",
        "collate_fn",
        "pin_memory",
        "drop_last",
        "timeout",
        "worker_init_fn",
        "generator",
        "prefetch_factor",
        "persistent_workers",
        "in_order",
        "pin_memory_device",
        "multiprocessing_context",
    ):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert type(ours.sampler) is type(theirs.sampler) is tud.RandomSampler
    assert type(ours.batch_sampler) is type(theirs.batch_sampler) is tud.BatchSampler
    assert ours.batch_sampler.batch_size == 5 and ours.batch_sampler.drop_last
    assert ours.worker_type == "thread" and ours.device is None
    with pytest.raises(ValueError, match="batch_size attribute should not be set"):
        ours.batch_size = 7
    assert DataLoader(ds, batch_size=None).collate_fn is tud.default_convert


# -- collate, no auto-batching, worker_init_fn --------------------------------------------


@pytest.mark.parametrize("nw", [0, 3])
def test_custom_collate_fn(nw: int) -> None:
    def collate(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
        return {"sum": sum(int(x.sum()) for x, _ in samples), "ys": [int(y) for _, y in samples]}

    ds = make_dataset("tensor")
    ours = list(DataLoader(ds, batch_size=4, collate_fn=collate, num_workers=nw))
    theirs = list(tud.DataLoader(ds, batch_size=4, collate_fn=collate))
    assert ours == theirs
    assert ours[0] == {"sum": sum(range(8)), "ys": [0, 1, 2, 3]}


class NumpyDataset(tud.Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"a": np.arange(3) * i, "i": i}


@pytest.mark.parametrize("nw", [0, 2])
def test_batch_size_none_converts_without_batching(nw: int) -> None:
    ours = list(DataLoader(NumpyDataset(), batch_size=None, num_workers=nw))
    theirs = list(tud.DataLoader(NumpyDataset(), batch_size=None))
    assert_same_epochs(ours, theirs)
    assert isinstance(ours[2]["a"], torch.Tensor) and ours[2]["a"].tolist() == [0, 2, 4]
    assert ours[2]["i"] == 2


class WorkerProbe(tud.Dataset):
    """Records, per index, the thread and compat.get_worker_info() that served it."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[str, Any, Any]] = {}

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> int:
        self.seen[i] = (
            threading.current_thread().name,
            compat.get_worker_info(),
            tud.get_worker_info(),
        )
        return i


def test_worker_init_fn_once_per_thread_and_worker_info() -> None:
    calls: list[tuple[int, str]] = []
    lock = threading.Lock()

    def init(worker_id: int) -> None:
        with lock:
            calls.append((worker_id, threading.current_thread().name))

    ds = WorkerProbe()
    g = torch.Generator().manual_seed(3)
    loader = DataLoader(ds, batch_size=2, num_workers=4, worker_init_fn=init, generator=g)
    expected_seed = int(
        torch.empty((), dtype=torch.int64).random_(generator=torch.Generator().manual_seed(3))
    )
    assert torch.cat(list(loader)).tolist() == list(range(40))
    assert sorted(wid for wid, _ in calls) == [0, 1, 2, 3]
    assert len({name for _, name in calls}) == 4
    assert all(name.startswith("fastfeed-dataloader-") for _, name in calls)
    id_of_thread = {name: wid for wid, name in calls}
    for thread_name, info, torch_info in ds.seen.values():
        assert torch_info is info  # torch's get_worker_info() answers per thread
        assert info.worker_method == "thread" and info.num_workers == 4
        assert info.id == id_of_thread[thread_name]
        assert info.seed == expected_seed + info.id
        assert info.dataset is ds
    assert compat.get_worker_info() is None  # main thread
    assert tud.get_worker_info() is None


def test_worker_init_fn_not_called_without_workers() -> None:
    calls: list[int] = []
    list(DataLoader(make_dataset("tensor"), worker_init_fn=calls.append))
    assert calls == []


def test_iterable_gets_one_iterator_per_worker_thread_like_torch() -> None:
    """Like torch's worker processes: each worker iterates its own iter(dataset), so a
    dataset that does not shard itself is repeated once per worker."""
    calls: list[int] = []
    threads: set[str] = set()

    class Probe(RangeIterable):
        def __iter__(self) -> Iterator[Any]:
            for item in super().__iter__():
                threads.add(threading.current_thread().name)
                yield item

    kw: dict[str, Any] = {"batch_size": 4, "num_workers": 3}
    ours = list(DataLoader(Probe(), worker_init_fn=calls.append, **kw))
    theirs = list(tud.DataLoader(RangeIterable(), **kw))
    assert_same_epochs(ours, theirs)
    assert sorted(torch.cat([b[1] for b in ours]).tolist()) == sorted(list(range(N)) * 3)
    assert sorted(calls) == [0, 1, 2]
    assert all(t.startswith("fastfeed-dataloader-") for t in threads)


# -- errors -----------------------------------------------------------------------------


class FailingDataset(tud.Dataset):
    def __init__(self, bad: int, exc: Exception) -> None:
        self.bad = bad
        self.exc = exc

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == self.bad:
            raise self.exc
        return torch.tensor(i)


@pytest.mark.parametrize("nw", [0, 2])
def test_getitem_error_is_the_original_exception_with_a_note(nw: int) -> None:
    cause = KeyError("missing-key")
    loader = DataLoader(FailingDataset(7, cause), batch_size=3, num_workers=nw)
    it = iter(loader)
    assert next(it).tolist() == [0, 1, 2]
    assert next(it).tolist() == [3, 4, 5]
    with pytest.raises(KeyError) as info:  # `except KeyError` works, as with torch
        next(it)
    err = info.value
    assert err is cause and err.args == ("missing-key",)
    who = "the calling thread" if nw == 0 else "DataLoader thread worker"
    assert err.__notes__[-1].startswith(
        f"fastfeed: sample 7 (FailingDataset[7]) failed in stage 'read' ({who}"
    )
    # The iterator stays usable, as torch's does after a worker exception.
    assert next(it).tolist() == [9, 10, 11]
    with pytest.raises(StopIteration):
        next(it)


def test_error_keeps_its_attributes_and_pickles() -> None:
    cause = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
    loader = DataLoader(FailingDataset(1, cause), batch_size=2, num_workers=2)
    with pytest.raises(UnicodeDecodeError) as info:
        list(loader)
    loader.close()  # the traceback keeps the abandoned iterator alive
    err = info.value
    assert err is cause and err.reason == "invalid start byte" and err.object == b"\xff"
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is UnicodeDecodeError and back.reason == "invalid start byte"
    assert back.__notes__ == err.__notes__


def test_collate_error_names_the_batch_and_stage() -> None:
    def bad_collate(samples: list[Any]) -> Any:
        raise TypeError("cannot collate")

    loader = DataLoader(make_dataset("tensor"), batch_size=4, collate_fn=bad_collate, num_workers=2)
    with pytest.raises(TypeError, match="cannot collate") as info:
        next(iter(loader))
    loader.close()
    assert "batch [0, 1, 2, 3] failed in stage 'collate'" in info.value.__notes__[-1]


def test_getitems_error_names_the_batch() -> None:
    class Bad(GetitemsDataset):
        def __getitems__(self, indices: list[int]) -> list[Any]:
            if 4 in indices:
                raise IndexError("shard gone")
            return super().__getitems__(indices)

    loader = DataLoader(Bad(), batch_size=3, num_workers=2)
    with pytest.raises(IndexError, match="shard gone") as info:
        list(loader)
    loader.close()
    assert "Bad.__getitems__([3, 4, 5]) failed in stage 'read'" in info.value.__notes__[-1]


def test_iterable_error_names_the_sample_position() -> None:
    class Bad(RangeIterable):
        def __iter__(self) -> Iterator[Any]:
            for i, item in enumerate(super().__iter__()):
                if i == 5:
                    raise ValueError("corrupt record")
                yield item

    loader = DataLoader(Bad(), batch_size=2, num_workers=0)
    it = iter(loader)
    assert [next(it)[1].tolist() for _ in range(2)] == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="corrupt record") as info:
        next(it)
    assert "sample 5 (Bad iterator of worker 0, sample 5)" in info.value.__notes__[-1]
    with pytest.raises(StopIteration):  # the generator is finished, as with torch
        next(it)


class BlockingDataset(tud.Dataset):
    def __init__(self) -> None:
        self.release = threading.Event()

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> int:
        if i == 0:
            self.release.wait(10)
        return i


def test_timeout_raises_loader_timeout_error_that_is_also_runtime_error() -> None:
    ds = BlockingDataset()
    loader = DataLoader(ds, batch_size=2, num_workers=2, timeout=0.2)
    it = iter(loader)
    try:
        with pytest.raises(LoaderTimeoutError) as info:
            next(it)
        err = info.value
        assert isinstance(err, LoaderTimeoutError) and isinstance(err, RuntimeError)
        assert str(err).startswith("DataLoader timed out after 0.2 seconds")
        assert 0 in err.in_flight and 1 in err.in_flight
        assert "batch [0, 1]" in str(err)
    finally:
        ds.release.set()
    assert next(it).tolist() == [0, 1]  # the batch arrives once the read returns
    loader.close()


# -- lifecycle ----------------------------------------------------------------------------


class ThreadRecorder(tud.Dataset):
    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> int:
        self.threads.append(threading.current_thread())
        return i


def test_persistent_workers_reuse_threads_and_stop_on_del() -> None:
    calls: list[int] = []
    ds = ThreadRecorder()
    loader = DataLoader(
        ds, batch_size=2, num_workers=3, persistent_workers=True, worker_init_fn=calls.append
    )
    first = [b.tolist() for b in loader]
    pool_threads = set(fastfeed_threads())
    seen_first = set(ds.threads)
    ds.threads.clear()
    second = [b.tolist() for b in loader]
    assert first == second == [[i, i + 1] for i in range(0, 24, 2)]
    assert sorted(calls) == [0, 1, 2]  # no new threads for the second epoch
    assert len(pool_threads) == 3 and seen_first | set(ds.threads) <= pool_threads
    assert all(t.is_alive() for t in pool_threads)
    del loader
    gc.collect()
    for t in pool_threads:
        t.join(2.0)
    assert not any(t.is_alive() for t in pool_threads)


def test_persistent_epoch_abandoned_midway_restarts_cleanly() -> None:
    ds = make_dataset("tensor")
    loader = DataLoader(
        ds, batch_size=5, num_workers=2, persistent_workers=True, worker_type="thread"
    )
    it = iter(loader)
    next(it)
    next(it)
    batches = list(loader)  # a new epoch while the old one is still live
    assert torch.cat([b[1] for b in batches]).tolist() == list(range(N))
    # The old epoch is not cut short: it goes on where it was (its own pool).
    rest = [b[1].tolist() for b in it]
    assert torch.tensor(rest).flatten().tolist() == list(range(10, N))
    del it
    gc.collect()
    again = list(loader)  # the persistent pool is free again
    assert torch.cat([b[1] for b in again]).tolist() == list(range(N))
    loader.close()


def test_non_persistent_threads_stop_at_epoch_end_and_differ_per_epoch() -> None:
    ds = ThreadRecorder()
    loader = DataLoader(ds, batch_size=4, num_workers=2)
    list(loader)
    first = set(ds.threads)
    assert fastfeed_threads() == []  # joined when the epoch ended
    ds.threads.clear()
    list(loader)
    assert first.isdisjoint(ds.threads)


@pytest.mark.parametrize("persistent", [False, True])
def test_several_live_iterators_like_torch(persistent: bool) -> None:
    kw: dict[str, Any] = {"batch_size": 10, "num_workers": 2, "persistent_workers": persistent}
    loader = DataLoader(make_dataset("tensor"), **kw)
    theirs = tud.DataLoader(make_dataset("tensor"), **kw)
    pairs = [(a[1][0].item(), b[1][0].item()) for a, b in zip(loader, loader, strict=False)]
    if persistent:  # torch's persistent iterator is one object: zip takes turns
        assert [(a[1][0].item(), b[1][0].item()) for a, b in zip(theirs, theirs, strict=False)] == [
            (0, 10),
            (20, 30),
        ]
    else:
        assert [
            (a[1][0].item(), b[1][0].item()) for a, b in zip(theirs, theirs, strict=False)
        ] == pairs
    # fastfeed gives each live iterator its own epoch: nothing is lost or skipped.
    assert pairs == [(0, 0), (10, 10), (20, 20), (30, 30), (40, 40)]
    seen = []
    for batch in loader:
        peek = next(iter(loader))  # torch allows this: a second, independent epoch
        assert peek[1].tolist() == list(range(10))
        seen.append(batch[1][0].item())
    assert seen == [0, 10, 20, 30, 40]
    loader.close()


@pytest.mark.parametrize("persistent", [False, True])
def test_iterator_of_a_closed_loader_says_closed(persistent: bool) -> None:
    loader = DataLoader(
        make_dataset("tensor"), batch_size=10, num_workers=2, persistent_workers=persistent
    )
    it = iter(loader)
    assert next(it)[1].tolist() == list(range(10))
    loader.close()
    with pytest.raises(FastFeedError, match=r"this DataLoader was closed") as info:
        next(it)
    assert not isinstance(info.value, ConfigError)  # nothing superseded it
    assert fastfeed_threads() == []
    # The loader itself still works: a new epoch starts new threads.
    assert [b[1].tolist()[0] for b in loader] == [0, 10, 20, 30, 40]
    loader.close()


class CountingBatchSampler:
    """Batches of ``size`` consecutive indices; counts the batches drawn from it."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size
        self.drawn = 0

    def __len__(self) -> int:
        return -(-self.n // self.size)

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, self.n, self.size):
            self.drawn += 1
            yield list(range(start, min(start + self.size, self.n)))


@pytest.mark.parametrize(("nw", "pf"), [(2, 2), (3, 1), (0, None)])
def test_index_queue_is_refilled_as_each_batch_is_handed_over(nw: int, pf: int | None) -> None:
    # torch's rule: prefetch_factor * num_workers batches outstanding after each next()
    # (refilled in _next_data as the batch is handed over); num_workers=0 draws in next().
    sampler = CountingBatchSampler(N, 2)  # 25 batches
    loader = DataLoader(
        make_dataset("tensor"), batch_sampler=sampler, num_workers=nw, prefetch_factor=pf
    )
    ahead = pf * nw if nw else 0
    it = iter(loader)
    assert sampler.drawn == ahead
    for k in range(1, 6):
        assert next(it)[1].tolist() == [2 * k - 2, 2 * k - 1]
        assert sampler.drawn == ahead + k
    assert len(list(it)) == 20 and sampler.drawn == 25
    loader.close()


class FailsAt(tud.Dataset):
    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> int:
        if i == 4:
            raise ValueError("bad sample 4")
        return i


def test_index_queue_is_refilled_before_a_failure_is_raised() -> None:
    sampler = CountingBatchSampler(N, 2)
    loader = DataLoader(FailsAt(), batch_sampler=sampler, num_workers=2, prefetch_factor=2)
    it = iter(loader)
    assert next(it).tolist() == [0, 1] and next(it).tolist() == [2, 3]
    with pytest.raises(ValueError, match="bad sample 4"):
        next(it)
    assert sampler.drawn == 4 + 3  # like torch: _try_put_index, then reraise
    loader.close()


def test_breaking_out_of_the_loop_stops_threads() -> None:
    loader = DataLoader(make_dataset("tensor"), batch_size=2, num_workers=4)
    for k, _ in enumerate(loader):
        if k == 1:
            break
    gc.collect()
    deadline = time.monotonic() + 2
    while fastfeed_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fastfeed_threads() == []


def test_recorder_counts_read_and_collate_per_batch() -> None:
    loader = DataLoader(make_dataset("tensor"), batch_size=8, num_workers=2)
    list(loader)
    snap = loader.recorder.snapshot()
    assert snap["stages"]["read"]["count"] == 7 and snap["stages"]["read"]["items"] == N
    assert snap["stages"]["collate"]["count"] == 7
    assert "batches" in snap["queues"]
    quiet = DataLoader(make_dataset("tensor"), batch_size=8, num_workers=2, profile=False)
    list(quiet)
    assert quiet.recorder.snapshot()["stages"] == {}


class _FailsAt(tud.Dataset[Any]):
    """Sample ``bad`` raises in __getitem__; ``ragged`` gives sample 9 another shape."""

    def __init__(self, bad: int | None = None, ragged: bool = False) -> None:
        self.bad, self.ragged = bad, ragged

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == self.bad:
            raise KeyError(i)
        return torch.zeros(3 if self.ragged and i == 9 else 2)


@pytest.mark.parametrize("workers", [0, 2])
def test_recorder_counts_failed_read_and_collate_spans(workers: int) -> None:
    loader = DataLoader(_FailsAt(bad=5), batch_size=4, num_workers=workers)
    with pytest.raises(KeyError):
        list(loader)
    loader.close()  # the workers finish or drop what they were running
    # Inline, the epoch stops at the failing batch (the second). Two workers had all four
    # batches queued (prefetch_factor 2 x 2 workers): the two after the failure may or may
    # not have run by the time the loop stopped (3 of 6 runs on a loaded machine: 3).
    stages = loader.recorder.snapshot()["stages"]
    read, collate = stages["read"], stages["collate"]
    assert read["failures"] == 1 and collate["failures"] == 0
    assert read["count"] == 2 if workers == 0 else 2 <= read["count"] <= 4
    assert collate["count"] == read["count"] - 1  # every batch read whole was collated
    loader = DataLoader(_FailsAt(ragged=True), batch_size=4, num_workers=workers)
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        list(loader)
    loader.close()
    stages = loader.recorder.snapshot()["stages"]
    read, collate = stages["read"], stages["collate"]
    assert read["failures"] == 0 and collate["failures"] == 1
    assert read["count"] == 3 if workers == 0 else 3 <= read["count"] <= 4
    assert collate["count"] == read["count"]


def test_read_and_collate_show_as_torch_profiler_ranges() -> None:
    from torch.profiler import ProfilerActivity, profile

    loader = DataLoader(make_dataset("tensor"), batch_size=8)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        list(loader)
    keys = {e.key: e.count for e in prof.key_averages()}
    assert keys.get("fastfeed/read") == 7 and keys.get("fastfeed/collate") == 7
    assert loader.recorder.snapshot()["stages"]["read"]["count"] == 7


@pytest.mark.skipif(torch.accelerator.is_available(), reason="checks the no-accelerator path")
def test_pin_memory_without_accelerator_warns_once() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = DataLoader(make_dataset("tensor"), batch_size=8, num_workers=2, pin_memory=True)
        epochs = [list(loader) for _ in range(2)]
    pin_warnings = [w for w in caught if "pin_memory" in str(w.message)]
    assert len(pin_warnings) == 1
    assert "no accelerator" in str(pin_warnings[0].message)
    assert_same_epochs(epochs[1], list(tud.DataLoader(make_dataset("tensor"), batch_size=8)))


@pytest.mark.cuda
def test_pin_memory_and_device_with_cuda() -> None:
    loader = DataLoader(make_dataset("nested"), batch_size=8, num_workers=2, pin_memory=True)
    batch = next(iter(loader))
    assert batch["x"].is_pinned() and batch["pair"][1].is_pinned()
    on_gpu = DataLoader(
        make_dataset("nested"), batch_size=8, num_workers=2, pin_memory=True, device="cuda"
    )
    gbatch = next(iter(on_gpu))
    assert gbatch["x"].is_cuda and torch.equal(gbatch["x"].cpu(), batch["x"])


def test_device_cpu_yields_the_same_batches() -> None:
    ours = list(DataLoader(make_dataset("nested"), batch_size=8, num_workers=2, device="cpu"))
    assert_same_epochs(ours, list(tud.DataLoader(make_dataset("nested"), batch_size=8)))


def test_drop_in_training_loop_with_distributed_sampler() -> None:
    """User code unchanged but the import: set_epoch per epoch, two ranks cover all data."""
    ds = make_dataset("tensor")
    seen: list[list[int]] = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        loader = DataLoader(
            ds, batch_size=4, sampler=sampler, num_workers=2, pin_memory=False, drop_last=False
        )
        for epoch in range(2):
            sampler.set_epoch(epoch)
            labels = [int(y) for _, ys in loader for y in ys]
            if epoch == 1:
                seen.append(labels)
    assert sorted(seen[0] + seen[1]) == list(range(N))


def test_loader_pickles_without_its_running_state() -> None:
    loader = DataLoader(
        make_dataset("tensor"), batch_size=7, shuffle=True, num_workers=2,
        persistent_workers=True, generator=torch.Generator().manual_seed(4),
    )  # fmt: skip
    clone = pickle.loads(pickle.dumps(loader))  # generator state travels with it
    assert clone.batch_size == 7 and clone.worker_type == "thread"
    assert_same_epochs(list(clone), list(loader))
    assert loader._pool is not None  # a live persistent pool, which must not travel
    clone2 = pickle.loads(pickle.dumps(loader))
    assert clone2._pool is None and clone2.recorder.snapshot()["stages"] == {}
    assert len(list(clone2)) == 8
    assert clone.recorder.snapshot()["stages"]["read"]["count"] == 8
    for each in (clone, clone2, loader):
        each.close()


_EXIT_SCRIPT = """
import torch, torch.utils.data as tud
from fastfeed.dataloader import DataLoader

class Slow(tud.Dataset):
    def __len__(self): return 40
    def __getitem__(self, i):
        import time; time.sleep(0.01)
        return i

loader = DataLoader(
    Slow(), batch_size=2, num_workers=3, persistent_workers=True, worker_type="thread"
)
list(loader)
it = iter(loader)
next(it)  # workers busy with the epoch's next batches while the interpreter exits
print("exiting", flush=True)
"""


def test_interpreter_exits_with_persistent_workers_mid_epoch() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _EXIT_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "exiting"
    assert "Traceback" not in proc.stderr
