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
leaves torch's global RNG as it found it (the training script restores its own), except
where the script restored the very RNG the state's ``iter()`` drew from (a checkpoint
between epochs): then the replayed draws advance it, as in the uninterrupted run
(:func:`continues_from`); so do the draws a state saved before the first batch had not
made yet. It leaves the loader's ``generator`` (and a ``torch.Generator`` the sampler
keeps, as ``RandomSampler(generator=g)`` does) where the original run had it. Not
restored: numpy / ``random`` streams a custom sampler keeps itself, and the RNG streams
*inside* worker processes (a dataset drawing from them in ``worker_type="process"`` gets
fresh worker seeds for the rest of the epoch).
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
    "continues_from",
    "fresh_state",
    "own_generator",
    "snapshot",
    "start_epoch",
]

FORMAT = "fastfeed.DataLoader/1"


def own_generator(sampler: Any, loader_generator: torch.Generator | None) -> Any:
    """The ``torch.Generator`` a sampler keeps itself (``RandomSampler(generator=g)``,
    also under a ``BatchSampler``), unless it is the loader's ``generator``; or None."""
    for _ in range(4):
        if sampler is None:
            break
        gen = getattr(sampler, "generator", None)
        if isinstance(gen, torch.Generator) and gen is not loader_generator:
            return gen
        sampler = getattr(sampler, "sampler", None)
    return None


def snapshot(generator: torch.Generator | None, own: Any = None) -> dict[str, str | None]:
    """torch's global RNG state, ``generator``'s and the sampler's ``own``, as text."""
    snap = {
        "torch": encode_torch_state(torch.get_rng_state()),
        "generator": None if generator is None else encode_torch_state(generator.get_state()),
    }
    if own is not None:
        snap["sampler_generator"] = encode_torch_state(own.get_state())
    return snap


def apply_snapshot(
    snap: dict[str, str | None], generator: torch.Generator | None, own: Any = None
) -> None:
    if snap.get("torch") is not None:
        torch.set_rng_state(decode_torch_state(snap["torch"]))  # type: ignore[arg-type]
    if generator is not None and snap.get("generator") is not None:
        generator.set_state(decode_torch_state(snap["generator"]))  # type: ignore[arg-type]
    if own is not None and snap.get("sampler_generator") is not None:
        own.set_state(decode_torch_state(snap["sampler_generator"]))  # type: ignore[arg-type]


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
        keep_rng: Leave torch's global RNG where the replayed draws put it (the script
            restored the RNG of the state's ``iter()``: see :func:`continues_from`).
    """

    def __init__(
        self,
        sampler: Any,
        generator: torch.Generator | None,
        resume: dict[str, Any] | None = None,
        skip: int = 0,
        keep_rng: bool = False,
    ) -> None:
        self.sampler = sampler
        self.generator = generator
        self.resume = resume
        self.skip = skip
        self.keep_rng = keep_rng
        self.own = own_generator(sampler, generator)
        self.at_iter: dict[str, str | None] | None = None
        self.at_first: dict[str, str | None] | None = None

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        if self.resume is not None and self.resume.get("at_iter") is not None:
            apply_snapshot(self.resume["at_iter"], self.generator, self.own)
            self.at_iter = self.resume["at_iter"]  # a later state_dict() replays it again
        else:
            self.at_iter = snapshot(self.generator, self.own)
        return self._iterate(iter(self.sampler))

    def _iterate(self, it: Iterator[Any]) -> Iterator[Any]:
        resume = self.resume
        if resume is not None:
            # A state saved before the first draw: the original run drew it later, from
            # the RNG the script restored, so the draw is left where it puts the RNG.
            drawn = resume.get("at_first_batch") is not None
            user = None if self.keep_rng or not drawn else torch.get_rng_state()
            if drawn:
                apply_snapshot(resume["at_first_batch"], self.generator, self.own)
            self.at_first = snapshot(self.generator, self.own)
            try:
                first = next(it)
                for _ in range(self.skip):
                    first = next(it)
            except StopIteration:
                return
            finally:
                if user is not None:
                    torch.set_rng_state(user)
        else:
            self.at_first = snapshot(self.generator, self.own)
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

    def catch_up(self, batches_yielded: int) -> None:
        """Resume after the batches a state counted: a map-style epoch skipped them as
        indices already (:class:`TrackedSampler`); a stream cannot seek, so its batches
        are read and dropped."""
        if not self._iterable:
            self.yielded = batches_yielded
            return
        for _ in range(batches_yielded):
            try:
                next(self)
            except StopIteration:
                break

    def close(self) -> None:
        """Stop this epoch's workers (and release the batch the loop holds)."""
        close = getattr(self._batches, "close", None)
        if close is not None:
            close()
        self.inner.close()

    def state(self) -> dict[str, Any]:
        """This epoch's resume state (see the module docstring); JSON-serializable."""
        if self.finished:
            own = None if self._tracked is None else self._tracked.own
            return fresh_state(self._generator, self._iterable, base_draw=True, own=own)
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


