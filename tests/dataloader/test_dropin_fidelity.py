"""Drop-in fidelity of fastfeed.DataLoader, each behaviour compared with torch's DataLoader
in the same test: worker_type="auto", seeding recipes, the docs' IterableDataset examples,
exceptions, tuple subclasses, several iterators, fork, and mid-epoch resume."""

from __future__ import annotations

import errno
import gc
import json
import math
import os
import random
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.utils.data as tud

from fastfeed.dataloader import DataLoader

FORK = "fork" if "fork" in __import__("multiprocessing").get_all_start_methods() else None
needs_fork = pytest.mark.skipif(FORK is None, reason="needs the fork start method")


class Squares(tud.Dataset):
    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([i, i * i])


class NumpyAugment(tud.Dataset):
    """A random augmentation drawn from numpy's global RNG (the common pattern)."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> float:
        return float(np.random.rand())


def _values(loader: Any) -> list[float]:
    return [float(x) for b in loader for x in b]


# -- worker_type="auto" ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "expected", "reason"),
    [
        ({"num_workers": 0}, "thread", "num_workers=0"),
        ({"num_workers": 2}, "thread", "draws from no global RNG"),
        ({"num_workers": 2, "worker_init_fn": print}, "process", "worker_init_fn"),
        ({"num_workers": 2, "multiprocessing_context": "spawn"}, "process", "multiprocessing"),
        ({"num_workers": 2, "persistent_workers": True}, "process", "persistent_workers"),
        ({"num_workers": 0, "persistent_workers": False}, "thread", "num_workers=0"),
        (
            {"num_workers": 2, "persistent_workers": True, "worker_type": "thread"},
            "thread",
            "given",
        ),
        ({"num_workers": 2, "worker_type": "thread"}, "thread", "given"),
        ({"num_workers": 2, "worker_type": "process"}, "process", "given"),
    ],
)
def test_auto_rules_for_a_map_dataset(kw: dict[str, Any], expected: str, reason: str) -> None:
    loader = DataLoader(Squares(), batch_size=4, **kw)
    assert loader.worker_type == expected
    assert reason in loader.worker_type_reason


def test_auto_picks_processes_for_iterable_and_global_rng_datasets() -> None:
    class Stream(tud.IterableDataset):
        def __iter__(self) -> Iterator[int]:
            return iter(range(4))

    it_loader = DataLoader(Stream(), num_workers=2)
    assert it_loader.worker_type == "process" and "IterableDataset" in it_loader.worker_type_reason
    before = np.random.get_state()[1].copy()
    rng = DataLoader(NumpyAugment(), num_workers=2)
    assert rng.worker_type == "process" and "global RNG" in rng.worker_type_reason
    assert np.array_equal(np.random.get_state()[1], before)  # the probe restored numpy's RNG
    assert DataLoader(NumpyAugment(), num_workers=0).worker_type == "thread"


class PerWorkerAugment(tud.Dataset):
    """Draws from a generator per worker, seeded from get_worker_info() (no global RNG)."""

    def __init__(self) -> None:
        self.rngs: dict[Any, np.random.Generator] = {}

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> float:
        info = tud.get_worker_info()
        key = None if info is None else info.id
        if key not in self.rngs:
            self.rngs[key] = np.random.default_rng(0 if info is None else info.seed)
        if i % 3 == 0:
            time.sleep(0.002)  # uneven reads: threads would take batches out of rotation
        return float(self.rngs[key].random())


def test_auto_picks_processes_for_a_dataset_that_asks_get_worker_info() -> None:
    kw: dict[str, Any] = {"batch_size": 2, "num_workers": 2}
    loader = DataLoader(PerWorkerAugment(), generator=torch.Generator().manual_seed(0), **kw)
    assert loader.worker_type == "process"
    assert "get_worker_info()" in loader.worker_type_reason
    theirs = tud.DataLoader(PerWorkerAugment(), generator=torch.Generator().manual_seed(0), **kw)
    assert _values(loader) == _values(theirs)  # torch's rotation of batches over workers
    loader.close()
    assert DataLoader(Squares(), **kw).worker_type == "thread"  # no call: threads stay


def test_auto_probe_failure_picks_processes() -> None:
    class Keyed(tud.Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, key: str) -> int:
            return {"a": 1, "b": 2}[key]

    loader = DataLoader(Keyed(), sampler=["a", "b"], num_workers=2)
    assert loader.worker_type == "process" and "probe" in loader.worker_type_reason


# -- seeding recipes ---------------------------------------------------------------------


def _seed_numpy_from_torch(worker_id: int) -> None:
    # PyTorch's reproducibility notes; Lightning's seed_everything(workers=True) does the same.
    np.random.seed(torch.initial_seed() % 2**32)
    random.seed(torch.initial_seed())


@needs_fork
@pytest.mark.parametrize("cls", [tud.DataLoader, DataLoader])
def test_reproducibility_recipe_gives_new_values_every_epoch(cls: type) -> None:
    torch.manual_seed(0)
    kw = {"batch_size": 4, "num_workers": 2, "worker_init_fn": _seed_numpy_from_torch}
    loader = cls(NumpyAugment(), multiprocessing_context=FORK, **kw)
    if cls is DataLoader:
        assert loader.worker_type == "process"  # auto: a worker_init_fn was given
    first, second = _values(loader), _values(loader)
    assert len(first) == 16 and not set(first) & set(second)  # torch: 0 repeats either


def test_forced_threads_warn_and_keep_the_loops_rng_when_init_reseeds() -> None:
    torch.manual_seed(0)
    np.random.seed(7)
    expected = np.random.RandomState(7).rand()
    loader = DataLoader(
        Squares(),
        batch_size=4,
        num_workers=2,
        worker_init_fn=_seed_numpy_from_torch,
        worker_type="thread",
    )
    with pytest.warns(UserWarning, match=r"worker_init_fn changed the process-wide RNG") as w:
        assert len(list(loader)) == 6
    assert "worker_type='process'" in str(w[0].message)
    assert np.random.rand() == expected  # the training loop's numpy stream was not reseeded


def test_thread_init_that_leaves_rngs_alone_does_not_warn() -> None:
    loader = DataLoader(
        Squares(),
        batch_size=4,
        num_workers=2,
        worker_init_fn=lambda i: None,
        worker_type="thread",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(list(loader)) == 6


# -- the torch docs' IterableDataset examples ---------------------------------------------


class MyIterableDataset(tud.IterableDataset):
    """torch.utils.data.IterableDataset's docstring example (start/end, per-worker split)."""

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end

    def __iter__(self) -> Iterator[int]:
        info = torch.utils.data.get_worker_info()
        if info is None:
            lo, hi = self.start, self.end
        else:
            per = math.ceil((self.end - self.start) / float(info.num_workers))
            lo = self.start + info.id * per
            hi = min(lo + per, self.end)
        return iter(range(lo, hi))


