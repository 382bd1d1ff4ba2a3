"""Error translation of the drop-in DataLoader: the user's exception is data.

The exception a dataset or ``collate_fn`` raised reaches the training loop as the *same
object* (same type, ``args``, ``errno``/``filename``, custom attributes), so ``except
KeyError`` and handlers that read attributes behave as with torch. fastfeed only adds
where it happened (index, dataset key, stage, worker) as a PEP 678 note: shown under the
traceback on Python 3.11+, and kept in ``exc.__notes__`` on 3.10 (the same attribute,
which 3.10's traceback printer does not show). Notes live in the instance ``__dict__``,
so they survive pickling between processes.
"""

from __future__ import annotations

from typing import Any

from fastfeed.errors import describe_indices

__all__ = ["add_context", "describe_task", "sample_note"]


def add_context(exc: BaseException, note: str) -> BaseException:
    """Attach ``note`` to ``exc`` (PEP 678) and return ``exc``; never raises."""
    try:
        add = getattr(exc, "add_note", None)
        if add is not None:
            add(note)
        else:  # Python 3.10: the attribute 3.11 reads, set by hand
            notes = getattr(exc, "__notes__", None)
            if not isinstance(notes, list):
                notes = []
                exc.__notes__ = notes  # type: ignore[attr-defined]
            notes.append(note)
    except Exception:  # an exception type that refuses attributes keeps its own text
        pass
    return exc


def sample_note(index: Any, where: str, stage: str, worker: str) -> str:
    """``fastfeed: sample 3 (MyDataset[3]) failed in stage 'read' (thread worker 1)``."""
    what = where if index is None else f"sample {index!r} ({where})"
    return f"fastfeed: {what} failed in stage '{stage}' ({worker})"


def describe_task(index: Any) -> str:
    """A batch of indices as errors and timeouts name it."""
    if isinstance(index, (list, tuple)):
        return f"batch {describe_indices(index)}"
    return f"sample {index!r}"