def start_epoch(
    resume: dict[str, Any] | None, generator: torch.Generator | None, index_sampler: Any
) -> tuple[TrackedSampler | None, dict[str, Any] | None, torch.Tensor | None]:
    """Record (or, resuming, replay) the RNG draws of one ``iter()``.

    Args:
        resume: A loaded :meth:`DataLoader.state_dict`, or None.
        generator: The loader's ``generator``.
        index_sampler: The loader's index sampler; None for an IterableDataset.

    Returns:
        The sampler record (None for an IterableDataset), an IterableDataset's
        ``at_iter`` record, and the RNG state to put back once the workers started
        (None: leave torch's global RNG where the draws put it).
    """
    user_rng = None
    if resume is not None:
        user_rng = torch.get_rng_state()
        if continues_from(resume, user_rng):
            user_rng = None  # leave the RNG where the replayed draws put it
    if index_sampler is not None:
        tracked = TrackedSampler(
            index_sampler,
            generator,
            resume=resume["rng"] if resume is not None else None,
            skip=resume["batches_yielded"] if resume is not None else 0,
            keep_rng=resume is not None and user_rng is None,
        )
        return tracked, None, user_rng
    if resume is not None:
        apply_snapshot(resume["rng"]["at_iter"], generator)
        return None, resume["rng"]["at_iter"], user_rng
    return None, snapshot(generator), user_rng


def continues_from(state: dict[str, Any], user_rng: torch.Tensor) -> bool:
    """Whether torch's global RNG now is the one the state's ``iter()`` drew from.

    True when the script restored the RNG state it saved with a between-epochs
    ``state_dict()``: the resumed ``iter()`` then leaves the RNG where its draws put it,
    as the uninterrupted run's did (restoring it would make the next epoch draw the same
    order again). A mid-epoch state was saved after those draws, so the script's RNG is
    further on, and the resumed ``iter()`` puts it back as it found it.
    """
    saved = state["rng"].get("at_iter") or {}
    text = saved.get("torch")
    return text is not None and torch.equal(user_rng, decode_torch_state(text))


def fresh_state(
    generator: torch.Generator | None, iterable: bool, *, base_draw: bool, own: Any = None
) -> dict[str, Any]:
    """The state before an epoch: the next ``iter()`` draws from the RNGs of now.

    Args:
        generator: The loader's generator (None: torch's global RNG).
        iterable: The dataset is an IterableDataset.
        base_draw: The next ``iter()`` draws a base seed (not a running persistent
            pool): the sampler's lazy first draw then sees the RNG one draw later, which
            is computed here on a copy.
        own: The generator the sampler keeps itself (:func:`own_generator`), or None.
    """
    at_iter = snapshot(generator, own)
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