class PlainRange(tud.IterableDataset):
    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.end))


def worker_init_fn(worker_id: int) -> None:
    """The docs' second example: configure each worker's dataset copy."""
    info = torch.utils.data.get_worker_info()
    dataset = info.dataset
    overall_start, overall_end = dataset.start, dataset.end
    per = math.ceil((overall_end - overall_start) / float(info.num_workers))
    dataset.start = overall_start + info.id * per
    dataset.end = min(dataset.start + per, overall_end)


def _flat(loader: Any) -> list[int]:
    return [int(x) for b in loader for x in b]


@needs_fork
@pytest.mark.parametrize("worker_type", ["auto", "thread"])
def test_docs_example_1_self_sharding(worker_type: str) -> None:
    theirs = _flat(tud.DataLoader(MyIterableDataset(3, 7), num_workers=2))
    ours = _flat(DataLoader(MyIterableDataset(3, 7), num_workers=2, worker_type=worker_type))
    assert ours == theirs == [3, 5, 4, 6]
    assert _flat(DataLoader(MyIterableDataset(3, 7), num_workers=0)) == [3, 4, 5, 6]


@needs_fork
def test_docs_example_2_worker_init_fn_configures_the_copy() -> None:
    kw = {"num_workers": 2, "worker_init_fn": worker_init_fn, "multiprocessing_context": FORK}
    theirs = _flat(tud.DataLoader(PlainRange(3, 7), **kw))
    loader = DataLoader(PlainRange(3, 7), **kw)
    assert loader.worker_type == "process"
    assert _flat(loader) == theirs == [3, 5, 4, 6]


# -- exceptions ----------------------------------------------------------------------------


class MissingFile(tud.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        if i == 2:
            open(f"/nonexistent/fastfeed-{i}.bin", "rb")  # noqa: SIM115
        return i


class CodedError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self) -> Any:
        return (CodedError, (self.args[0], self.code), self.__dict__)


