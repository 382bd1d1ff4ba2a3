"""open_source() (one dispatcher, single-file LMDB) and FileSource(path) by what the path is."""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path

import lmdb
import pytest

from fastfeed.errors import ConfigError, CorruptSourceError, SourceNotFoundError
from fastfeed.packing import pack
from fastfeed.sources import FileSource, LMDBSource, open_source
from fastfeed.sources.files import _WorkerPool
from fastfeed.testing import make_image_folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "imgs", 2, 3, ((32, 32), (32, 32)))


def _single_file_lmdb(path: Path, payloads: list[bytes]) -> Path:
    env = lmdb.open(str(path), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        for i, p in enumerate(payloads):
            txn.put(b"k%02d" % i, p)
    env.close()
    return path


def test_open_source_single_file_lmdb_any_name(tmp_path: Path) -> None:
    for name in ("train.lmdb", "train.db", "noext"):
        path = _single_file_lmdb(tmp_path / name, [b"a", b"bb", b"ccc"])
        with open_source(path) as src:
            assert isinstance(src, LMDBSource)
            assert [src.read(i).data for i in range(3)] == [b"a", b"bb", b"ccc"]


def test_open_source_dispatch_folder_list_lmdb_dir_glob(folder: Path, tmp_path: Path) -> None:
    with open_source(folder) as src:
        assert isinstance(src, FileSource) and src.classes == ["class_000", "class_001"]
    listing = tmp_path / "list.txt"
    listing.write_text("imgs/class_000/img_0000.jpg\t5\n")
    with open_source(listing) as src:
        assert isinstance(src, FileSource) and src.labels == [5]
    pack(folder, tmp_path / "o.lmdb", progress=False)
    with open_source(tmp_path / "o.lmdb") as src:
        assert isinstance(src, LMDBSource) and len(src) == 6
    with open_source(str(folder / "class_001" / "*.jpg")) as src:  # img_0003..0005
        assert isinstance(src, FileSource) and len(src) == 3
    with pytest.raises(SourceNotFoundError, match="nope"):
        open_source(tmp_path / "nope")


def test_open_source_rejects_a_single_image_in_one_line(folder: Path) -> None:
    jpg = folder / "class_000" / "img_0000.jpg"
    with pytest.raises(CorruptSourceError, match="is a binary file, not a file list") as info:
        open_source(jpg)
    assert info.value.path == str(jpg)


def test_file_list_with_non_utf8_names_keeps_them(tmp_path: Path, folder: Path) -> None:
    name = os.fsdecode(b"caf\xe9.jpg")
    (tmp_path / name).write_bytes((folder / "class_000" / "img_0000.jpg").read_bytes())
    listing = tmp_path / "latin1.txt"
    listing.write_bytes(b"caf\xe9.jpg\n")
    with FileSource.from_list(listing) as src:
        assert src.paths == [str(tmp_path / name)]
        assert src.read(0).data[:2] == b"\xff\xd8"


def test_filesource_of_one_path_does_what_the_path_is(folder: Path, tmp_path: Path) -> None:
    with FileSource(folder) as src:  # a directory: ImageFolder indexing
        assert len(src) == 6 and src.labels == [0, 0, 0, 1, 1, 1]
        assert src.classes == ["class_000", "class_001"] and src.root == str(folder)
    with FileSource(str(folder)) as src:
        assert len(src) == 6
    with FileSource(str(folder / "*" / "img_000[14].jpg")) as src:  # a glob
        assert [os.path.basename(p) for p in src.paths] == ["img_0001.jpg", "img_0004.jpg"]
        assert src.labels is None
    listing = tmp_path / "files.txt"
    listing.write_text("imgs/class_001/img_0002.jpg\n")
    with FileSource(listing) as src:  # a text file: a file list
        assert src.paths == [str(folder / "class_001" / "img_0002.jpg")]
    paths = [str(folder / "class_000" / "img_0000.jpg")]
    with FileSource(paths) as src:  # a list stays a list
        assert src.paths == paths


def test_filesource_missing_path_and_misuse(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError, match=f"FileSource: {tmp_path / 'train'} does not"):
        FileSource(str(tmp_path / "train"))
    with pytest.raises(ConfigError, match="labels"):
        FileSource(str(folder), labels=[0])
    pack(folder, tmp_path / "o.lmdb", progress=False)
    with pytest.raises(ConfigError, match="is an LMDB directory: open it with LMDBSource"):
        FileSource(tmp_path / "o.lmdb")
    single = _single_file_lmdb(tmp_path / "one.mdb", [b"x"])
    with pytest.raises(ConfigError, match="is an LMDB file"):
        FileSource(single)


def test_lmdbsource_on_an_image_folder_points_to_filesource(folder: Path) -> None:
    with pytest.raises(CorruptSourceError, match="use FileSource"):
        LMDBSource(folder)


def _read_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fastfeed-read-")]


def _wait_for(cond, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_read_threads_end_when_the_source_is_collected(folder: Path) -> None:
    before = len(_read_threads())
    for _ in range(5):  # five validation sources rebuilt and dropped without close()
        src = FileSource(folder, num_threads=4)
        assert len(src.read_many(range(6))) == 6
        del src
    gc.collect()
    assert _wait_for(lambda: len(_read_threads()) == before), _read_threads()


def test_idle_pool_threads_time_out_and_come_back() -> None:
    pool = _WorkerPool(3, "idletest", idle_s=0.2)
    try:
        assert pool.map(lambda k: k * k, 8) == [k * k for k in range(8)]
        assert len(pool.threads()) == 3
        assert _wait_for(lambda: not pool.threads(), 5.0)
        assert pool.map(lambda k: k + 1, 4) == [1, 2, 3, 4]  # restarted on demand
        assert 1 <= len(pool.threads()) <= 3
    finally:
        pool.close()
    assert not pool.threads()


def test_worker_pool_submit_runs_background_jobs_and_refuses_after_stop():
    import threading as _threading

    pool = _WorkerPool(2, "submittest", idle_s=0.2)
    done = _threading.Event()
    seen: list[str] = []

    def job() -> None:
        seen.append(_threading.current_thread().name)
        done.set()

    def failing() -> None:
        raise RuntimeError("advisory work may fail")

    assert pool.submit(failing)  # dropped, and the pool keeps working
    assert pool.submit(job)
    assert done.wait(5)
    assert seen[0].startswith("fastfeed-submittest-")
    pool.close()
    assert pool.submit(job) is False
    assert _WorkerPool(0, "none").submit(job) is False


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_named_like_an_image_fails_its_read_instead_of_blocking(tmp_path: Path) -> None:
    from fastfeed.errors import RecordReadError

    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    (root / "a" / "000.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    os.mkfifo(root / "a" / "001.jpg")  # no writer: a blocking open would wait forever
    source = FileSource.from_folder(root)
    assert source.read(0).data.startswith(b"\xff\xd8")
    done: list[BaseException] = []

    def read_fifo() -> None:
        try:
            source.read(1)
        except BaseException as exc:
            done.append(exc)

    reader = threading.Thread(target=read_fifo, daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive() and len(done) == 1
    assert isinstance(done[0], RecordReadError)
    assert "001.jpg is not a regular file (a FIFO, socket or device)" in str(done[0])
    source.hint([0, 1])  # read-ahead hints must not block on it either
    source.close()
