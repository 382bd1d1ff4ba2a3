"""Pack any source (an ImageFolder, a file list, an LMDB, a :class:`Source`) into one LMDB.

On-disk format (``format_version`` 1)
-------------------------------------
The output is an LMDB **directory** (``subdir=True``) holding a single ``data.mdb`` (written
with ``lock=False``, so there is no ``lock.mdb``; :class:`~fastfeed.sources.LMDBSource`
also opens with ``lock=False``). It has one unnamed database with these keys:

``b"0000000000"`` ... ``b"%010d" % (count - 1)``
    The raw record bytes, byte-identical to what the input source returned (unless
    ``max_side`` re-encoded an image). Ten ASCII digits sort in index order.
``b"__fastfeed__"``
    UTF-8 JSON: ``{"format_version": 1, "count": int, "classes": [str] | null,
    "has_labels": bool, "has_paths": bool, "max_side": int | null, "quality": int,
    "writer": "fastfeed <version>"}``.
``b"__fastfeed__/labels"`` (when the input has labels)
    ``count`` little-endian int64 labels; ``-1`` marks a record without a label.
``b"__fastfeed__/paths"``
    UTF-8 JSON list of each record's origin: the path relative to the ImageFolder root or
    file-list folder, the original path carried over from an input LMDB, or the input
    source's :meth:`~fastfeed.sources.Source.describe` text. Error messages quote it.

``_`` sorts after the digits, so a cursor walk meets every record before the metadata.

The values lie in the file in key order (index order): records that are neighbours by
index are neighbours on disk, so :class:`~fastfeed.sources.LMDBSource` reads a run of
consecutive records with one request (``shuffle="block"``). Small values (up to ~2 KB)
live inside B-tree leaf pages, each leaf after the larger values it points to. Pages
reused across write transactions can break the order for records of 2-8 KB; ``pack``
checks the finished file and rewrites it with a compacting copy when it finds any value
out of order (:func:`~fastfeed.sources.lmdb.ensure_key_order`).

Writing is atomic: everything goes to a temporary directory next to the output
(``.OUT.<host>-<pid>-<random>.packing``), which is renamed into place only after a
successful ``sync``; any failure (Ctrl-C, and SIGTERM/SIGHUP when ``pack`` runs on the main
thread) removes the temporary directory and leaves no output. A temporary directory left by
a run that was killed outright (SIGKILL, power loss) is removed by the next ``pack`` to the
same OUT on the same host once its process is gone, and reported otherwise. The map size
starts from an estimate and doubles on ``MapFullError`` (the batch is retried), so no size
needs to be given.

Safety: the input and the output may not overlap (SRC == OUT, OUT inside SRC, SRC inside
OUT are refused, also with ``overwrite``); a symlinked OUT is written through to its target
(the link stays); the output is created with the permissions the umask allows, like
``mkdir``; ``pack`` never touches global state such as warning filters, so it is safe to call
from several threads.

This module holds :func:`pack` and its report; the output's safety (overlap checks,
temporary directory, stale cleanup, signals, atomic move) lives in
:mod:`fastfeed._pack_output`, the per-record checks and re-encoding in
:mod:`fastfeed._pack_records`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import lmdb
import numpy as np

# The `X as X` imports are not used here: re-exported for code that reaches packing.X.
from fastfeed._pack_output import _STALE_RE as _STALE_RE
from fastfeed._pack_output import (
    _check_no_overlap,
    _clean_stale,
    _cleanup_on_termination,
    _make_parent,
    _make_tmp_dir,
    _move_into_place,
)
from fastfeed._pack_output import _tmp_owner as _tmp_owner
from fastfeed._pack_records import _origin, _read_batch, _record_in_bytes, _reencode
from fastfeed._progress import progress_bar
from fastfeed._size import format_size
from fastfeed.errors import (
    ConfigError,
    OutputExistsError,
    PackError,
    SourceError,
)
from fastfeed.sources.base import Source
from fastfeed.sources.files import _WorkerPool
from fastfeed.sources.lmdb import (
    FORMAT_VERSION,
    LABELS_KEY,
    META_KEY,
    PATHS_KEY,
    ensure_key_order,
    record_key,
)
from fastfeed.sources.open import open_source

__all__ = ["PackReport", "pack"]

_MIN_MAP_BYTES = 64 << 20
_BATCH_RECORDS = 64


@dataclass
class PackReport:
    """What :func:`pack` did.

    Attributes:
        output: The output LMDB directory.
        records: Records written.
        skipped: ``(index, where, reason)`` of every input record left out
            (``on_error="skip"``).
        reencoded: Images re-encoded because their longer side exceeded ``max_side``.
        bytes_in: Record bytes read from the input.
        bytes_out: Record bytes written.
        file_bytes: Size of the output ``data.mdb``.
        seconds: Wall time of the whole pack.
        classes: Class names written, or ``None``.
        verified: Records whose image decoded in the ``verify`` / ``max_side`` check.
        stale_removed: Temporary directories of earlier killed runs that were removed.
        stale_left: Temporary directories of other runs left in place (another host, or
            a run still going), with why.
    """

    output: str
    records: int = 0
    skipped: list[tuple[int, str, str]] = field(default_factory=list)
    reencoded: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    file_bytes: int = 0
    seconds: float = 0.0
    classes: list[str] | None = None
    verified: int = 0
    stale_removed: list[str] = field(default_factory=list)
    stale_left: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A few human-readable lines: counts, MB in/out, time, skipped files."""
        mb = 1e6
        rate = self.records / self.seconds if self.seconds > 0 else 0.0
        classes = f", {len(self.classes)} classes" if self.classes else ""
        lines = [
            f"packed {self.records} records{classes} into {self.output} in "
            f"{self.seconds:.1f} s ({rate:.0f} records/s)",
            f"  {self.bytes_in / mb:.1f} MB in, {self.bytes_out / mb:.1f} MB out "
            f"(data.mdb {format_size(self.file_bytes)}), {self.reencoded} re-encoded, "
            f"{len(self.skipped)} skipped",
        ]
        for index, where, reason in self.skipped:
            lines.append(f"  skipped {index} ({where}): {reason}")
        for path in self.stale_removed:
            lines.append(f"  removed {path} (left by a killed pack)")
        for text in self.stale_left:
            lines.append(f"  left {text}")
        return "\n".join(lines)