class RaisesCoded(tud.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        if i == 1:
            raise CodedError("quota exceeded", code=429)
        return i


def _catch(loader: Any, exc_type: type[BaseException]) -> BaseException:
    with pytest.raises(exc_type) as info:
        list(loader)
    getattr(loader, "close", lambda: None)()  # torch's has no close()
    return info.value


@pytest.mark.parametrize(
    ("nw", "worker_type"),
    [(0, "thread"), (2, "thread"), pytest.param(2, "process", marks=needs_fork)],
)
def test_file_not_found_keeps_errno_and_filename(nw: int, worker_type: str) -> None:
    extra = {"multiprocessing_context": FORK} if worker_type == "process" else {}
    err = _catch(
        DataLoader(MissingFile(), batch_size=2, num_workers=nw, worker_type=worker_type, **extra),
        FileNotFoundError,
    )
    torch_err = _catch(tud.DataLoader(MissingFile(), batch_size=2), FileNotFoundError)
    assert type(err) is FileNotFoundError and err.errno == errno.ENOENT == torch_err.errno
    assert err.filename == "/nonexistent/fastfeed-2.bin" == torch_err.filename
    assert str(err) == str(torch_err)  # the message is the user's, unchanged
    assert any("sample 2" in n or "worker process" in n for n in err.__notes__)


@pytest.mark.parametrize("worker_type", ["thread", pytest.param("process", marks=needs_fork)])
def test_custom_exception_fields_survive(worker_type: str) -> None:
    extra = {"multiprocessing_context": FORK} if worker_type == "process" else {}
    loader = DataLoader(
        RaisesCoded(), batch_size=2, num_workers=2, worker_type=worker_type, **extra
    )
    err = _catch(loader, CodedError)
    assert type(err) is CodedError and err.code == 429 and str(err) == "quota exceeded"


@needs_fork
def test_torch_loses_the_fields_fastfeed_keeps() -> None:
    # Why it matters: torch re-creates the exception from its message in the main process.
    loader = tud.DataLoader(
        RaisesCoded(), batch_size=2, num_workers=2, multiprocessing_context=FORK
    )
    try:
        list(loader)
    except Exception as exc:  # torch: "Caught CodedError in DataLoader worker process"
        kept = (type(exc).__name__, hasattr(exc, "code"))
    else:
        kept = ("nothing raised", False)
    gc.collect()  # torch's iterator (held by the traceback) shuts its workers down
    assert kept == ("RuntimeError", False)


# -- tuple subclasses ------------------------------------------------------------------


class Detection(tud.Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Size]:
        img = torch.zeros(3, 4 + i, 5)
        return img, img.shape


def keep_sizes(batch: list[Any]) -> tuple[list[torch.Tensor], tuple[torch.Size, ...]]:
    return [b[0] for b in batch], tuple(b[1] for b in batch)


@pytest.mark.parametrize("nw", [0, 2])
def test_torch_size_and_structseqs_round_trip(nw: int) -> None:
    kw = {"batch_size": 2, "collate_fn": keep_sizes}
    ours = list(DataLoader(Detection(), num_workers=nw, worker_type="thread", **kw))
    theirs = list(tud.DataLoader(Detection(), **kw))
    assert len(ours) == len(theirs) == 3
    for (_, a), (_, b) in zip(ours, theirs, strict=True):
        assert a == b and all(type(s) is torch.Size for s in a)

    def max_collate(batch: list[torch.Tensor]) -> Any:
        return torch.max(torch.stack(batch), 1)  # a structseq: torch.return_types.max

    kw2 = {"batch_size": 2, "collate_fn": max_collate}
    data = [torch.arange(6.0).reshape(2, 3) + i for i in range(4)]
    batches = list(DataLoader(data, num_workers=nw, worker_type="thread", **kw2))
    torch_batches = list(tud.DataLoader(data, **kw2))
    assert len(batches) == 2
    for a, b in zip(batches, torch_batches, strict=True):
        assert type(a) is type(b) is torch.return_types.max
        assert torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices)


# -- several live iterators in process mode ---------------------------------------------------


@needs_fork
def test_process_mode_zip_of_two_iterators_loses_nothing() -> None:
    kw = {"batch_size": 2, "num_workers": 2, "multiprocessing_context": FORK}
    ds = tud.TensorDataset(torch.arange(8))
    ours = DataLoader(ds, worker_type="process", **kw)
    theirs = tud.DataLoader(ds, **kw)

    def pairs(loader: Any) -> list[tuple[list[int], list[int]]]:
        return [(a[0].tolist(), b[0].tolist()) for a, b in zip(loader, loader, strict=False)]

    assert (
        pairs(ours)
        == pairs(theirs)
        == [([0, 1], [0, 1]), ([2, 3], [2, 3]), ([4, 5], [4, 5]), ([6, 7], [6, 7])]
    )
    first = iter(ours)
    assert next(first)[0].tolist() == [0, 1]
    second = iter(ours)  # a second iterator must not make the first drop batches
    assert [b[0].tolist() for b in first] == [[2, 3], [4, 5], [6, 7]]
    assert len(list(second)) == 4


