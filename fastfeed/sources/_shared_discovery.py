"""Naming and finding shared cache segments: keys, abstract unix-socket names, /proc.

A segment has no name in any file system (it is an anonymous memfd). Each process that
holds one binds the abstract unix-socket name ``\\0fastfeed-cache/<key>/<pid>/<fd>`` (no
file; the kernel releases it when the process dies), so ``/proc/net/unix`` lists the live
holders of every segment, and a newcomer opens ``/proc/<pid>/fd/<fd>`` of any of them.
Creation is serialised by binding ``\\0fastfeed-cache/<key>/create``. The design is
described in :mod:`fastfeed.sources.shared_cache`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
from typing import Any

from fastfeed.sources._shared_layout import LAYOUT_VERSION, is_segment

__all__ = [
    "bind_abstract",
    "creation_name",
    "holder_name",
    "list_segments",
    "open_existing",
    "segment_key",
]

_PREFIX = "fastfeed-cache/"


def segment_key(identity: tuple[Any, ...], n: int, capacity: int) -> str:
    """The 32-hex-digit name of the segment for a source identity and a capacity."""
    text = repr((LAYOUT_VERSION, identity, n, capacity)).encode()
    return hashlib.sha256(text).hexdigest()[:32]


def holder_name(key: str, pid: int, fd: int) -> str:
    """The abstract name process ``pid`` binds while it holds segment ``key`` as ``fd``."""
    return f"{_PREFIX}{key}/{pid}/{fd}"


def creation_name(key: str) -> str:
    """The abstract name bound while segment ``key`` is being looked for or created."""
    return f"{_PREFIX}{key}/create"


def list_segments() -> dict[str, list[tuple[int, int]]]:
    """Shared cache segments alive on this machine: key -> ``[(pid, fd), ...]`` holders."""
    out: dict[str, list[tuple[int, int]]] = {}
    try:
        with open("/proc/net/unix", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return out
    tag = "@" + _PREFIX
    for line in lines:
        parts = line.split()
        if len(parts) < 8 or not parts[7].startswith(tag):
            continue
        fields = parts[7][len(tag) :].split("/")
        if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
            out.setdefault(fields[0], []).append((int(fields[1]), int(fields[2])))
    return out


def bind_abstract(name: str) -> socket.socket | None:
    """A socket bound to the abstract name ``name``, or ``None`` where it is taken."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind("\0" + name)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            return None
        raise
    return sock


def open_existing(key: str, total_bytes: int) -> int | None:
    """A new descriptor of a live holder's segment ``key``, or ``None`` where none is found.

    Each candidate is checked (:func:`~fastfeed.sources._shared_layout.is_segment`) before
    it is returned; the others are closed again.
    """
    for pid, pfd in list_segments().get(key, []):
        try:
            fd = os.open(f"/proc/{pid}/fd/{pfd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue  # the holder just exited
        if is_segment(fd, key, total_bytes):
            return fd
        os.close(fd)
    return None