def pack(
    src: str | os.PathLike[str] | Source,
    out: str | os.PathLike[str],
    *,
    max_side: int | None = None,
    quality: int = 90,
    verify: bool = False,
    workers: int | None = None,
    overwrite: bool = False,
    on_error: str = "raise",
    progress: bool = True,
    map_bytes: int | None = None,
) -> PackReport:
    """Write every record of ``src`` (bytes + label) and its metadata into one LMDB.

    Args:
        src: An ImageFolder root, a file list (``path[<TAB>label]`` lines), an LMDB, or
            any :class:`Source`.
        out: The output LMDB directory (must not exist unless ``overwrite``). Missing
            parent directories are created. A symlink is written through: its target
            becomes the LMDB and the link stays.
        max_side: Re-encode images whose longer side exceeds this many pixels (Pillow,
            aspect kept, JPEG ``quality``); smaller images are copied byte for byte after
            a decode check. ``None`` copies every record unchanged.
        quality: JPEG quality of re-encoded images (1-100).
        verify: Decode every image (at 1/8 scale where JPEG allows) and treat one that
            fails as a bad record, without re-encoding anything. ``max_side`` implies it.
        workers: Threads that decode/re-encode (default: CPU count).
        overwrite: Replace an existing ``out``.
        on_error: ``"raise"`` (stop with :class:`PackError`) or ``"skip"`` (leave the
            record out and list it in the report).
        progress: Show a tqdm bar, then the summary, on stderr.
        map_bytes: Initial LMDB map size; grows automatically (default: from the input).

    Returns:
        A :class:`PackReport`.

    Raises:
        ConfigError: A bad argument, or ``src`` and ``out`` overlap (same path, or one
            inside the other), also with ``overwrite``.
        OutputExistsError: ``out`` exists and ``overwrite`` is false.
        PackError: A record could not be read or decoded (names the file), the output
            cannot be created, or writing failed; no output is left behind.
        SourceError: The input could not be opened.
    """
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    if max_side is not None and max_side < 1:
        raise ConfigError(f"max_side must be a positive number of pixels, not {max_side}")
    if not 1 <= quality <= 100:
        raise ConfigError(f"quality must be in 1..100, not {quality}")
    given = os.path.abspath(os.fspath(out))
    # Write through a symlink (and symlinked parents) to the real location.
    out = os.path.realpath(given)
    if os.path.lexists(out) and not overwrite:
        raise OutputExistsError(f"{given} already exists (pass overwrite=True / --overwrite)")
    _check_no_overlap(src, out)
    parent = os.path.dirname(out)
    _make_parent(parent, given)
    skip = on_error == "skip"
    decode = verify or max_side is not None
    t0 = time.perf_counter()
    report = PackReport(output=given)
    _clean_stale(parent, os.path.basename(out), report)
    owns_source = not isinstance(src, Source)
    source = open_source(src)
    with _cleanup_on_termination():  # outermost: the cleanup below runs first
        pool: _WorkerPool | None = None
        env: lmdb.Environment | None = None
        tmp: str | None = None
        try:
            report.classes = list(source.classes) if source.classes else None
            tmp = _make_tmp_dir(parent, os.path.basename(out))
            if decode:
                pool = _WorkerPool((workers or os.cpu_count() or 1) - 1, "pack")
            env = lmdb.open(
                tmp,
                subdir=True,
                map_size=map_bytes if map_bytes is not None else _MIN_MAP_BYTES,
                lock=False,
                sync=False,
                metasync=False,
                readahead=False,
                meminit=False,
                max_dbs=0,
                mode=0o666,  # data.mdb gets what the umask allows, like any new file
            )
            labels, origins = _write_records(
                env,
                source,
                report,
                pool,
                max_side,
                decode,
                quality,
                skip,
                progress,
                map_bytes is None,
            )
            meta: dict[str, Any] = {
                "format_version": FORMAT_VERSION,
                "count": report.records,
                "classes": report.classes,
                "has_labels": any(x >= 0 for x in labels),
                "has_paths": True,
                "max_side": max_side,
                "quality": quality,
                "writer": f"fastfeed {_version()}",
            }
            extra = {
                META_KEY: json.dumps(meta).encode("utf-8"),
                PATHS_KEY: json.dumps(origins).encode("utf-8"),
            }
            if meta["has_labels"]:
                extra[LABELS_KEY] = np.asarray(labels, dtype="<i8").tobytes()
            _put_batch(env, list(extra.items()))
            env.sync(True)
            env.close()
            env = None
            ensure_key_order(tmp)  # values in key order: LMDBSource reads runs in one request
            report.file_bytes = os.path.getsize(os.path.join(tmp, "data.mdb"))
            _move_into_place(tmp, out, overwrite)
            tmp = None
        except BaseException as exc:
            if env is not None:
                env.close()
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, lmdb.Error):
                raise PackError(f"writing {given} failed: {exc}") from exc
            if isinstance(exc, OSError) and not isinstance(exc, SourceError):
                raise PackError(f"writing {given} failed: {exc.strerror or exc}") from exc
            raise
        finally:
            if pool is not None:
                pool.close()
            if owns_source:
                source.close()
    report.seconds = time.perf_counter() - t0
    if progress:
        print(report.summary(), file=sys.stderr, flush=True)
    return report


