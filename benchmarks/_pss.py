"""Peak PSS (proportional set size) of a process tree, sampled on a thread.

PSS divides each shared page among the processes that map it, so a worker process's
copy-on-write pages and the shared-memory batch slots count once for the whole tree,
unlike RSS (which counts them once per process).
"""

from __future__ import annotations

import threading

from fastfeed._procio import tree_pss_bytes


class PeakPSS:
    """Samples :func:`tree_pss_bytes` every ``interval_s`` seconds; a context manager.

    Attributes:
        peak_bytes: Highest process-tree PSS seen, bytes.
    """

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, tree_pss_bytes())

    def __enter__(self) -> PeakPSS:
        self.peak_bytes = tree_pss_bytes()
        self._thread = threading.Thread(target=self._run, name="fastfeed-pss-0", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        self.peak_bytes = max(self.peak_bytes, tree_pss_bytes())
