"""LMDBSource under a writer: a map grown by another process, a file replaced or rewritten."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fastfeed.errors import CorruptSourceError, SampleError, SourceChangedError
from fastfeed.loader import Loader
from fastfeed.packing import pack
from fastfeed.sources import LMDBSource
from fastfeed.sources._lmdb_io import MapGuard
from fastfeed.testing import ListSource

_GROW = textwrap.dedent(
    """
    import sys, lmdb
    path, commits, per_commit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    env = lmdb.open(path, map_size=1 << 20, lock=False)
    n = 0
    for c in range(commits):
        env.set_mapsize(env.info()["map_size"] + per_commit * 9000 * 2)
        with env.begin(write=True) as txn:
            for _ in range(per_commit):
                txn.put(b"zz-extra-%08d" % n, bytes([n % 251]) * 8000)
                n += 1
        print(c, flush=True)
    env.sync(True)
    env.close()
    """
)


_FLAGS = ("--overwrite",)


def _small_db(path: Path, n: int = 50) -> list[bytes]:
    payloads = [bytes([i]) * (1000 + i) for i in range(n)]
    pack(ListSource(payloads, [i % 5 for i in range(n)]), path, progress=False, map_bytes=1 << 20)
    return payloads


def _grow(path: Path, commits: int, per_commit: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _GROW, str(path), str(commits), str(per_commit)],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_a_map_grown_by_another_process_is_adopted(tmp_path: Path) -> None:
    path = tmp_path / "db"
    payloads = _small_db(path)
    with LMDBSource(path) as src:
        assert src.read(3).data == payloads[3]
        before = src._entry.env.info()["map_size"]
        proc = _grow(path, commits=1, per_commit=400)  # 3.2 MB past a 1 MiB map
        assert proc.wait(60) == 0
        # Without adopting the map every read failed with MDB_MAP_RESIZED.
        assert [r.data for r in src.read_many(list(range(50)))] == payloads
        assert src.read(49).data == payloads[49]
        assert src._entry.env.info()["map_size"] > before
        # Skip mode delivers every sample (it used to deliver 0 of 50 without an error).
        seen = [i for b in Loader(src, batch_size=8, on_error="skip", num_threads=2) for i in b[1]]
        assert sorted(seen) == [i % 5 for i in sorted(range(50), key=lambda i: i % 5)]
        assert len(seen) == 50


def test_reader_threads_keep_reading_while_a_writer_grows_the_map(tmp_path: Path) -> None:
    path = tmp_path / "db"
    payloads = _small_db(path)
    errors: list[BaseException] = []
    reads = [0]
    stop = threading.Event()
    with LMDBSource(path) as src:

        def reader(k: int) -> None:
            try:
                while not stop.is_set():
                    batch = [(k * 7 + j) % 50 for j in range(16)]
                    assert [r.data for r in src.read_many(batch)] == [payloads[i] for i in batch]
                    reads[0] += 1
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(k,), name=f"t-{k}") for k in range(4)]
        for t in threads:
            t.start()
        try:
            proc = _grow(path, commits=6, per_commit=150)
            assert proc.wait(120) == 0
            time.sleep(0.2)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert not errors, errors[:1]
        assert reads[0] > 0
        assert src._entry.guard.generation >= 1  # the grown map was adopted


def _child_read(src: LMDBSource, conn: Any) -> None:
    out: dict[str, Any] = {}
    try:
        src.read(0)
        out["read"] = "no error"
    except Exception as exc:
        out["read"] = f"{type(exc).__name__}: {exc}"
    try:
        for _ in Loader(src, batch_size=4, on_error="skip", num_threads=0):
            pass
        out["loader"] = "no error"
    except Exception as exc:
        cause = exc.__cause__
        out["loader"] = f"{type(exc).__name__} <- {type(cause).__name__}"
    conn.send(out)
    conn.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_pack_overwrite_under_an_open_source_then_a_forked_reader(tmp_path: Path) -> None:
    path = tmp_path / "db"
    old = _small_db(path)
    new_payloads = [b"NEW" * (100 + i) for i in range(50)]
    pack(ListSource(new_payloads, [4 - i % 5 for i in range(50)]), tmp_path / "v2", progress=False)
    with LMDBSource(path) as src:
        assert src.read(0).data == old[0]
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "fastfeed",
                "pack",
                str(tmp_path / "v2"),
                str(path),
                *_FLAGS,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        ctx = multiprocessing.get_context("fork")
        parent_conn, child_conn = ctx.Pipe()
        proc = ctx.Process(target=_child_read, args=(src, child_conn))
        proc.start()
        assert parent_conn.poll(60)
        got = parent_conn.recv()
        proc.join(30)
        assert got["read"].startswith("SourceChangedError: ")
        assert f"LMDB {path}/data.mdb was replaced since this source opened it" in got["read"]
        assert got["loader"] == "SampleError <- SourceChangedError"  # never skipped
        # This process still reads the file it mapped: old records with old labels.
        assert src.read(0).data == old[0] and src.read(0).label == 0


def test_a_file_rewritten_in_place_is_detected_on_reopen(tmp_path: Path) -> None:
    path = tmp_path / "db"
    _small_db(path)
    pack(ListSource([b"x" * 10] * 50, [1] * 50), tmp_path / "other", progress=False)
    src = LMDBSource(path)
    src.read(0)
    src.close()
    data = (tmp_path / "other" / "data.mdb").read_bytes()
    with open(path / "data.mdb", "r+b") as f:  # same inode, other contents
        f.write(data)
        f.truncate(len(data))
    with pytest.raises(SourceChangedError, match="was rewritten in place"):
        src.read(0)
    with pytest.raises(SampleError) as info:
        next(iter(Loader(src, batch_size=4, on_error="skip", num_threads=0)))
    assert isinstance(info.value.__cause__, SourceChangedError)


def test_a_replaced_file_is_detected_after_close(tmp_path: Path) -> None:
    path = tmp_path / "db"
    _small_db(path)
    src = LMDBSource(path)
    src.read(0)
    src.close()
    pack(ListSource([b"y" * 10] * 50), path, progress=False, overwrite=True)
    with pytest.raises(SourceChangedError, match=r"inode \d+ -> \d+"):
        src.read(0)
    assert len(LMDBSource(path)) == 50  # a new source reads the new file


def test_map_guard_remap_waits_for_readers_and_blocks_new_ones() -> None:
    guard = MapGuard(timeout_s=5.0)
    seen = guard.acquire_read()
    order: list[str] = []

    def remap() -> None:
        guard.remap(seen, lambda: order.append("remap"))

    t = threading.Thread(target=remap, name="t-remap")
    t.start()
    time.sleep(0.1)
    assert order == []  # waits for the reader
    guard.release_read()
    t.join(5)
    assert order == ["remap"] and guard.generation == 1
    guard.remap(seen, lambda: order.append("again"))  # stale generation: skipped
    assert order == ["remap"]
    short = MapGuard(timeout_s=0.1)
    short.acquire_read()
    with pytest.raises(TimeoutError, match=r"did not finish within 0\.1 s"):
        short.remap(0, lambda: None)


def test_a_map_that_grows_again_during_adoption_is_adopted_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lmdb

    from fastfeed.sources import _lmdb_env

    path = tmp_path / "db"
    _small_db(path)
    with LMDBSource(path) as src:
        adopted: list[int] = []
        monkeypatch.setattr(src, "_adopt_grown_map", lambda entry, seen: adopted.append(seen))
        calls = [0]

        def grows_three_times(entry: Any) -> int:
            calls[0] += 1
            if calls[0] <= 3:  # a writer growing the map three times in a row
                raise lmdb.MapResizedError("mdb_txn_begin: MDB_MAP_RESIZED")
            return 42

        assert src._guarded(grows_three_times) == 42
        assert len(adopted) == 3 and calls[0] == 4

        def always_grows(entry: Any) -> int:
            raise lmdb.MapResizedError("mdb_txn_begin: MDB_MAP_RESIZED")

        attempts = _lmdb_env._ADOPT_ATTEMPTS
        with pytest.raises(SourceChangedError, match=f"kept growing .*{attempts} times in a row"):
            src._guarded(always_grows)
        assert len(adopted) == 3 + attempts - 1  # bounded: never a loop without end


class _AheadEnv:
    """An lmdb.Environment whose metadata reports pages a writer allocated but has not
    written yet (the file is shorter than LMDB's allocation mark)."""

    def __init__(self, env: Any, extra_pages: int) -> None:
        self._env, self._extra = env, extra_pages

    def info(self) -> dict[str, Any]:
        info = dict(self._env.info())
        info["last_pgno"] += self._extra
        return info

    def __getattr__(self, name: str) -> Any:
        return getattr(self._env, name)


def test_adopting_a_grown_map_takes_the_file_as_it_is_for_the_truncation_check(
    tmp_path: Path,
) -> None:
    path = tmp_path / "db"
    payloads = _small_db(path)
    data = path / "data.mdb"
    with LMDBSource(path) as src:
        entry = src._entry
        held = data.stat().st_size
        entry.env = _AheadEnv(entry.env, extra_pages=50)
        src._adopt_grown_map(entry, entry.guard.generation)
        # The allocation mark is past the file's end; the file did not shrink: no error
        # (it read "data.mdb shrank" under a loaded CI run), and reads go on.
        assert entry.need_bytes == held
        assert [r.data for r in src.read_many([3, 4])] == payloads[3:5]
        # A real truncation below what was held is still caught before any read.
        os.truncate(data, held - entry.psize)
        with pytest.raises(CorruptSourceError, match=r"data\.mdb shrank"):
            src._check_size()
        entry.env = entry.env._env