# -- fork ---------------------------------------------------------------------------------------

_FORK_SCRIPT = r"""
import os, sys, torch, torch.utils.data as tud
from fastfeed.dataloader import DataLoader
wt = sys.argv[1]
dl = DataLoader(tud.TensorDataset(torch.arange(12)), batch_size=4, num_workers=2,
                persistent_workers=True, worker_type=wt)
assert [b[0].tolist() for b in dl][0] == [0, 1, 2, 3]      # parent starts its workers
pid = os.fork()
if pid == 0:
    got = [b[0].tolist() for b in dl]                       # the child: inherited loader
    os._exit(0 if got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]] else 3)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
dl.close()
"""


@needs_fork
@pytest.mark.parametrize("worker_type", ["thread", "process"])
def test_forked_child_iterates_an_inherited_persistent_loader(worker_type: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _FORK_SCRIPT, worker_type],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ.copy(),
    )
    assert out.returncode == 0, out.stderr
    assert "child 0" in out.stdout


# -- state_dict / load_state_dict ------------------------------------------------------------


def _mk(nw: int, worker_type: str, gen: bool, persistent: bool) -> DataLoader[Any]:
    return DataLoader(
        tud.TensorDataset(torch.arange(40)),
        batch_size=4,
        shuffle=True,
        num_workers=nw,
        worker_type=worker_type,
        persistent_workers=persistent and nw > 0,
        generator=torch.Generator().manual_seed(5) if gen else None,
        **({"multiprocessing_context": FORK} if worker_type == "process" else {}),
    )


@pytest.mark.parametrize(
    ("nw", "worker_type"),
    [(0, "thread"), (2, "thread"), pytest.param(2, "process", marks=needs_fork)],
)
@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("persistent", [False, True])
def test_mid_epoch_resume_is_exact(nw: int, worker_type: str, gen: bool, persistent: bool) -> None:
    torch.manual_seed(0)
    reference = _mk(nw, worker_type, gen, persistent)
    full = [[b[0].tolist() for b in reference] for _ in range(2)]
    reference.close()
    torch.manual_seed(0)
    run = _mk(nw, worker_type, gen, persistent)
    assert [b[0].tolist() for b in run] == full[0]
    it = iter(run)
    head = [next(it)[0].tolist() for _ in range(3)]
    state = json.loads(json.dumps(run.state_dict()))  # JSON-serializable
    assert state["batches_yielded"] == 3
    run.close()
    torch.manual_seed(123)  # the resumed process is seeded differently
    resumed = _mk(nw, worker_type, gen, persistent)
    resumed.load_state_dict(state)
    rng_before = torch.get_rng_state()
    tail = [b[0].tolist() for b in resumed]
    assert head + tail == full[1]
    if nw > 0:
        assert torch.equal(torch.get_rng_state(), rng_before)  # resume left the global RNG
    resumed.close()