def _write_records(
    env: lmdb.Environment,
    source: Source,
    report: PackReport,
    pool: _WorkerPool | None,
    max_side: int | None,
    decode: bool,
    quality: int,
    skip: bool,
    progress: bool,
    estimate_map: bool,
) -> tuple[list[int], list[str]]:
    n = len(source)
    labels: list[int] = []
    origins: list[str] = []
    with progress_bar(total=n, unit="rec", desc="pack", enabled=progress) as bar:
        for start in range(0, n, _BATCH_RECORDS):
            indices = list(range(start, min(n, start + _BATCH_RECORDS)))
            try:
                batch = _read_batch(source, indices, skip)
            except SourceError as exc:
                raise PackError(f"reading the input failed: {exc}") from exc
            if decode:
                batch = _reencode(batch, pool, max_side, quality, report)
            items: list[tuple[bytes, bytes]] = []
            for i, rec in batch:
                if isinstance(rec, BaseException):
                    where = source.describe(i)
                    reason = f"{type(rec).__name__}: {rec}"
                    if not skip:
                        raise PackError(f"record {i} ({where}) failed: {reason}") from rec
                    report.skipped.append((i, where, reason))
                    continue
                report.bytes_in += _record_in_bytes(rec)
                data = rec.data
                items.append((record_key(len(labels) + len(items)), data))
                report.bytes_out += len(data)
            if estimate_map and start == 0 and items:
                # Size the map from the first batch (virtual address space only: the
                # file grows with the data), leaving room for the tail to vary.
                per = report.bytes_out / len(items)
                want = int(per * n * 2) + _MIN_MAP_BYTES
                if want > env.info()["map_size"]:
                    env.set_mapsize(want)
            _put_batch(env, items)
            for i, rec in batch:
                if not isinstance(rec, BaseException):
                    labels.append(-1 if rec.label is None else int(rec.label))
                    origins.append(_origin(source, i))
            report.records = len(labels)
            bar.update(len(indices))
    if not labels:
        raise PackError(f"no record of {source!r} could be packed (all {n} failed)")
    return labels, origins


def _put_batch(env: lmdb.Environment, items: list[tuple[bytes, bytes]]) -> None:
    """Write one batch in one transaction, doubling the map size while it does not fit."""
    while True:
        try:
            with env.begin(write=True) as txn:
                for key, value in items:
                    txn.put(key, value, overwrite=True, append=False)
            return
        except lmdb.MapFullError:
            # The aborted transaction wrote nothing; grow and redo the whole batch.
            env.set_mapsize(env.info()["map_size"] * 2)


def _version() -> str:
    from fastfeed import __version__

    return __version__
