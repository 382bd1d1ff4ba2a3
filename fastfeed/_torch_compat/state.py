"""Mid-epoch resume of the drop-in DataLoader: ``state_dict()`` / ``load_state_dict()``.

The state is small and JSON-serializable (like torchdata's ``StatefulDataLoader``), so
it can be saved beside the model::

    {"format": "fastfeed.DataLoader/1", "batches_yielded": 37, "iterable": false,
     "rng": {"at_iter": {...}, "at_first_batch": {...}}}

It records, for the epoch in progress, the RNG states the order was drawn from (torch's
global generator and the loader's ``generator``, base64 text) at the two moments torch
draws: when ``iter()`` is called (the index sampler's ``iter`` and the base seed) and
right before the sampler's first index (``RandomSampler`` draws its permutation lazily);
and how many batches the training loop received. Resuming replays those draws, so the
resumed epoch has the same order, then:

- map-style: skips ``batches_yielded`` batches of *indices* (nothing is read);
- IterableDataset: reads and drops ``batches_yielded`` batches (a stream cannot seek).

Between epochs the state holds the RNG states of now, so the next epoch's order is the
one the original run would draw. Exact with ``in_order=True`` (the default); with
``in_order=False`` the batches delivered so far depend on timing. A resumed ``iter()``
leaves torch's global RNG as it found it (the training script restores its own) and
leaves the loader's ``generator`` where the original run had it. Not restored: numpy /
``random`` streams a custom sampler keeps itself, and the RNG streams *inside* worker
processes (a dataset drawing from them in ``worker_type="process"`` gets fresh worker
seeds for the rest of the epoch).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from fastfeed._torch_compat.rngstate import decode_torch_state, encode_torch_state
from fastfeed.errors import ConfigError

__all__ = [
    "FORMAT",
    "Epoch",
    "TrackedSampler",
    "apply_snapshot",
    "check_state",
    "fresh_state",
    "snapshot",
]

FORMAT = "fastfeed.DataLoader/1"


def snapshot(generator: torch.Generator | None) -> dict[str, str | None]:
    """torch's global RNG state and ``generator``'s, as text."""
    return {
        "torch": encode_torch_state(torch.get_rng_state()),
        "generator": None if generator is None else encode_torch_state(generator.get_state()),
    }


def apply_snapshot(snap: dict[str, str | None], generator: torch.Generator | None) -> None:
    if snap.get("torch") is not None:
        torch.set_rng_state(decode_torch_state(snap["torch"]))  # type: ignore[arg-type]
    if generator is not None and snap.get("generator") is not None:
        generator.set_state(decode_torch_state(snap["generator"]))  # type: ignore[arg-type]


def check_state(state: Any) -> dict[str, Any]:
    """Validate a state from :meth:`DataLoader.state_dict`; ConfigError if it is not one."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ConfigError(
            f"not a fastfeed.DataLoader state (format {got!r}, expected {FORMAT!r}): pass "
            "what DataLoader.state_dict() returned"
        )
    n = state.get("batches_yielded")
    if not isinstance(n, int) or n < 0:
        raise ConfigError(f"state['batches_yielded'] must be an int >= 0, got {n!r}")
    return state


class TrackedSampler:
    """The index sampler of one ``iter()``: records (or replays) the RNG at its draws.

    Args:
        sampler: The loader's index sampler.
        generator: The loader's ``generator`` (None: torch's global RNG).
        resume: ``state["rng"]`` to replay, or None to record.
        skip: Batches of indices to skip after the first draw (map-style resume).
    """

    def __init__(
        self,
        sampler: Any,
        generator: torch.Generator | None,
        resume: dict[str, Any] | None = None,
        skip: int = 0,
    ) -> None:
        self.sampler = sampler
        self.generator = generator
        self.resume = resume
        self.skip = skip
        self.at_iter: dict[str, str | None] | None = None
        self.at_first: dict[str, str | None] | None = None

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        if self.resume is not None and self.resume.get("at_iter") is not None:
            apply_snapshot(self.resume["at_iter"], self.generator)
        else:
            self.at_iter = snapshot(self.generator)
        return self._iterate(iter(self.sampler))

    def _iterate(self, it: Iterator[Any]) -> Iterator[Any]:
        resume = self.resume
        if resume is not None:
            user = torch.get_rng_state()
            if resume.get("at_first_batch") is not None:
                apply_snapshot(resume["at_first_batch"], self.generator)
            self.at_first = snapshot(self.generator)
            try:
                first = next(it)
                for _ in range(self.skip):
                    first = next(it)
            except StopIteration:
                return
            finally:
                torch.set_rng_state(user)
        else:
            self.at_first = snapshot(self.generator)
            try:
                first = next(it)
            except StopIteration:
                return
        yield first
        yield from it


