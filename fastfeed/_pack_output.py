"""Where :func:`fastfeed.pack` writes, safely: the output's folder and its atomic publication.

* :func:`_check_no_overlap`: refuse an input and an output that overlap.
* :func:`_make_parent`, :func:`_make_tmp_dir`: the output's folder and the temporary
  ``.OUT.<host>-<pid>-<random>.packing`` directory written first.
* :func:`_clean_stale`: remove temporary directories of killed packs to the same OUT.
* :func:`_cleanup_on_termination`: SIGTERM/SIGHUP unwind ``pack`` so its cleanup runs.
* :func:`_move_into_place`: rename the finished LMDB into place (replacing the old one
  only with ``overwrite``, never leaving OUT half-written).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from fastfeed.errors import ConfigError, OutputExistsError, PackError
from fastfeed.sources.base import Source
from fastfeed.sources.files import FileSource
from fastfeed.sources.lmdb import LMDBSource

if TYPE_CHECKING:
    from fastfeed.packing import PackReport

_TERM_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)


def _input_paths(src: str | os.PathLike[str] | Source) -> list[str]:
    """The files and folders ``src`` reads from (for the overlap check)."""
    if isinstance(src, FileSource):
        # An ImageFolder's root; a list file's folder (also its root) is not an input.
        return [src.root] if src.root is not None and src.classes is not None else []
    if isinstance(src, LMDBSource):
        return [src.path]
    if isinstance(src, Source):
        return []
    return [os.fspath(src)]


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _check_no_overlap(src: str | os.PathLike[str] | Source, out: str) -> None:
    """Refuse SRC == OUT, OUT inside SRC and SRC inside OUT (``out`` is a real path)."""
    for path in _input_paths(src):
        real = os.path.realpath(path)
        if real == out:
            raise ConfigError(f"the input and the output are the same path: {path}")
        if _inside(out, real):
            raise ConfigError(
                f"the output {out} is inside the input {path}: packing would read its own "
                "output; choose an OUT outside the input"
            )
        if _inside(real, out):
            raise ConfigError(
                f"the input {path} is inside the output {out}: replacing the output would "
                "delete the input; choose another OUT"
            )


def _make_parent(parent: str, given: str) -> None:
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise PackError(
            f"cannot create the folder of {given}: {parent}: {exc.strerror or exc}"
        ) from exc
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PackError(f"cannot write {given}: no write permission in {parent}")


_STALE_RE = re.compile(r"^\.(?P<base>.+)\.(?P<host>[^./]+)-(?P<pid>\d+)-[0-9a-f]+\.packing$")


def _tmp_owner() -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0]) or "host"
    return f"{host}-{os.getpid()}"


def _make_tmp_dir(parent: str, base: str) -> str:
    """``.BASE.<host>-<pid>-<random>.packing`` in ``parent``, created with the umask's mode.

    ``tempfile.mkdtemp`` would create it 0700 whatever the umask (and the rename would
    publish that mode), so teammates could not read a shared dataset.
    """
    for _ in range(100):
        path = os.path.join(parent, f".{base}.{_tmp_owner()}-{secrets.token_hex(4)}.packing")
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            continue
        return path
    raise PackError(f"cannot create a temporary directory in {parent}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _clean_stale(parent: str, base: str, report: PackReport) -> None:
    """Remove temporary directories of killed packs to this OUT; report the others."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    host = _tmp_owner().rsplit("-", 1)[0]
    prefix = f".{base}."
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".packing")):
            continue
        path = os.path.join(parent, name)
        m = _STALE_RE.match(name)
        if m is None or m.group("base") != base:
            report.stale_left.append(f"{path} (from an older fastfeed; remove it if no pack runs)")
        elif m.group("host") != host:
            report.stale_left.append(
                f"{path} (from host {m.group('host')}; remove it if no pack runs there)"
            )
        elif _pid_alive(int(m.group("pid"))):
            report.stale_left.append(f"{path} (process {m.group('pid')} is still running)")
        else:
            shutil.rmtree(path, ignore_errors=True)
            report.stale_removed.append(path)


class _Terminated(BaseException):
    """SIGTERM or SIGHUP arrived during :func:`pack`; unwinds it so cleanup runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


@contextmanager
def _cleanup_on_termination() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into an exception while packing, then die of the signal.

    ``kill``, ``timeout``, Slurm and Docker send SIGTERM; its default action ends the
    process at once and would leave the temporary directory behind. Handlers can only be
    installed on the main thread; elsewhere the next pack cleans up (see
    :func:`_clean_stale`). After the cleanup the caller's own handler (or the default
    action: the process ends by the signal, as without fastfeed) gets the signal.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise _Terminated(signum)

    previous = {}
    for sig in _TERM_SIGNALS:
        old = signal.getsignal(sig)
        if old is signal.SIG_IGN or old is None:
            # Ignored (nohup and friends) or owned by non-Python code: leave it alone.
            continue
        previous[sig] = old
        signal.signal(sig, handler)
    try:
        yield
    except _Terminated as exc:
        for sig, old in previous.items():
            signal.signal(sig, old)
        previous.clear()
        signal.raise_signal(exc.signum)  # the default action ends the process here
        raise  # a handler that returned: unwind the caller as an interruption would
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _move_into_place(tmp: str, out: str, overwrite: bool) -> None:
    if not os.path.lexists(out):
        try:
            os.rename(tmp, out)
        except FileExistsError as exc:
            raise OutputExistsError(f"{out} appeared while packing; not replacing it") from exc
        except OSError as exc:
            if not os.path.lexists(out):
                raise PackError(f"cannot move the packed LMDB to {out}: {exc}") from exc
            if not overwrite:
                raise OutputExistsError(f"{out} appeared while packing; not replacing it") from exc
        else:
            return
    if not overwrite:
        raise OutputExistsError(f"{out} appeared while packing; not replacing it")
    # Replace: move the old output aside first so OUT is never half-written.
    old = tempfile.mkdtemp(
        prefix=f".{os.path.basename(out)}.", suffix=".old", dir=os.path.dirname(out)
    )
    aside = os.path.join(old, "previous")
    os.rename(out, aside)
    try:
        os.rename(tmp, out)
    except OSError as exc:
        os.rename(aside, out)
        raise PackError(f"cannot move the packed LMDB to {out}: {exc}") from exc
    finally:
        shutil.rmtree(old, ignore_errors=True)
