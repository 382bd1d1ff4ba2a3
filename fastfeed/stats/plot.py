"""One PNG that answers "what bounds my input pipeline?" at a glance (needs matplotlib).

Three panels: the time per batch of each stage (CPU vs waiting), the training loop's
wait vs compute per step, and the cache what-if curve. matplotlib is imported only
here, lazily: ``pip install fastfeed[plot]``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastfeed.stats.model import LoaderStats

__all__ = ["plot_stats"]

_STAGE_ORDER = ("read", "decode", "transform", "collate", "copy")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(
            "plotting needs matplotlib: pip install fastfeed[plot] (or pip install matplotlib)"
        ) from exc
    matplotlib.use("Agg", force=False)  # files only; never opens a window
    import matplotlib.pyplot as plt

    return plt


def plot_stats(stats: LoaderStats, path: str | os.PathLike[str]) -> None:
    """Save a PNG of ``stats`` to ``path``.

    Raises:
        ImportError: matplotlib is not installed (the message says how to install it).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2), constrained_layout=True)
    v = stats.verdict
    fig.suptitle(_wrap(v.sentence or v.bound.value, 150), fontsize=11)
    _stage_panel(axes[0], stats)
    _steps_panel(axes[1], stats)
    _whatif_panel(axes[2], stats)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines)


def _stage_panel(ax: Any, stats: LoaderStats) -> None:
    batch = stats.samples / stats.batches if stats.batches else 1.0
    names = sorted(
        (n for n in stats.stages if n != "wait"),
        key=lambda n: _STAGE_ORDER.index(n) if n in _STAGE_ORDER else 99,
    )
    cpu_ms, wait_ms = [], []
    for n in names:
        s = stats.stages[n]
        per_batch = s.per_item_s * batch * 1e3
        cpu_ms.append(per_batch * min(1.0, s.cpu_per_wall))
        wait_ms.append(per_batch - cpu_ms[-1])
    y = list(range(len(names)))
    ax.barh(y, cpu_ms, color="#3b7dd8", label="CPU")
    ax.barh(y, wait_ms, left=cpu_ms, color="#f0a030", label="waiting (IO, GIL, cores)")
    if stats.steps:
        ax.axvline(
            stats.compute_per_step_s * 1e3 * max(1, stats.num_threads or 1),
            color="#c03030",
            ls="--",
            label=f"model step x {max(1, stats.num_threads or 1)} threads",
        )
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("ms per batch (one thread)")
    ax.set_title("Where a batch's time goes")
    ax.legend(loc="lower right", fontsize=8)


def _steps_panel(ax: Any, stats: LoaderStats) -> None:
    log = stats.step_log
    if log:
        x = list(range(1, len(log) + 1))
        wait = [w * 1e3 for _, w, _ in log]
        comp = [max(0.0, (s - w) * 1e3) for _, w, s in log]
        ax.bar(x, comp, width=1.0, color="#4a9a4a", label="compute")
        ax.bar(x, wait, width=1.0, bottom=comp, color="#d04040", label="waiting for data")
        ax.set_xlabel("step")
        ax.legend(loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no training steps measured", ha="center", va="center")
    ax.set_ylabel("ms")
    ax.set_title(f"Wait vs compute per step (stall {stats.stall_fraction:.0%})")


def _whatif_panel(ax: Any, stats: LoaderStats) -> None:
    if stats.whatif:
        xs = [100 * f for f, _ in stats.whatif]
        ys = [r for _, r in stats.whatif]
        ax.plot(xs, ys, marker="o", color="#7040b0", label="predicted")
        if stats.samples_per_s:
            ax.axhline(stats.samples_per_s, color="gray", ls=":", label="measured now")
        ax.set_xlabel("dataset cached in RAM (%)")
        ax.set_ylim(bottom=0)
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no read stage measured", ha="center", va="center")
    ax.set_ylabel("samples/s")
    ax.set_title("Cache what-if")