class Epoch:
    """What ``iter(loader)`` returns: the delivered batches, counted for ``state_dict``.

    Args:
        batches: The tap the training loop reads.
        inner: The engine's iterator (for ``len`` and ``close``).
        tracked: The epoch's sampler record (None for an IterableDataset).
        generator: The loader's generator (the state between epochs).
        iterable: The dataset is an IterableDataset.
    """

    def __init__(
        self,
        batches: Iterator[Any],
        inner: Any,
        tracked: TrackedSampler | None,
        generator: torch.Generator | None,
        iterable: bool,
        at_iter: dict[str, str | None] | None,
    ) -> None:
        self._batches = batches
        self.inner = inner
        self._tracked = tracked
        self._generator = generator
        self._iterable = iterable
        self._at_iter = at_iter  # an IterableDataset's record (no sampler draws)
        self.yielded = 0
        self.finished = False

    def __iter__(self) -> Epoch:
        return self

    def __getattr__(self, name: str) -> Any:
        # What scripts read from torch's iterator (``it._workers``, ``it._num_yielded``...)
        # is answered by the engine's iterator, and through it by torch's.
        if name.startswith("__") or name in ("inner", "_batches"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)

    def __next__(self) -> Any:
        try:
            batch = next(self._batches)
        except StopIteration:
            self.finished = True
            raise
        self.yielded += 1
        return batch

    def close(self) -> None:
        """Stop this epoch's workers (and release the batch the loop holds)."""
        close = getattr(self._batches, "close", None)
        if close is not None:
            close()
        self.inner.close()

    def state(self) -> dict[str, Any]:
        """This epoch's resume state (see the module docstring); JSON-serializable."""
        if self.finished:
            return fresh_state(self._generator, self._iterable, base_draw=True)
        t = self._tracked
        rng = {
            "at_iter": t.at_iter if t is not None and t.at_iter is not None else self._at_iter,
            "at_first_batch": t.at_first if t is not None else None,
        }
        return {
            "format": FORMAT,
            "batches_yielded": self.yielded,
            "iterable": self._iterable,
            "rng": rng,
        }


def fresh_state(
    generator: torch.Generator | None, iterable: bool, *, base_draw: bool
) -> dict[str, Any]:
    """The state before an epoch: the next ``iter()`` draws from the RNGs of now.

    Args:
        generator: The loader's generator (None: torch's global RNG).
        iterable: The dataset is an IterableDataset.
        base_draw: The next ``iter()`` draws a base seed (not a running persistent
            pool): the sampler's lazy first draw then sees the RNG one draw later, which
            is computed here on a copy.
    """
    at_iter = snapshot(generator)
    at_first = dict(at_iter)
    if base_draw:
        copy = torch.Generator()
        copy.set_state(generator.get_state() if generator is not None else torch.get_rng_state())
        torch.empty((), dtype=torch.int64).random_(generator=copy)  # torch's base seed draw
        at_first["generator" if generator is not None else "torch"] = encode_torch_state(
            copy.get_state()
        )
    return {
        "format": FORMAT,
        "batches_yielded": 0,
        "iterable": iterable,
        "rng": {"at_iter": at_iter, "at_first_batch": at_first},
    }
