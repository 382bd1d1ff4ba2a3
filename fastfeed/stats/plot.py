"""One PNG that answers "what bounds my input pipeline?" at a glance (needs matplotlib).

Up to three panels, each drawn only when it has something to show (:func:`panels`):
the time per batch of each stage by what it was spent on (CPU, waiting for a core, the
GIL, IO), the training loop's wait vs compute per step, and the cache what-if curve.
matplotlib is imported only here, lazily: ``pip install fastfeed[plot]``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from fastfeed.profiling.stages import ORDER, Stage

if TYPE_CHECKING:
    from fastfeed.stats.model import LoaderStats

__all__ = ["panels", "plot_stats"]

_CLASSES = (
    ("cpu", "CPU", "#3b7dd8"),
    ("runq", "waiting for a core", "#a0a0a0"),
    ("gil", "waiting for the GIL", "#d04040"),
    ("io", "waiting on IO", "#f0a030"),
)


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


def panels(stats: LoaderStats) -> list[str]:
    """The panels that have data: ``"stages"``, ``"steps"``, ``"whatif"`` (in that order)."""
    out = []
    if any(n != Stage.WAIT and s.busy_s > 0 for n, s in stats.stages.items()):
        out.append("stages")
    if stats._step_log:
        out.append("steps")
    if stats.whatif:
        out.append("whatif")
    return out


def plot_stats(stats: LoaderStats, path: str | os.PathLike[str]) -> None:
    """Save a PNG of ``stats`` to ``path`` (a single note when nothing was measured).

    Raises:
        ImportError: matplotlib is not installed (the message says how to install it).
    """
    plt = _pyplot()
    names = panels(stats)
    fig, axes = plt.subplots(
        1, max(1, len(names)), figsize=(5.4 * max(1, len(names)), 5.2), constrained_layout=True
    )
    axes = list(axes) if len(names) > 1 else [axes]
    v = stats.verdict
    fig.suptitle(_wrap(v.sentence or v.bound.value, 50 * max(1, len(names))), fontsize=10)
    draw = {"stages": _stage_panel, "steps": _steps_panel, "whatif": _whatif_panel}
    for ax, name in zip(axes, names, strict=False):
        draw[name](ax, stats)
    if not names:
        axes[0].text(0.5, 0.5, "nothing measured yet", ha="center", va="center")
        axes[0].set_axis_off()
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
    names = sorted(
        (n for n, s in stats.stages.items() if n != Stage.WAIT and s.busy_s > 0),
        key=lambda n: ORDER.get(n, 99),
    )
    y = list(range(len(names)))
    left = [0.0] * len(names)
    for key, label, color in _CLASSES:
        widths = []
        for n in names:
            s = stats.stages[n]
            split = s.split()
            share = split.shares().get(key, 0.0) if split else 0.0
            if key == "io" and split is not None and s.runq_s is None:  # unclassified
                share = max(0.0, 1.0 - (s.cpu_per_wall or 0.0))
            widths.append(1e3 * s.busy_s / max(1, s.count) * share)
        if any(widths):
            ax.barh(y, widths, left=left, color=color, label=label)
            left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("ms per span (usually one batch, one thread)")
    ax.set_title("What each stage's time was spent on")
    ax.legend(loc="lower right", fontsize=8)


def _steps_panel(ax: Any, stats: LoaderStats) -> None:
    log = stats.step_log
    x = list(range(1, len(log) + 1))
    wait = [w * 1e3 for _, w, _ in log]
    comp = [max(0.0, (s - w) * 1e3) for _, w, s in log]
    ax.bar(x, comp, width=1.0, color="#4a9a4a", label="computing")
    ax.bar(x, wait, width=1.0, bottom=comp, color="#d04040", label="waiting for data")
    ax.set_xlabel("step")
    ax.set_ylabel("ms")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"Each step: waiting vs computing ({stats.stall_fraction:.0%} waiting)")


def _whatif_panel(ax: Any, stats: LoaderStats) -> None:
    xs = [100 * f for f, _ in stats.whatif]
    ys = [r for _, r in stats.whatif]
    ax.plot(xs, ys, marker="o", color="#7040b0", label="predicted")
    if stats.samples_per_s:
        ax.axhline(stats.samples_per_s, color="gray", ls=":", label="measured now")
    ax.set_xlabel("dataset cached in RAM (%)")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("samples/s")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("If part of the dataset were cached in RAM")
