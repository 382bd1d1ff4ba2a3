"""The one progress bar of fastfeed: tqdm on stderr without its monitor thread."""

from __future__ import annotations

from typing import Any

__all__ = ["progress_bar"]


def progress_bar(
    *, total: int, unit: str, desc: str, enabled: bool = True, leave: bool = False
) -> Any:
    """A tqdm bar on stderr that leaves no line behind and starts no monitor thread.

    tqdm's monitor is an unnamed daemon thread that outlives the bar; fastfeed names and
    joins every thread it starts, so it turns the monitor off.

    Args:
        total: Units expected.
        unit: What is counted (``"rec"``, ``"img"``).
        desc: The label before the bar.
        enabled: ``False`` returns a bar that draws nothing (same interface).
        leave: Keep the finished bar on screen.

    Returns:
        A ``tqdm`` instance; use it as a context manager and call ``update(n)``.
    """
    from tqdm import tqdm

    class _Bar(tqdm):
        monitor_interval = 0

    return _Bar(total=total, unit=unit, desc=desc, disable=not enabled, leave=leave)
