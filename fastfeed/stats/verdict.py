"""The verdict of :mod:`fastfeed.stats`: what bounds training, what to do, and why.

:class:`Verdict` is the diagnosis (:mod:`.diagnose`) in plain records: the
:class:`Bound` (compute, partially input, input), the :class:`Bottleneck` of the input
side and the :class:`Action` list with predicted gains.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

__all__ = ["Action", "Bottleneck", "Bound", "Verdict"]


class Bound(str, Enum):
    """Who sets the pace: the model (compute) or the input pipeline."""

    COMPUTE = "compute-bound"
    PARTIAL = "partially-input-bound"
    INPUT = "input-bound"
    UNKNOWN = "unknown"


class Bottleneck(str, Enum):
    """What the input side's time goes to (``NONE`` when compute bound).

    ``IO``: waiting outside the process (storage, network, sleeps); ``CPU``: computing,
    and more cores are free; ``GIL``: threads waiting for each other's GIL;
    ``HOST``: computing with every core busy (this process's threads or others');
    ``COPY``: the host-to-device copy.
    """

    NONE = "none"
    IO = "io"
    CPU = "cpu"
    GIL = "gil"
    HOST = "host-saturated"
    COPY = "copy"


@dataclass(frozen=True)
class Action:
    """One next step the user can take, and what it should buy.

    Attributes:
        text: What to do (``"raise num_threads from 4 to 8"``).
        expected: The predicted effect in words, with numbers.
        speedup: Predicted throughput ratio (new / now), capped by the cores free; None
            when it cannot be predicted from what was measured.
    """

    text: str
    expected: str
    speedup: float | None = None

    def __str__(self) -> str:
        return f"{self.text} ({self.expected})"


@dataclass(frozen=True)
class Verdict:
    """The diagnosis: who sets the pace, what the input time goes to, what to do next.

    Attributes:
        bound: Compute-bound, partially input-bound, input-bound (or unknown: no steps).
        bottleneck: What limits supply; ``Bottleneck.NONE`` when compute bound.
        stall_fraction: Share of step time the training loop waited for data (0..1).
        sentence: One human sentence with the deciding numbers.
        actions: Next steps, most promising first.
    """

    bound: Bound
    bottleneck: Bottleneck
    stall_fraction: float
    sentence: str
    actions: tuple[Action, ...] = ()

    def matches(self, name: str) -> bool:
        """Whether ``name`` describes this verdict.

        ``name`` is a bound (``compute-bound``, ``partially-input-bound``,
        ``input-bound``) or a bottleneck (``io``, ``cpu``, ``gil``, ``host-saturated``,
        ``copy``); a bottleneck matches only while the verdict is (partially) input bound.
        """
        name = name.strip().lower()
        if name == self.bound.value:
            return True
        return self.bound in (Bound.PARTIAL, Bound.INPUT) and name == self.bottleneck.value

    def to_dict(self) -> dict[str, Any]:
        return {
            "bound": self.bound.value,
            "bottleneck": self.bottleneck.value,
            "stall_fraction": self.stall_fraction,
            "sentence": self.sentence,
            "actions": [
                {"text": a.text, "expected": a.expected, "speedup": a.speedup} for a in self.actions
            ],
        }

    def __str__(self) -> str:
        return self.sentence