def test_resume_between_epochs_and_torch_order() -> None:
    ds = tud.TensorDataset(torch.arange(20))
    theirs = tud.DataLoader(
        ds, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    expected = [[b[0].tolist() for b in theirs] for _ in range(2)]
    ours = DataLoader(ds, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(1))
    assert [b[0].tolist() for b in ours] == expected[0]
    state = json.loads(json.dumps(ours.state_dict()))
    assert state["batches_yielded"] == 0
    again = DataLoader(ds, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(99))
    again.load_state_dict(state)
    assert [b[0].tolist() for b in again] == expected[1]


@pytest.mark.parametrize("nw", [0, 2])
def test_iterable_resume_skips_what_was_delivered(nw: int) -> None:
    kw = {"batch_size": 3, "num_workers": nw, "worker_type": "thread"}
    full = _flat(DataLoader(MyIterableDataset(0, 20), **kw))
    run = DataLoader(MyIterableDataset(0, 20), **kw)
    it = iter(run)
    head = [int(x) for _ in range(2) for x in next(it)]
    state = json.loads(json.dumps(run.state_dict()))
    run.close()
    resumed = DataLoader(MyIterableDataset(0, 20), **kw)
    resumed.load_state_dict(state)
    assert head + _flat(resumed) == full


@pytest.mark.parametrize(
    ("nw", "worker_type"),
    [(0, "thread"), (2, "thread"), pytest.param(2, "process", marks=needs_fork)],
)
def test_resuming_twice_in_one_epoch_delivers_each_batch_once(nw: int, worker_type: str) -> None:
    full = _mk(nw, worker_type, True, False)
    expected = [b[0].tolist() for b in full]
    full.close()
    first = _mk(nw, worker_type, True, False)
    it = iter(first)
    head = [next(it)[0].tolist() for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    second = _mk(nw, worker_type, True, False)
    second.load_state_dict(state)
    assert second.state_dict() == state  # loaded, not iterated yet: still where it stood
    it = iter(second)
    middle = [next(it)[0].tolist() for _ in range(2)]
    state = json.loads(json.dumps(second.state_dict()))
    assert state["batches_yielded"] == 5
    second.close()
    third = _mk(nw, worker_type, True, False)
    third.load_state_dict(state)
    assert head + middle + [b[0].tolist() for b in third] == expected
    third.close()


@pytest.mark.parametrize("nw", [0, 2])
def test_resume_between_epochs_without_generator_continues_torchs_order(nw: int) -> None:
    ds = tud.TensorDataset(torch.arange(10))
    torch.manual_seed(3)
    theirs = tud.DataLoader(ds, batch_size=5, shuffle=True, num_workers=nw)
    expected = [[b[0].tolist() for b in theirs] for _ in range(3)]
    torch.manual_seed(3)
    kw: dict[str, Any] = {"batch_size": 5, "shuffle": True, "num_workers": nw}
    ours = DataLoader(ds, worker_type="thread", **kw)
    assert [b[0].tolist() for b in ours] == expected[0]
    state = json.loads(json.dumps(ours.state_dict()))
    script_rng = torch.get_rng_state()  # the script saves its RNG beside the loader's state
    ours.close()
    torch.manual_seed(999)
    resumed = DataLoader(ds, worker_type="thread", **kw)
    torch.set_rng_state(script_rng)
    resumed.load_state_dict(state)
    # The epoch after the resumed one draws a new order, as torch's did (not a repeat).
    assert [[b[0].tolist() for b in resumed] for _ in range(2)] == expected[1:]
    resumed.close()


def test_resume_restores_the_generator_a_sampler_keeps() -> None:
    ds = tud.TensorDataset(torch.arange(12))

    def make() -> DataLoader[Any]:
        sampler = tud.RandomSampler(ds, generator=torch.Generator().manual_seed(7))
        return DataLoader(ds, batch_size=4, sampler=sampler)

    reference = make()
    expected = [[b[0].tolist() for b in reference] for _ in range(2)]
    run = make()
    assert [b[0].tolist() for b in run] == expected[0]
    it = iter(run)
    head = [next(it)[0].tolist()]
    state = json.loads(json.dumps(run.state_dict()))
    assert "sampler_generator" in state["rng"]["at_iter"]
    resumed = make()  # its sampler's generator starts again from seed 7
    resumed.load_state_dict(state)
    assert head + [b[0].tolist() for b in resumed] == expected[1]


def test_load_state_dict_rejects_foreign_state() -> None:
    from fastfeed.errors import ConfigError

    with pytest.raises(ConfigError, match=r"not a fastfeed\.DataLoader state"):
        DataLoader(Squares()).load_state_dict({"_sampler_iter_yielded": 3})


def test_auto_probe_that_blocks_is_abandoned_and_picks_processes() -> None:
    import threading

    release = threading.Event()

    class WaitsForItsWorkers(tud.Dataset):  # e.g. a barrier shared by the workers
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> int:
            release.wait(30)
            return i

    loader = DataLoader(WaitsForItsWorkers(), num_workers=2)
    assert loader.worker_type == "process"
    assert "did not finish" in loader.worker_type_reason
    release.set()  # lets the abandoned probe thread end (the leak guard checks threads)
    for t in threading.enumerate():
        if t.name == "fastfeed-probe":
            t.join(5)


def test_the_iterator_answers_torchs_iterator_attributes_in_process_mode() -> None:
    ctx = {"multiprocessing_context": FORK} if FORK else {}
    loader = DataLoader(Squares(), batch_size=4, num_workers=2, worker_type="process", **ctx)
    it = iter(loader)
    next(it)
    assert len(it._workers) == 2 and all(w.is_alive() for w in it._workers)
    assert it._num_yielded == 1
    it.close()
