"""The process-wide RNGs (torch, ``random``, numpy) as values: save, compare, restore.

Used three ways by the drop-in DataLoader:

- a ``worker_init_fn`` run in a worker *thread* must not reseed the training loop: the
  states before and after are compared and what changed is restored (and warned about);
- ``worker_type="auto"`` probes whether reading one sample draws from a global RNG
  (:func:`uses_global_rng`): with torch's worker processes each worker has its own,
  seeded RNGs, with threads they are the training loop's, so such a dataset gets
  processes;
- ``DataLoader.state_dict()`` stores the sampler's RNG state as JSON text
  (:func:`encode_torch_state`).
"""

from __future__ import annotations

import base64
import copy
import random
import sys
import threading
from typing import Any

import torch

from fastfeed._torch_compat.torch_private import THREAD_INFO, install_thread_worker_info

__all__ = [
    "decode_torch_state",
    "encode_torch_state",
    "holds_process_primitives",
    "probe_global_rng",
    "rng_changes",
    "rng_restore",
    "rng_save",
    "uses_global_rng",
]


def _numpy_random() -> Any:
    np = sys.modules.get("numpy")  # only if the script uses numpy at all
    return None if np is None else np.random


def rng_save() -> dict[str, Any]:
    """The state of every process-wide RNG: ``torch``, ``random`` and ``numpy``."""
    out: dict[str, Any] = {"torch": torch.get_rng_state(), "random": random.getstate()}
    npr = _numpy_random()
    if npr is not None:
        out["numpy"] = npr.get_state()
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return bool(torch.equal(a, b))
    if isinstance(a, tuple) and isinstance(b, tuple):  # numpy's (str, array, int, int, float)
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    try:
        eq = a == b
        return bool(eq.all()) if hasattr(eq, "all") else bool(eq)
    except Exception:
        return False


def rng_changes(before: dict[str, Any]) -> list[str]:
    """Names of the RNGs whose state differs from ``before`` (:func:`rng_save`)."""
    now = rng_save()
    return [k for k in now if k not in before or not _same(before[k], now[k])]


def rng_restore(before: dict[str, Any], names: list[str] | None = None) -> None:
    """Put the RNGs named (default: all) back to ``before``."""
    for k in names if names is not None else list(before):
        if k not in before:
            continue
        if k == "torch":
            torch.set_rng_state(before[k])
        elif k == "random":
            random.setstate(before[k])
        elif k == "numpy":
            npr = _numpy_random()
            if npr is not None:
                npr.set_state(before[k])


def encode_torch_state(state: torch.Tensor) -> str:
    """A generator state (uint8 tensor) as base64 text, for JSON."""
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def decode_torch_state(text: str) -> torch.Tensor:
    """The inverse of :func:`encode_torch_state`."""
    raw = bytearray(base64.b64decode(text.encode("ascii")))
    return torch.frombuffer(raw, dtype=torch.uint8).clone()


_PROCESS_MODULES = (
    "multiprocessing.synchronize",
    "multiprocessing.sharedctypes",
    "multiprocessing.queues",
    "multiprocessing.managers",
    "torch.multiprocessing",
)


def holds_process_primitives(dataset: Any) -> bool:
    """True when an attribute of ``dataset`` is a multiprocessing primitive (Value, Lock...)."""
    try:
        values = list(vars(dataset).values())
    except TypeError:  # no __dict__
        return False
    return any(type(v).__module__.startswith(_PROCESS_MODULES) for v in values)


def uses_global_rng(
    dataset: Any,
    collate_fn: Any,
    index: Any,
    *,
    getitems: bool = False,
    timeout_s: float = 2.0,
) -> bool | None:
    """Whether reading ``dataset[index]`` (and collating it) draws from a global RNG, or
    calls ``get_worker_info()`` (answered None, as in torch's main process).

    Both can make results depend on which worker reads which batch: torch hands batches
    to its processes in a fixed rotation and seeds each, threads take batches as they
    come free and share the RNGs.

    Reads one sample from a shallow copy of the dataset (so a handle it opens lazily is
    not kept by the original, which may be forked into worker processes later) on a
    helper thread, and restores every RNG afterwards: the caller's random streams are
    untouched. A read that does not finish within ``timeout_s`` (a dataset that waits
    for its workers, e.g. a barrier) is abandoned: its thread is left to finish or block
    on its own (daemon), and it restores nothing.

    Args:
        dataset: The user's map-style dataset.
        collate_fn: A custom collate function to probe too, or None.
        index: The index read.
        getitems: Read with ``dataset.__getitems__([index])``, as torch's fetcher does for
            a dataset that has it.
        timeout_s: Longest wait for the probe read, seconds.

    Returns:
        True or False; None when the read failed or timed out (nothing can be concluded).
    """
    try:
        probe = copy.copy(dataset)
    except Exception:
        probe = dataset
    lock = threading.Lock()
    state: dict[str, Any] = {"abandoned": False}
    done = threading.Event()

    def run() -> None:
        calls: list[int] = []
        THREAD_INFO.calls = calls  # get_worker_info() notes its calls in this thread
        before = rng_save()
        result: bool | None
        try:
            samples = probe.__getitems__([index]) if getitems else [probe[index]]
            if collate_fn is not None:
                collate_fn(list(samples))
        except Exception:
            result = None
        else:
            result = True
        with lock:
            if state["abandoned"]:
                return  # the caller went on: its RNGs are no longer ours to touch
            changed = rng_changes(before)
            rng_restore(before)
            state["result"] = bool(changed or calls) if result is not None else None
            done.set()

    install_thread_worker_info()  # so get_worker_info() answers the probe's thread
    thread = threading.Thread(target=run, name="fastfeed-probe", daemon=True)
    thread.start()
    finished = done.wait(timeout_s)
    with lock:
        if not finished and not done.is_set():
            state["abandoned"] = True
            return None
    thread.join(timeout_s)
    return state.get("result")


def probe_global_rng(dataset: Any, collate_fn: Any, *, getitems: bool) -> bool | None:
    """``worker_type="auto"``'s probe: does reading (and collating) sample 0 use a global RNG
    or the worker's info (see :func:`uses_global_rng`)?

    Not probed (None) when the dataset holds multiprocessing primitives (a shared
    ``Value``, ``Semaphore``, ``Queue``...): it is written for worker processes, and a
    read in this process could take part in their synchronisation. An empty dataset
    draws nothing (False); one without ``len()`` is not probed (None). torch's own
    ``default_collate`` / ``default_convert`` draw nothing and are not probed.

    Args:
        dataset: The user's dataset.
        collate_fn: The loader's collate function.
        getitems: The loader reads batches with ``dataset.__getitems__``.
    """
    if holds_process_primitives(dataset):
        return None
    try:
        if len(dataset) == 0:
            return False
    except TypeError:
        return None
    custom = collate_fn not in (torch.utils.data.default_collate, torch.utils.data.default_convert)
    return uses_global_rng(dataset, collate_fn if custom else None, 0, getitems=getitems)
