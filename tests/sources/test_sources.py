"""Sources: one contract for FileSource, LMDBSource and MemoryCache, then each one's specifics."""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import hashlib
import multiprocessing
import os
import pickle
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from fastfeed._size import format_size, parse_size
from fastfeed.errors import (
    ConfigError,
    CorruptSourceError,
    EmptySourceError,
    RecordReadError,
    ResourceLimitError,
    SourceIndexError,
    SourceNotFoundError,
)
from fastfeed.packing import pack
from fastfeed.sources import FileSource, LMDBSource, MemoryCache, Record, Source
from fastfeed.sources import _lmdb_io as lmdb_io
from fastfeed.sources import files as files_mod
from fastfeed.sources import lmdb as lmdb_mod
from fastfeed.testing import ListSource, make_image_folder, run_in_threads

N_CLASSES, PER_CLASS = 3, 4
N = N_CLASSES * PER_CLASS
CLASSES = ["class_000", "class_001", "class_002"]
LABELS = [i // PER_CLASS for i in range(N)]
RELPATHS = [f"class_{i // PER_CLASS:03d}/img_{i:04d}.jpg" for i in range(N)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(
        tmp_path_factory.mktemp("src") / "imgs", N_CLASSES, PER_CLASS, ((64, 64), (48, 48))
    )


@pytest.fixture(scope="module")
def expected(folder: Path) -> list[bytes]:
    return [(folder / rel).read_bytes() for rel in RELPATHS]


@pytest.fixture(scope="module")
def packed(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lmdb") / "train.lmdb"
    pack(folder, out, progress=False)
    return out


KINDS = [
    "files",
    "lmdb",
    "cache-static-files",
    "cache-lru-files",
    "cache-static-lmdb",
    "cache-lru-lmdb",
]


def _build(kind: str, folder: Path, packed: Path, expected: list[bytes]) -> Source:
    base: Source = FileSource.from_folder(folder) if kind.endswith("files") else LMDBSource(packed)
    if kind.startswith("cache"):
        # Half the data fits: both the hit and the miss paths run.
        return MemoryCache(base, capacity=sum(map(len, expected)) // 2, policy=kind.split("-")[1])
    return base


@pytest.fixture(params=KINDS)
def source(request, folder, packed, expected) -> Iterator[Source]:
    src = _build(request.param, folder, packed, expected)
    yield src
    src.close()


def _describes(kind_src: Source, index: int) -> None:
    text = kind_src.describe(index)
    assert RELPATHS[index] in text
    inner = kind_src.source if isinstance(kind_src, MemoryCache) else kind_src
    if isinstance(inner, LMDBSource):
        assert f"key {index:010d}" in text
        assert str(inner.path) in text


# -- the contract ---------------------------------------------------------------------


def test_len_read_labels_classes(source: Source, expected: list[bytes]) -> None:
    assert len(source) == N
    assert source.classes == CLASSES
    for i in range(N):
        rec = source.read(i)
        assert isinstance(rec, Record)
        assert rec.data == expected[i]
        assert rec.label == LABELS[i]
    # again, so a cache answers from RAM now
    assert [source.read(i).data for i in range(N)] == expected


def test_read_many_keeps_order_and_duplicates(source: Source, expected: list[bytes]) -> None:
    order = [5, 0, 11, 5, 3, 3, 7, 1, 10, 2, 9, 4, 6, 8]
    recs = source.read_many(order)
    assert [r.data for r in recs] == [expected[i] for i in order]
    assert [r.label for r in recs] == [LABELS[i] for i in order]
    assert source.read_many([]) == []


def test_describe_names_the_file(source: Source) -> None:
    for i in (0, 7, N - 1):
        _describes(source, i)


def test_index_out_of_range(source: Source) -> None:
    with pytest.raises(SourceIndexError, match=rf"index {N} out of range"):
        source.read(N)
    with pytest.raises(SourceIndexError, match="index -1 out of range"):
        source.read(-1)
    with pytest.raises(SourceIndexError, match=rf"index {N + 3} out of range"):
        source.read_many([0, N + 3])


def test_close_is_idempotent_and_reopens(source: Source, expected: list[bytes]) -> None:
    with source as s:
        assert s is source
        assert s.read_many(list(range(N)))[4].data == expected[4]
    source.close()
    source.close()
    assert source.read(2).data == expected[2]  # reopens lazily


def test_counters_count_records_and_bytes(source: Source, expected: list[bytes]) -> None:
    source.counters.reset()
    source.read_many([1, 2, 3])
    source.read(4)
    snap = source.counters.snapshot()
    assert snap["reads"] == 4
    assert snap["calls"] == 2
    assert snap["bytes"] == sum(len(expected[i]) for i in (1, 2, 3, 4))
    assert snap["time_s"] >= 0.0


def test_hint_accepts_any_indices(source: Source, expected: list[bytes]) -> None:
    source.hint(range(N))
    source.hint([N + 5, -1])  # out of range: ignored, a hint is advisory
    assert source.read_many([0, 1])[1].data == expected[1]


def test_pickle_round_trip(source: Source, expected: list[bytes]) -> None:
    source.read_many([0, 1, 2])  # open handles (and a thread pool) first
    clone = pickle.loads(pickle.dumps(source))
    try:
        assert len(clone) == N
        assert [r.data for r in clone.read_many(list(range(N)))] == expected
        _describes(clone, 3)
    finally:
        clone.close()


def _child_hashes(src: Source, indices: list[int]) -> list[str]:
    try:
        one = [hashlib.sha256(src.read(i).data).hexdigest() for i in indices]
        many = [hashlib.sha256(r.data).hexdigest() for r in src.read_many(indices)]
        assert one == many
        return many
    finally:
        src.close()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_reads_in_child_process(source: Source, expected: list[bytes], method: str) -> None:
    source.read_many(list(range(N)))  # parent has open handles and threads at fork time
    indices = [11, 0, 5, 6, 3]
    ctx = multiprocessing.get_context(method)
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
        got = ex.submit(_child_hashes, source, indices).result(timeout=120)
    assert got == [hashlib.sha256(expected[i]).hexdigest() for i in indices]
    assert source.read(6).data == expected[6]  # the parent is unaffected


def _read_in_forked_child(src: Source, conn) -> None:
    conn.send(hashlib.sha256(src.read(3).data).hexdigest())
    conn.close()


def test_fork_while_another_thread_holds_the_locks(source: Source, expected: list[bytes]) -> None:
    source.read(0)
    source._pid = -1  # make the child take the open path (and so the open lock)
    ctx = multiprocessing.get_context("fork")
    parent_conn, child_conn = ctx.Pipe()
    with source._open_lock, source.counters._lock:
        proc = ctx.Process(target=_read_in_forked_child, args=(source, child_conn))
        proc.start()
    try:
        assert parent_conn.poll(30), "child deadlocked on a lock held at fork time"
        assert parent_conn.recv() == hashlib.sha256(expected[3]).hexdigest()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    assert proc.exitcode == 0
    source._pid = None
    assert source.read(3).data == expected[3]


def test_sixteen_reader_threads(source: Source, expected: list[bytes]) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(16, timeout=30)

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            barrier.wait()
            for _ in range(20):
                batch = [rng.randrange(N) for _ in range(rng.randint(1, 8))]
                got = source.read_many(batch)
                assert [r.data for r in got] == [expected[i] for i in batch]
                i = rng.randrange(N)
                assert source.read(i).data == expected[i]
        except BaseException as exc:
            errors.append(exc)

    run_in_threads(reader, 16)
    assert errors == []
    assert source.counters.snapshot()["calls"] == 16 * 40


# -- FileSource -----------------------------------------------------------------------


def test_from_folder_matches_torchvision_layout(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for rel in ["b/2.jpg", "b/1.PNG", "b/sub/0.jpeg", "a/z.webp", "a/notes.txt", "c/x.JPG"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x" + rel.encode())
    (root / "loose.jpg").write_bytes(b"not in a class folder")
    src = FileSource.from_folder(root)
    assert src.classes == ["a", "b", "c"]
    assert src.class_to_idx == {"a": 0, "b": 1, "c": 2}
    rel = [os.path.relpath(p, root) for p in src.paths]
    assert rel == ["a/z.webp", "b/1.PNG", "b/2.jpg", "b/sub/0.jpeg", "c/x.JPG"]
    assert src.labels == [0, 1, 1, 1, 2]
    assert src.relpath(3) == "b/sub/0.jpeg"
    only_txt = FileSource.from_folder(root, extensions=(".txt",), allow_empty=True)
    assert only_txt.paths == [str(root / "a" / "notes.txt")]


def test_from_folder_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(SourceNotFoundError, match=str(missing)):
        FileSource.from_folder(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EmptySourceError, match=f"no class folders found in {empty}"):
        FileSource.from_folder(empty)
    (empty / "cats").mkdir()
    (empty / "dogs").mkdir()
    (empty / "dogs" / "a.jpg").write_bytes(b"x")
    with pytest.raises(EmptySourceError, match="classes cats in"):
        FileSource.from_folder(empty)
    assert FileSource.from_folder(empty, allow_empty=True).labels == [1]
    with pytest.raises(EmptySourceError, match="empty list"):
        FileSource([])
    with pytest.raises(ConfigError, match="2 paths but 1 labels"):
        FileSource(["a", "b"], [0])


def test_from_list_and_glob(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    for name in ("a.bin", "b.bin", "c.dat"):
        (tmp_path / "d" / name).write_bytes(name.encode())
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\nd/b.bin\t1\n\n" + f"{tmp_path / 'd' / 'a.bin'}\t0\n")
    src = FileSource.from_list(listing)
    assert [r.data for r in src.read_many([0, 1])] == [b"b.bin", b"a.bin"]
    assert src.labels == [1, 0]
    assert src.relpath(0) == os.path.join("d", "b.bin")
    unlabeled = tmp_path / "plain.txt"
    unlabeled.write_text("d/c.dat\n")
    assert FileSource.from_list(unlabeled).read(0) == Record(b"c.dat", None)
    bad = tmp_path / "bad.txt"
    bad.write_text("d/a.bin\tcat\n")
    with pytest.raises(ConfigError, match=r"bad.txt:1: label 'cat'"):
        FileSource.from_list(bad)
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("d/a.bin\t0\nd/b.bin\n")
    with pytest.raises(ConfigError, match="some lines have a label"):
        FileSource.from_list(mixed)
    with pytest.raises(SourceNotFoundError, match=r"missing\.txt"):
        FileSource.from_list(tmp_path / "missing.txt")
    globbed = FileSource.from_glob(str(tmp_path / "d" / "*.bin"))
    assert [os.path.basename(p) for p in globbed.paths] == ["a.bin", "b.bin"]
    assert globbed.labels is None
    with pytest.raises(EmptySourceError, match=r"\*.png"):
        FileSource.from_glob(str(tmp_path / "*.png"))


@pytest.fixture
def three_files(tmp_path: Path) -> Iterator[FileSource]:
    paths = []
    for k in range(3):
        p = tmp_path / f"f{k}.bin"
        p.write_bytes(bytes([k + 1]) * (1000 * (k + 1)))
        paths.append(p)
    src = FileSource(paths, [0, 1, 2], num_threads=4)
    yield src
    src.close()


def test_zero_byte_file_is_an_error(three_files: FileSource) -> None:
    Path(three_files.paths[1]).write_bytes(b"")
    with pytest.raises(RecordReadError, match=rf"record 1: {three_files.paths[1]} is empty"):
        three_files.read(1)
    with pytest.raises(RecordReadError, match=rf"{three_files.paths[1]} is empty") as info:
        three_files.read_many([0, 1, 2])
    assert info.value.path == three_files.paths[1]
    assert info.value.index == 1


def test_deleted_after_indexing(three_files: FileSource) -> None:
    os.unlink(three_files.paths[2])
    with pytest.raises(RecordReadError, match=rf"{three_files.paths[2]} does not exist") as info:
        three_files.read_many([0, 1, 2])
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_permission_denied(three_files: FileSource, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root ignores file modes, so inject the error the kernel would give a normal user.
    real_open = os.open
    denied = three_files.paths[0]

    def fake_open(path, flags, *args, **kwargs):
        if os.fspath(path) == denied:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(files_mod.os, "open", fake_open)
    with pytest.raises(RecordReadError, match=f"permission denied for {denied}"):
        three_files.read(0)
    assert three_files.read(1).data == b"\x02" * 2000


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE])
def test_open_file_limit_is_a_resource_limit_error(
    three_files: FileSource, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    real_open = os.open
    limited = three_files.paths[2]

    def fake_open(path, flags, *args, **kwargs):
        if os.fspath(path) == limited:
            raise OSError(code, os.strerror(code), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(files_mod.os, "open", fake_open)
    monkeypatch.setattr(files_mod.resource, "getrlimit", lambda _which: (64, 4096))
    with pytest.raises(ResourceLimitError) as info:
        three_files.read_many([0, 1, 2])
    err = info.value
    assert isinstance(err, RecordReadError) and isinstance(err, OSError)
    assert (err.errno, err.path, err.index) == (code, limited, 2)
    text = str(err)
    assert text.startswith(f"cannot read record 2: cannot open {limited}: {os.strerror(code)}")
    if code == errno.EMFILE:
        assert "open-file limit (RLIMIT_NOFILE = 64, hard limit 4096)" in text
        assert "`ulimit -n 4096`" in text and "FileSource(num_threads=4)" in text
    else:
        assert "system-wide open-file table is full" in text and "fs.file-max" in text
    assert "raised even with on_error='skip'" in text


def test_emfile_at_the_hard_limit_says_root_must_raise_it(
    three_files: FileSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_open(path, flags, *args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files", path)

    monkeypatch.setattr(files_mod.os, "open", fake_open)
    monkeypatch.setattr(files_mod.resource, "getrlimit", lambda _which: (1024, 1024))
    with pytest.raises(ResourceLimitError, match="RLIMIT_NOFILE = 1024, hard limit 1024") as info:
        three_files.read(0)
    assert "higher hard limit" in str(info.value) and "limits.conf" in str(info.value)


def test_file_read_pool_threads_are_named_and_joined(three_files: FileSource) -> None:
    three_files.read_many([0, 1, 2, 0, 1, 2])
    names = {t.name for t in threading.enumerate()}
    assert {"fastfeed-read-0", "fastfeed-read-1"} <= names
    three_files.close()
    assert not any(t.name.startswith("fastfeed-read-") for t in threading.enumerate())


def test_file_hint_fadvises_willneed(
    three_files: FileSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(files_mod.os, "posix_fadvise", lambda fd, o, n, a: calls.append((o, n, a)))
    three_files.hint([2, 0, 7])
    assert calls == [(0, 0, os.POSIX_FADV_WILLNEED)] * 2


# -- LMDBSource -----------------------------------------------------------------------


def test_lmdb_missing_path_is_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "nope.lmdb"
    with pytest.raises(SourceNotFoundError, match=str(missing)):
        LMDBSource(missing)
    assert not missing.exists()


def test_lmdb_not_an_lmdb(tmp_path: Path, folder: Path) -> None:
    with pytest.raises(CorruptSourceError, match=f"{folder} is not an LMDB"):
        LMDBSource(folder)
    empty_dir = tmp_path / "e.lmdb"
    empty_dir.mkdir()
    (empty_dir / "data.mdb").write_bytes(b"")
    with pytest.raises(CorruptSourceError, match=rf"{empty_dir}/data.mdb is not an LMDB"):
        LMDBSource(empty_dir)
    rnd = tmp_path / "r.lmdb"
    rnd.mkdir()
    (rnd / "data.mdb").write_bytes(random.Random(0).randbytes(64 * 1024))
    with pytest.raises(CorruptSourceError, match=str(rnd)):
        LMDBSource(rnd)
    jpg = folder / RELPATHS[0]
    with pytest.raises(CorruptSourceError, match=str(jpg)):
        LMDBSource(jpg)


def test_lmdb_truncated_data_file(tmp_path: Path, packed: Path) -> None:
    cut = tmp_path / "cut.lmdb"
    cut.mkdir()
    data = (packed / "data.mdb").read_bytes()
    assert len(data) > 4 * 4096
    (cut / "data.mdb").write_bytes(data[: 3 * 4096])
    with pytest.raises(CorruptSourceError, match=rf"{cut}/data.mdb is truncated"):
        LMDBSource(cut)


_SHRUNK_CHILD = """
import os, shutil
import lmdb
from fastfeed.errors import CorruptSourceError
from fastfeed.sources import LMDBSource
env = lmdb.open(PACKED, readonly=True, lock=False)
print("NEED", (env.info()["last_pgno"] + 1) * env.stat()["psize"])  # what the map needs
env.close()
shutil.copytree(PACKED, COPY)
src = LMDBSource(COPY)
os.truncate(os.path.join(COPY, "data.mdb"), 3 * 4096)
src.hint(range(len(src)))  # advisory: must neither fault nor raise
print("HINT-OK")
for name, call in [("read_many", lambda: src.read_many(list(range(len(src))))),
                   ("record_sizes", src.record_sizes)]:
    try:
        call()
        print(name, "READ")
    except CorruptSourceError as exc:
        print(name, "ERROR", exc)
"""


def test_lmdb_shrunk_after_open_read_many_hint_and_sizes(tmp_path: Path, packed: Path) -> None:
    # In a child: without the check the process would die with SIGBUS.
    from fastfeed.testing import run_child

    copy = tmp_path / "copy.lmdb"
    code = f"PACKED, COPY = {str(packed)!r}, {str(copy)!r}\n" + _SHRUNK_CHILD
    res = run_child(code, timeout_s=60)
    assert res.returncode == 0, f"rc={res.returncode}\n{res.stderr[-2000:]}"
    lines = res.stdout.splitlines()
    assert lines[0].startswith("NEED ") and lines[1] == "HINT-OK", lines
    need = int(lines[0].split()[1])
    assert need > 3 * 4096
    expected = (
        f"ERROR LMDB {copy}/data.mdb is truncated: data.mdb shrank from {need} to "
        f"{3 * 4096} bytes since it was opened"
    )
    assert lines[2].startswith(f"read_many {expected}"), lines
    assert lines[3].startswith(f"record_sizes {expected}"), lines


def test_lmdb_single_file_form(packed: Path, expected: list[bytes]) -> None:
    with LMDBSource(packed / "data.mdb", readahead=False, max_readers=8) as src:
        assert src.read(4).data == expected[4]
        assert src.origins == RELPATHS
        assert src.class_to_idx == {c: i for i, c in enumerate(CLASSES)}


def test_lmdb_foreign_database(tmp_path: Path) -> None:
    path = tmp_path / "foreign.lmdb"
    with lmdb.open(str(path), map_size=1 << 20) as env, env.begin(write=True) as txn:
        for key in (b"b", b"a", b"c"):
            txn.put(key, b"value-" + key)
    with LMDBSource(path) as src:
        assert len(src) == 3
        assert [r.data for r in src.read_many([0, 1, 2])] == [b"value-a", b"value-b", b"value-c"]
        assert src.read(1).label is None
        assert src.describe(2) == f"{path} key c"


def test_lmdb_missing_and_empty_records(tmp_path: Path) -> None:
    path = tmp_path / "holes.lmdb"
    meta = b'{"format_version": 1, "count": 3, "classes": null}'
    with lmdb.open(str(path), map_size=1 << 20) as env, env.begin(write=True) as txn:
        txn.put(lmdb_mod.META_KEY, meta)
        txn.put(lmdb_mod.record_key(0), b"ok")
        txn.put(lmdb_mod.record_key(1), b"")
    with LMDBSource(path) as src:
        assert src.read(0).data == b"ok"
        with pytest.raises(RecordReadError, match=rf"{path} key 0000000001 is empty"):
            src.read(1)
        with pytest.raises(RecordReadError, match=rf"{path} key 0000000002 is missing"):
            src.read_many([0, 2])


def test_lmdb_bad_metadata(tmp_path: Path) -> None:
    path = tmp_path / "v9.lmdb"
    with lmdb.open(str(path), map_size=1 << 20) as env, env.begin(write=True) as txn:
        txn.put(lmdb_mod.META_KEY, b'{"format_version": 9, "count": 1}')
    with pytest.raises(CorruptSourceError, match=f"{path} has fastfeed format version 9"):
        LMDBSource(path)


def _nothing_resident(addr: int, length: int, vec: ctypes.Array) -> int:
    """A mincore that reports every page of the range as not in memory."""
    ctypes.memset(vec, 0, ctypes.sizeof(vec))
    return 0


def test_lmdb_hint_leaves_scattered_records_to_the_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full shuffle's batch is read cold with exact concurrent preads; hinting its
    # records made the batch look warm to read_many's probe (then faulted page by page).
    payloads = [random.Random(k).randbytes(20_000 + k) for k in range(6)]
    path = tmp_path / "big.lmdb"
    pack(ListSource(payloads), path, progress=False)
    monkeypatch.setattr(lmdb_io, "_mincore", _nothing_resident)
    with LMDBSource(path, read_runs=True, run_bytes=1) as src:  # runs of one record
        src.hint([3, 5, 99])
        assert src._pool is None  # nothing was submitted to the read pool
        assert src.read(5).data == payloads[5]


def test_lmdb_hint_pages_in_whole_runs(tmp_path: Path) -> None:
    payloads = [random.Random(k).randbytes(5_000 + k) for k in range(40)]
    path = tmp_path / "runs.lmdb"
    pack(ListSource(payloads), path, progress=False)
    with LMDBSource(path, read_runs=True, run_bytes=50_000) as src:
        r = src.run_records
        assert 4 <= r < 20
        paged: list[int] = []
        src._page_in_run = paged.append  # type: ignore[method-assign]
        src.hint([0, 1, 2, 3, r, r + 1, r + 2, r + 3])  # 4 records in each of runs 0 and 1
        deadline = time.monotonic() + 10
        while len(paged) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(paged) == [0, 1]
    with LMDBSource(path, run_bytes=50_000) as src:  # read_runs off: hints do nothing
        src.hint(range(40))
        assert src._pool is None


# -- MemoryCache ----------------------------------------------------------------------


def _uniform(n: int, size: int = 1000) -> ListSource:
    return ListSource([bytes([i % 256]) * size for i in range(n)], [i % 3 for i in range(n)])


@pytest.mark.parametrize("capacity", [7000, 7999])
def test_static_hit_rate_is_capacity_over_dataset(capacity: int) -> None:
    cache = MemoryCache(_uniform(20), capacity=capacity, policy="static")
    rng = random.Random(1)
    for _ in range(3):
        order = list(range(20))
        rng.shuffle(order)
        cache.reset_stats()
        for k in range(0, 20, 6):
            cache.read_many(order[k : k + 6])
    stats = cache.cache_stats()
    assert stats["hit_rate"] == pytest.approx(7 / 20)
    assert (stats["hits"], stats["misses"]) == (7, 13)
    assert (stats["entries"], stats["bytes_cached"], stats["evictions"]) == (7, 7000, 0)


def test_static_never_evicts_first_comers() -> None:
    cache = MemoryCache(_uniform(10), capacity="3000", policy="static")
    cache.read_many([4, 8, 1])
    cache.read_many([0, 2, 3, 5])
    assert cache.cached_indices() == [1, 4, 8]
    assert cache.read(8).data == b"\x08" * 1000


def test_lru_evicts_least_recently_used() -> None:
    src = _uniform(10)
    cache = MemoryCache(src, capacity=3000, policy="lru")
    cache.read_many([0, 1, 2])
    cache.read(0)  # 1 is now the least recently used
    cache.read(3)
    assert cache.cached_indices() == [2, 0, 3]
    cache.read_many([2, 4])
    assert cache.cached_indices() == [3, 2, 4]
    stats = cache.cache_stats()
    assert (stats["hits"], stats["misses"], stats["evictions"]) == (2, 5, 2)
    assert stats["bytes_cached"] == 3000
    src.counters.reset()
    assert cache.read_many([2, 3, 4])[0].data == b"\x02" * 1000
    assert src.counters.snapshot()["reads"] == 0  # all hits


def test_preload_fills_until_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    for policy in ("static", "lru"):
        src = _uniform(10)
        cache = MemoryCache(src, capacity="4.5KB", policy=policy)
        assert cache.capacity_bytes == 4500
        assert cache.preload(progress=False, batch=3) == 4
        assert cache.cached_indices() == [0, 1, 2, 3]
        assert cache.preload(progress=False) == 0
        src.counters.reset()
        cache.read_many([0, 3])
        assert src.counters.snapshot()["reads"] == 0


class _HintRecorder(ListSource):
    def __init__(self, n: int) -> None:
        super().__init__([b"x" * 10] * n)
        self.hints: list[list[int]] = []

    def hint(self, indices) -> None:
        self.hints.append(list(indices))


@pytest.mark.parametrize("policy", ["static", "lru"])
def test_cache_hints_only_misses(policy: str) -> None:
    src = _HintRecorder(6)
    cache = MemoryCache(src, capacity=100, policy=policy)
    cache.read_many([1, 4])
    cache.hint([0, 1, 2, 4, 99])
    assert src.hints == [[0, 2]]
    cache.hint([1, 4])
    assert src.hints == [[0, 2]]


def test_cache_pickle_sends_no_data_and_config_errors() -> None:
    cache = MemoryCache(_uniform(5), capacity="1KiB")
    assert cache.capacity_bytes == 1024
    cache.read(0)
    clone = pickle.loads(pickle.dumps(cache))
    assert clone.cache_stats()["entries"] == 0
    assert clone.read(0).data == b"\x00" * 1000
    with pytest.raises(ConfigError, match="policy"):
        MemoryCache(_uniform(2), capacity=10, policy="fifo")
    with pytest.raises(ConfigError, match="cannot parse size '8 parsecs'"):
        MemoryCache(_uniform(2), capacity="8 parsecs")
    with pytest.raises(ConfigError, match="wraps a Source"):
        MemoryCache([b"x"], capacity=10)  # type: ignore[arg-type]


def test_lru_under_sixteen_threads_stays_in_budget() -> None:
    src = _uniform(50, size=100)
    cache = MemoryCache(src, capacity=1000, policy="lru")
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(200):
                batch = [rng.randrange(50) for _ in range(4)]
                assert [r.data[0] for r in cache.read_many(batch)] == batch
        except BaseException as exc:
            errors.append(exc)

    run_in_threads(work, 16)
    assert errors == []
    stats = cache.cache_stats()
    assert stats["bytes_cached"] == 100 * stats["entries"] <= 1000
    assert len(cache.cached_indices()) == stats["entries"]
    assert stats["hits"] + stats["misses"] == 16 * 200 * 4


# -- sizes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [("8GiB", 8 << 30), ("512MB", 512_000_000), ("1.5G", 3 << 29), (" 64 k ", 65536), (10, 10)],
)
def test_parse_size(text: str | int, nbytes: int) -> None:
    assert parse_size(text) == nbytes


def test_parse_size_rejects_and_format() -> None:
    for bad in ("-1GB", "GB", "1XB", True, -5, None):
        with pytest.raises(ConfigError):
            parse_size(bad)  # type: ignore[arg-type]
    assert format_size(1536) == "1.5 KiB"
    assert format_size(512) == "512 B"


# -- failures that are not the sample's fault are never skipped ---------------------------


class _BrokenAt(ListSource):
    """Reads of ``fail_at`` raise ``error_type`` (a source-level failure)."""

    def __init__(self, n: int, fail_at: int, error_type: type[Exception]) -> None:
        super().__init__([bytes([i % 256]) * 4 for i in range(n)], fail_at=[fail_at])
        self.error_type = error_type

    def _read_one(self, index: int) -> Record:
        if index in self.fail_at:
            raise self.error_type(f"injected at {self.describe(index)}", path="p", index=index)
        return super()._read_one(index)


@pytest.mark.parametrize(
    ("error_type", "skipped"),
    [(RecordReadError, True), (ResourceLimitError, False), (CorruptSourceError, False)],
)
def test_skip_mode_skips_bad_records_but_raises_source_level_errors(
    error_type: type[Exception], skipped: bool
) -> None:
    from fastfeed.errors import SampleError
    from fastfeed.loader import Loader

    src = _BrokenAt(16, 5, error_type)
    with Loader(src, None, batch_size=4, num_threads=0, on_error="skip") as loader:
        if skipped:
            got = [b for batch in loader for b in batch.data]
            assert len(got) == 15 and [s.index for s in loader.skipped] == [5]
        else:
            with pytest.raises(SampleError, match=r"sample 5 \(list\[5\]\) failed in stage 'read'"):
                list(loader)
            assert loader.skipped == []
