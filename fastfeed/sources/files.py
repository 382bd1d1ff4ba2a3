"""``FileSource``: one record per file (an ImageFolder, a list of paths, a glob or a file list).

Reads use ``os.open`` + ``os.pread`` straight into a ``bytes`` object (one syscall for the
whole file, no Python file object, no buffering layer). :meth:`FileSource.read_many` reads
the files of one call concurrently on a small named thread pool (``fastfeed-read-<n>``),
created lazily, owned by the process that created it, and joined by :meth:`close`: many
outstanding reads keep a disk's queue full, which is what cold reads need.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import threading
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

try:  # POSIX: the open-file limit, named in EMFILE errors
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

from fastfeed.errors import (
    ConfigError,
    EmptySourceError,
    RecordReadError,
    ResourceLimitError,
    SourceNotFoundError,
)
from fastfeed.sources._file_index import glob_paths, index_folder, read_file_list
from fastfeed.sources._worker_pool import _WorkerPool
from fastfeed.sources.base import Record, Source

__all__ = ["IMG_EXTENSIONS", "FileSource"]

#: torchvision's default ``IMG_EXTENSIONS`` (matched case-insensitively, like torchvision).
IMG_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".bmp",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
)

_T = TypeVar("_T")
_FD_LIMIT_ERRNOS = (errno.EMFILE, errno.ENFILE)
# O_NONBLOCK: opening a FIFO (or a device) named like an image must not block; regular
# files ignore the flag (their reads never block on it).
_O_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
    | getattr(os, "O_NONBLOCK", 0)
)


class FileSource(Source):
    """Records are whole files; labels optional.

    ``FileSource(path)`` indexes what ``path`` is: a directory is an ImageFolder root
    (:meth:`from_folder`), a pattern with ``*``, ``?`` or ``[`` that is not an existing
    path is a glob (:meth:`from_glob`), any other file is a file list (:meth:`from_list`).
    A list of paths is used as given, one record per path.

    Args:
        paths: One path to index (see above), or file paths, one per record (kept in
            this order).
        labels: Optional integer labels, one per path.
        classes: Optional class names indexed by label.
        root: Optional common root, used to shorten paths in :meth:`describe` and by ``pack``.
        num_threads: Threads of the concurrent :meth:`read_many` pool (0 reads serially
            in the calling thread).

    Attributes:
        paths: Absolute-or-as-given paths, one per record.
        labels: Labels, or ``None``.
        classes: Class names indexed by label, or ``None``.
        class_to_idx: Class name to label, or ``None``.
        root: The folder the paths came from, or ``None``.

    Raises:
        SourceNotFoundError: A single ``path`` that does not exist.
        EmptySourceError: ``paths`` is empty, or the folder, list or glob finds nothing.
        ConfigError: ``labels`` does not match ``paths`` in length; a single ``path`` that
            is an LMDB (use :class:`~fastfeed.sources.LMDBSource`) or a binary file.
    """

    def __init__(
        self,
        paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        labels: Sequence[int] | None = None,
        *,
        classes: Sequence[str] | None = None,
        root: str | os.PathLike[str] | None = None,
        num_threads: int = 16,
    ) -> None:
        super().__init__()
        if isinstance(paths, (str, bytes, os.PathLike)):
            # One path: index what it is (a folder, a glob, a file list), never iterate
            # its characters.
            if labels is not None or classes is not None or root is not None:
                raise ConfigError(
                    "FileSource(path) takes its labels from the folder or list; pass "
                    "labels/classes/root only with a list of paths"
                )
            indexed = _index_path(os.fsdecode(paths), num_threads)
            paths, labels = indexed.paths, indexed.labels
            classes, root = indexed.classes, indexed.root
        self.paths: list[str] = [os.fspath(p) for p in paths]
        if not self.paths:
            raise EmptySourceError("FileSource got an empty list of paths")
        if labels is not None:
            labels = [int(x) for x in labels]
            if len(labels) != len(self.paths):
                raise ConfigError(
                    f"FileSource got {len(self.paths)} paths but {len(labels)} labels"
                )
        self.labels: list[int] | None = labels
        self.classes = list(classes) if classes is not None else None
        self.class_to_idx: dict[str, int] | None = (
            {c: i for i, c in enumerate(self.classes)} if self.classes is not None else None
        )
        self.root: str | None = os.fspath(root) if root is not None else None
        self.num_threads = int(num_threads)
        self._pool: _WorkerPool | None = None
        self._pool_finalizer: weakref.finalize | None = None
        self._pool_lock = threading.Lock()

    # -- constructors ---------------------------------------------------------------

    @classmethod
    def from_folder(
        cls,
        root: str | os.PathLike[str],
        extensions: Sequence[str] | None = IMG_EXTENSIONS,
        *,
        allow_empty: bool = False,
        num_threads: int = 16,
    ) -> FileSource:
        """Index an ImageFolder root exactly like ``torchvision.datasets.ImageFolder``.

        Classes are the sorted sub-directory names of ``root`` (label = position); files
        are found by ``sorted(os.walk(class_dir, followlinks=True))`` with sorted file
        names, keeping those whose lower-cased name ends with one of ``extensions``.

        Args:
            root: The dataset root with one sub-directory per class.
            extensions: Allowed file endings (case-insensitive); ``None`` keeps every file.
            allow_empty: Accept class folders with no valid file (torchvision raises).
            num_threads: See :class:`FileSource`.

        Raises:
            SourceNotFoundError: ``root`` does not exist.
            EmptySourceError: No class folder, or a class folder with no valid file.
        """
        paths, labels, classes, root = index_folder(root, extensions, allow_empty)
        return cls(paths, labels, classes=classes, root=root, num_threads=num_threads)

    @classmethod
    def from_glob(cls, pattern: str, *, num_threads: int = 16) -> FileSource:
        """Every regular file matching ``pattern`` (``**`` recurses), sorted; no labels.

        Raises:
            EmptySourceError: Nothing matches.
        """
        paths = glob_paths(pattern)
        return cls(paths, num_threads=num_threads)

    @classmethod
    def from_list(cls, list_file: str | os.PathLike[str], *, num_threads: int = 16) -> FileSource:
        """Read a text file of ``path`` or ``path<TAB>label`` lines.

        Relative paths are relative to the list file's folder. Blank lines and lines
        starting with ``#`` are ignored. Either every line has a label or none does.

        Raises:
            SourceNotFoundError: The list file does not exist.
            EmptySourceError: It lists no path.
            ConfigError: A malformed label, or labels on only some lines.
            CorruptSourceError: The file is binary (an image, an archive), not a list.
        """
        paths, labels, base = read_file_list(list_file)
        return cls(paths, labels, root=base, num_threads=num_threads)

    # -- contract -----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        """The file's path, as stored in :attr:`paths`."""
        return self.paths[index]

    def identity(self) -> tuple[Any, ...]:
        """Paths, labels, and each file's size and modification time (for a shared cache).

        Up to 200,000 files every file is stat'ed; beyond, 200,000 spread evenly (a file
        rewritten in place between those is not noticed).
        """
        n = len(self.paths)
        step = max(1, n // 200_000)
        stats: list[tuple[int, int] | None] = []
        for path in self.paths[::step]:
            try:
                st = os.stat(path)
                stats.append((st.st_size, st.st_mtime_ns))
            except OSError:
                stats.append(None)
        digest = hashlib.sha256("\0".join(map(os.path.abspath, self.paths)).encode())
        digest.update(repr((self.labels, stats)).encode())
        return ("FileSource", n, digest.hexdigest())

    def relpath(self, index: int) -> str:
        """The file's path relative to :attr:`root` (the path as given when no root)."""
        path = self.paths[index]
        if self.root is not None:
            try:
                return os.path.relpath(path, self.root)
            except ValueError:  # another drive on Windows
                return path
        return path

    def _read_one(self, index: int) -> Record:
        return Record(self._read_file(index), self.labels[index] if self.labels else None)

    def _read_many(self, indices: Sequence[int]) -> list[Record]:
        indices = list(indices)
        labels = self.labels
        if self.num_threads <= 0 or len(indices) <= 2:
            datas = [self._read_file(i) for i in indices]
        else:
            pool = self._get_pool()
            datas = pool.map(lambda k: self._read_file(indices[k]), len(indices))
        if labels is None:
            return [Record(d, None) for d in datas]
        return [Record(d, labels[i]) for d, i in zip(datas, indices, strict=True)]

    def hint(self, indices: Iterable[int]) -> None:
        """Ask the kernel to start reading these files (``POSIX_FADV_WILLNEED``).

        Advisory: errors are ignored (the read reports them), and on platforms without
        ``posix_fadvise`` this does nothing.
        """
        fadvise = getattr(os, "posix_fadvise", None)
        if fadvise is None:
            return
        n = len(self.paths)
        for i in indices:
            if not 0 <= i < n:
                continue
            try:
                fd = os.open(self.paths[i], _O_FLAGS)
            except OSError:
                continue
            try:
                fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)

    def record_sizes(self) -> list[int]:
        """Size of every file in bytes (``os.stat``), in index order; -1 where stat fails."""
        sizes = []
        for p in self.paths:
            try:
                sizes.append(os.stat(p).st_size)
            except OSError:
                sizes.append(-1)
        return sizes

    def _close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
            fin, self._pool_finalizer = self._pool_finalizer, None
        if fin is not None:
            fin.detach()
        if pool is not None:
            pool.close()

    def _after_fork_in_child(self) -> None:
        # The parent's pool threads do not exist here; forget the pool without joining.
        if self._pool_finalizer is not None:
            self._pool_finalizer.detach()
        self._pool = None
        self._pool_finalizer = None
        self._pool_lock = threading.Lock()

    def _unpicklable(self) -> tuple[str, ...]:
        return ("_pool", "_pool_finalizer")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        del state["_pool_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._pool_lock = threading.Lock()

    def __repr__(self) -> str:
        where = self.root if self.root is not None else f"{len(self)} paths"
        return f"FileSource({where!r}, records={len(self)})"

    # -- helpers --------------------------------------------------------------------

    def _get_pool(self) -> _WorkerPool:
        pool = self._pool
        if pool is None:
            with self._pool_lock:
                if self._pool is None:
                    self._pool = _WorkerPool(self.num_threads, "read")
                    # A source dropped without close() stops its threads when collected.
                    # stop() does not join: the finalizer may run on any thread.
                    self._pool_finalizer = weakref.finalize(self, self._pool.stop)
                pool = self._pool
        return pool

    def _read_file(self, index: int) -> bytes:
        path = self.paths[index]
        try:
            fd = os.open(path, _O_FLAGS)
        except FileNotFoundError as exc:
            if self.root is not None and not os.path.isdir(self.root):
                # The whole source is gone, not one record: never skipped as a bad sample.
                raise SourceNotFoundError(
                    f"cannot read record {index} ({path}): the source's folder {self.root} "
                    "no longer exists (it did when the source was indexed)",
                    path=self.root,
                    index=index,
                ) from exc
            raise RecordReadError(
                f"cannot read record {index}: {path} does not exist (deleted after indexing?)",
                path=path,
                index=index,
            ) from exc
        except PermissionError as exc:
            raise RecordReadError(
                f"cannot read record {index}: permission denied for {path}",
                path=path,
                index=index,
            ) from exc
        except OSError as exc:
            if exc.errno in _FD_LIMIT_ERRNOS:
                raise self._fd_limit_error(index, path, exc) from exc
            raise RecordReadError(
                f"cannot read record {index}: cannot open {path}: {exc.strerror or exc}",
                path=path,
                index=index,
            ) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                what = "is not a regular file (a FIFO, socket or device)"
                cause = None
                if stat.S_ISDIR(st.st_mode):  # what reading it would have raised
                    what = "is a directory"
                    cause = IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
                raise RecordReadError(
                    f"cannot read record {index}: {path} {what}", path=path, index=index
                ) from cause
            size = st.st_size
            data = os.pread(fd, size, 0) if size else b""
            if len(data) < size:  # short read (network file systems): keep reading
                parts = [data]
                got = len(data)
                while got < size:
                    chunk = os.pread(fd, size - got, got)
                    if not chunk:
                        break
                    parts.append(chunk)
                    got += len(chunk)
                data = b"".join(parts)
        except RecordReadError:
            raise
        except OSError as exc:
            raise RecordReadError(
                f"cannot read record {index}: reading {path} failed: {exc.strerror or exc}",
                path=path,
                index=index,
            ) from exc
        finally:
            os.close(fd)
        if not data:
            raise RecordReadError(
                f"cannot read record {index}: {path} is empty (0 bytes)", path=path, index=index
            )
        return data

    def _fd_limit_error(self, index: int, path: str, exc: OSError) -> ResourceLimitError:
        """EMFILE / ENFILE: say which limit was hit and how to raise it; the file is fine."""
        if exc.errno == errno.EMFILE:
            limit, raise_it = "RLIMIT_NOFILE", "`ulimit -n 65536`"
            if resource is not None:
                soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                limit = f"RLIMIT_NOFILE = {_limit_text(soft)}, hard limit {_limit_text(hard)}"
                if hard != resource.RLIM_INFINITY and hard <= soft:
                    # Only root raises a hard limit: limits.conf, LimitNOFILE=, --ulimit.
                    raise_it = (
                        "`ulimit -n` with a higher hard limit (root: /etc/security/"
                        "limits.conf, systemd LimitNOFILE=, docker --ulimit nofile=)"
                    )
                else:
                    target = max(65536, 2 * soft)
                    if hard != resource.RLIM_INFINITY:
                        target = min(hard, target)
                    raise_it = f"`ulimit -n {target}`"
            why = (
                f"this process reached its open-file limit ({limit}). Raise it with "
                f"{raise_it} in the shell that starts training, or lower "
                f"FileSource(num_threads={self.num_threads}) or the loader's num_threads / "
                "prefetch to open fewer files at once"
            )
        else:
            why = (
                "the system-wide open-file table is full (ENFILE; Linux: fs.file-max). "
                "Close other programs' files, raise the system limit "
                "(`sysctl fs.file-max`), or lower the loader's num_threads"
            )
        err = ResourceLimitError(
            f"cannot read record {index}: cannot open {path}: {exc.strerror or exc}: {why}. "
            "The file itself is fine, so this is raised even with on_error='skip'.",
            path=path,
            index=index,
        )
        err.errno = exc.errno  # for `except OSError as e: e.errno == errno.EMFILE`
        return err


def _index_path(path: str, num_threads: int) -> FileSource:
    """``FileSource(path)``: a folder, a glob or a file list, by what ``path`` is."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "data.mdb")):
            raise ConfigError(
                f"{path} is an LMDB directory: open it with LMDBSource({path!r}) "
                "(or fastfeed.open_source)"
            )
        return FileSource.from_folder(path, num_threads=num_threads)
    if os.path.exists(path):
        from fastfeed.sources.open import is_lmdb_file

        if is_lmdb_file(path):
            raise ConfigError(
                f"{path} is an LMDB file: open it with LMDBSource({path!r}) "
                "(or fastfeed.open_source)"
            )
        return FileSource.from_list(path, num_threads=num_threads)
    if set("*?[") & set(path):
        return FileSource.from_glob(path, num_threads=num_threads)
    raise SourceNotFoundError(
        f"FileSource: {path} does not exist (expected an image folder, a file list or a "
        "glob pattern)",
        path=path,
    )


def _limit_text(value: int) -> str:
    if resource is not None and value == resource.RLIM_INFINITY:
        return "unlimited"
    return str(value)
