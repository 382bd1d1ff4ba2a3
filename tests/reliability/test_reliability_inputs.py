"""The bad-input matrix: every broken record fails typed and named, or is skipped exactly.

Each case plants one bad record at index ``BAD`` among colour-coded JPEGs (decoded pixels
name their index) and runs FileSource / LMDBSource + Loader + the fused image transform:

- ``on_error="raise"``: :class:`SampleError` naming the index, the path or key and the
  stage, with the original exception chained, after exactly the batches before it.
- ``on_error="skip"``: every other sample delivered exactly once with its own pixels,
  ``loader.skipped`` is exactly ``[BAD]`` with the same where/stage, batches shrink.

Whole-source failures (an LMDB that is missing, random bytes, empty or truncated) are
raised at construction as typed :class:`SourceError` subclasses; the truncated cases run
in a child process to prove the process survives (no SIGBUS).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import fastfeed.image as fi
from fastfeed.errors import (
    CorruptSourceError,
    DecodeError,
    RecordReadError,
    SampleError,
    SourceNotFoundError,
)
from fastfeed.loader import Loader
from fastfeed.sources import FileSource, LMDBSource
from fastfeed.testing import (
    FaultySource,
    InjectedError,
    Ledger,
    LedgerDecode,
    LedgerSource,
    chaos_plan,
    color_jpeg,
    decode_color_index,
    ledger_record,
    run_child,
    write_lmdb,
)

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

N = 12  # images per dataset
BAD = 5  # index of the planted bad record (second batch)
BATCH = 4
SIDE = 24  # output side of the transform, pixels


def _transform() -> fi.ImagePipeline:
    pipe = fi.Compose([fi.Resize(SIDE), fi.CenterCrop(SIDE)])
    assert isinstance(pipe, fi.ImagePipeline)  # the fixed-shape (slot-writing) fast path
    return pipe


def _bomb(data: bytes, side: int) -> bytes:
    """``data`` (a JPEG) with its SOF0 header claiming ``side`` x ``side`` pixels."""
    raw = bytearray(data)
    sof = raw.find(b"\xff\xc0")
    assert sof > 0, "baseline JPEG expected"
    raw[sof + 5 : sof + 7] = side.to_bytes(2, "big")
    raw[sof + 7 : sof + 9] = side.to_bytes(2, "big")
    return bytes(raw)


@dataclass(frozen=True)
class Case:
    """One kind of bad record.

    Attributes:
        name: Test id.
        payload: Makes the bad bytes from the good ones (None: not a byte-content case).
        stage: The stage the loader must name.
        cause: Type of the error chained to the SampleError.
        says: Text the error message must contain (lower-cased match).
    """

    name: str
    payload: Callable[[bytes], bytes] | None
    stage: str
    cause: type[BaseException]
    says: str


# Pillow refuses > 2 x MAX_IMAGE_PIXELS itself; between 1x and 2x only warns, so
# fastfeed.image's own header check must catch it.
_PILLOW_BOMB_SIDE = 30000  # 9.0e8 pixels
_WARNING_BOMB_SIDE = 10000  # 1.0e8 pixels, just over the default 89.5e6

BYTE_CASES = [
    Case("truncated-90%", lambda b: b[: int(len(b) * 0.9)], "decode", DecodeError, "truncated"),
    Case("truncated-50%", lambda b: b[: int(len(b) * 0.5)], "decode", DecodeError, "truncated"),
    Case("truncated-1%", lambda b: b[: max(1, len(b) // 100)], "decode", DecodeError, "trunc"),
    Case("zero-byte", lambda b: b"", "read", RecordReadError, "empty (0 bytes)"),
    Case(
        "html-named-jpg",
        lambda b: b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n",
        "decode",
        DecodeError,
        "not an image",
    ),
    Case("bomb-pillow", lambda b: _bomb(b, _PILLOW_BOMB_SIDE), "decode", DecodeError, "bomb"),
    Case("bomb-header", lambda b: _bomb(b, _WARNING_BOMB_SIDE), "decode", DecodeError, "bomb"),
]
FILE_ONLY_CASES = [
    Case("directory-named-jpg", None, "read", RecordReadError, "is a directory"),
    Case("missing-file", None, "read", RecordReadError, "does not exist"),
    Case("unreadable-file", None, "read", RecordReadError, "permission denied"),
]
# What the source error chains in turn (the OS error), per file-only case.
_OS_CAUSE = {
    "directory-named-jpg": IsADirectoryError,
    "missing-file": FileNotFoundError,
    "unreadable-file": PermissionError,
}


@pytest.fixture(scope="module")
def good() -> list[bytes]:
    """N colour-coded JPEGs, generated once for the module."""
    return [color_jpeg(i) for i in range(N)]


def _file_dataset(root: Path, good: list[bytes], case: Case, mp: pytest.MonkeyPatch) -> FileSource:
    root.mkdir()
    paths = [root / f"img_{i:02d}.jpg" for i in range(N)]
    for i, p in enumerate(paths):
        if i != BAD:
            p.write_bytes(good[i])
    bad = paths[BAD]
    if case.payload is not None:
        bad.write_bytes(case.payload(good[BAD]))
    elif case.name == "directory-named-jpg":
        bad.mkdir()
    elif case.name == "unreadable-file":
        bad.write_bytes(good[BAD])
        # We run as root, which ignores file modes: inject the PermissionError instead.
        real_open = os.open

        def guarded_open(path, flags, *args, **kwargs):
            if os.fspath(path) == str(bad):
                raise PermissionError(13, "Permission denied", str(bad))
            return real_open(path, flags, *args, **kwargs)

        mp.setattr(os, "open", guarded_open)
    # missing-file: nothing written
    return FileSource([str(p) for p in paths], labels=list(range(N)), num_threads=2)


def _lmdb_dataset(root: Path, good: list[bytes], case: Case) -> LMDBSource:
    assert case.payload is not None
    payloads = [case.payload(g) if i == BAD else g for i, g in enumerate(good)]
    return LMDBSource(write_lmdb(root / "db", payloads, labels=list(range(N))))


def _build(kind: str, tmp_path: Path, good: list[bytes], case: Case, mp: pytest.MonkeyPatch):
    if kind == "file":
        return _file_dataset(tmp_path / "ds", good, case, mp)
    return _lmdb_dataset(tmp_path, good, case)


MATRIX = [pytest.param("file", c, id=f"file-{c.name}") for c in BYTE_CASES + FILE_ONLY_CASES]
MATRIX += [pytest.param("lmdb", c, id=f"lmdb-{c.name}") for c in BYTE_CASES]


def _check_rows(batch) -> None:
    """Each row's pixels name the index the batch says it holds (no substitution)."""
    got = [decode_color_index(row) for row in batch.data]
    assert got == list(batch.indices)
    assert batch.labels.tolist() == list(batch.indices)


@pytest.mark.parametrize(("kind", "case"), MATRIX)
def test_raise_mode_names_index_where_and_stage(
    kind: str, case: Case, tmp_path: Path, good: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _build(kind, tmp_path, good, case, monkeypatch)
    try:
        where = src.describe(BAD)
        loader = Loader(src, _transform(), batch_size=BATCH, num_threads=2, on_error="raise")
        seen: list[list[int]] = []
        with pytest.raises(SampleError) as info:
            for batch in loader:
                _check_rows(batch)
                seen.append(list(batch.indices))
        loader.close()
    finally:
        src.close()
    err = info.value
    assert seen == [[0, 1, 2, 3]]  # exactly the batches before the bad one
    assert (err.index, err.where, err.stage) == (BAD, where, case.stage)
    text = str(err)
    assert f"sample {BAD}" in text and where in text and f"'{case.stage}'" in text
    assert isinstance(err.__cause__, case.cause)
    assert case.says in text.lower()
    if kind == "file" and case.name in _OS_CAUSE:
        assert isinstance(err.__cause__.__cause__, _OS_CAUSE[case.name])


@pytest.mark.parametrize(("kind", "case"), MATRIX)
def test_skip_mode_skips_exactly_the_bad_record(
    kind: str, case: Case, tmp_path: Path, good: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _build(kind, tmp_path, good, case, monkeypatch)
    try:
        where = src.describe(BAD)
        loader = Loader(src, _transform(), batch_size=BATCH, num_threads=2, on_error="skip")
        ledger = Ledger(range(N))
        sizes = []
        for batch in loader:
            _check_rows(batch)
            ledger.add_indices(batch.indices)
            sizes.append(len(batch.indices))
        loader.close()
    finally:
        src.close()
    skipped = loader.skipped
    ledger.check(skipped=[s.index for s in skipped], injected=[BAD])
    assert sizes == [4, 3, 4]  # the bad sample's batch shrinks, none is padded
    assert len(skipped) == 1
    s = skipped[0]
    assert (s.index, s.where, s.stage) == (BAD, where, case.stage)
    assert s.message.startswith(case.cause.__name__ + ":")
    assert case.says in s.message.lower()


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_file_deleted_mid_epoch(tmp_path: Path, good: list[bytes], mode: str) -> None:
    n, victim = 16, 14  # the victim is in batch 3: not read before batch 1 is consumed
    paths = []
    for i in range(n):
        p = tmp_path / f"img_{i:02d}.jpg"
        p.write_bytes(good[i % N] if i < N else color_jpeg(i))
        paths.append(str(p))
    src = FileSource(paths, labels=list(range(n)), num_threads=2)
    loader = Loader(src, _transform(), batch_size=BATCH, num_threads=2, prefetch=2, on_error=mode)
    ledger = Ledger(range(n))
    try:
        it = iter(loader)
        first = next(it)
        os.unlink(paths[victim])  # mid-epoch: after the first batch was handed over
        ledger.add_indices(first.indices)
        if mode == "raise":
            with pytest.raises(SampleError) as info:
                for batch in it:
                    ledger.add_indices(batch.indices)
            err = info.value
            assert (err.index, err.where, err.stage) == (victim, paths[victim], "read")
            assert "deleted after indexing" in str(err)
            assert isinstance(err.__cause__, RecordReadError)
            assert isinstance(err.__cause__.__cause__, FileNotFoundError)
            assert sorted(ledger.delivered) == list(range(12))
        else:
            for batch in it:
                _check_rows(batch)
                ledger.add_indices(batch.indices)
            ledger.check(skipped=[s.index for s in loader.skipped], injected=[victim])
            assert [(s.index, s.stage) for s in loader.skipped] == [(victim, "read")]
    finally:
        loader.close()
        src.close()


# -- whole-LMDB failures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ledger_lmdb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An LMDB of 400 ledger records padded to 3 KiB (so it spans many pages)."""
    root = tmp_path_factory.mktemp("lmdb")
    payloads = [ledger_record(i, pad_bytes=3000) for i in range(400)]
    return Path(write_lmdb(root / "db", payloads, labels=[i % 10 for i in range(400)]))


def test_lmdb_missing_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nope.lmdb"
    with pytest.raises(SourceNotFoundError) as info:
        LMDBSource(missing)
    assert str(missing) in str(info.value) and info.value.path == str(missing)
    assert isinstance(info.value, FileNotFoundError)
    assert not missing.exists()  # opening must not create it


@pytest.mark.parametrize("form", ["random-bytes", "zero-byte"])
def test_lmdb_not_a_database(tmp_path: Path, form: str) -> None:
    db = tmp_path / "db"
    db.mkdir()
    data = os.urandom(64 * 1024) if form == "random-bytes" else b""
    (db / "data.mdb").write_bytes(data)
    with pytest.raises(CorruptSourceError) as info:
        LMDBSource(db)
    text = str(info.value)
    assert str(db) in text and "not an LMDB" in text
    if form == "zero-byte":
        assert "0 bytes" in text


_TRUNCATED_CHILD = """
import os
from fastfeed.errors import CorruptSourceError, RecordReadError
from fastfeed.sources import LMDBSource
path, when = PATH, WHEN
data = os.path.join(path, "data.mdb")
if when == "before-open":
    os.truncate(data, os.path.getsize(data) // 2)
try:
    src = LMDBSource(path)
    if when == "after-open":
        os.truncate(data, os.path.getsize(data) // 2)
    for i in range(len(src)):
        src.read(i)
    print("READ-ALL")
except (CorruptSourceError, RecordReadError) as exc:
    print("ERROR", type(exc).__name__, exc)
print("SURVIVED")
"""


def _truncated_run(ledger_lmdb: Path, tmp_path: Path, when: str):
    copy = tmp_path / "db"
    shutil.copytree(ledger_lmdb, copy)
    code = f"PATH, WHEN = {str(copy)!r}, {when!r}\n" + _TRUNCATED_CHILD
    return run_child(code, timeout_s=30), copy


def test_lmdb_truncated_before_open_is_a_clean_error(ledger_lmdb: Path, tmp_path: Path) -> None:
    res, copy = _truncated_run(ledger_lmdb, tmp_path, "before-open")
    assert res.returncode == 0, res.stderr  # -7 would be SIGBUS
    assert "SURVIVED" in res.stdout
    assert f"ERROR CorruptSourceError LMDB {copy}/data.mdb is truncated" in res.stdout


def test_lmdb_truncated_after_open_is_a_clean_error(ledger_lmdb: Path, tmp_path: Path) -> None:
    res, copy = _truncated_run(ledger_lmdb, tmp_path, "after-open")
    assert res.returncode == 0, f"rc={res.returncode}\n{res.stderr[-2000:]}"
    assert "SURVIVED" in res.stdout
    assert str(copy) in res.stdout and "truncated" in res.stdout
    assert "ERROR CorruptSourceError" in res.stdout and "since it was opened" in res.stdout


def test_lmdb_max_readers_below_thread_count(ledger_lmdb: Path) -> None:
    # One reader slot, four loader threads each running read transactions at once.
    src = LMDBSource(ledger_lmdb, max_readers=1)
    try:
        loader = Loader(src, LedgerDecode(), batch_size=16, shuffle=True, num_threads=4)
        ledger = Ledger(range(400))
        for batch in loader:
            ledger.add(batch)
        loader.close()
    finally:
        src.close()
    ledger.check()
    assert ledger.batches == 25


# -- the harness catches what it must (so the checks above can fail) ---------------------


def _rows(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    decode = LedgerDecode()
    data = torch.stack([decode(LedgerSource(64).read(i).data) for i in indices])
    return data, torch.tensor([i % 10 for i in indices])


def test_ledger_reports_duplicates_missing_corrupt_and_wrong_skips() -> None:
    ledger = Ledger(range(6))
    ledger.add(_rows([0, 1, 2]))
    ledger.add(_rows([2, 3]))  # 2 twice; 4 and 5 never
    data, labels = _rows([7])  # not expected
    data[0, 1] += 1  # and its hash is wrong
    ledger.add((data, labels))
    found = " | ".join(ledger.problems(skipped=[5], injected=[4]))
    assert "1 delivered more than once: [2]" in found
    assert "1 neither delivered nor skipped: [4]" in found
    assert "1 delivered but not expected: [7]" in found
    assert "bad hash for 7" in found
    assert "skipped-only [5], injected-only [4]" in found
    with pytest.raises(AssertionError, match="ledger not exact"):
        ledger.check()
    ledger.reset()
    ledger.add(_rows([0, 1, 2, 3, 4]))
    ledger.check(skipped=[5], injected=[5])
    assert (ledger.total, ledger.delivered) == (5, {0, 1, 2, 3, 4})


def test_faulty_source_fires_exactly_the_plan() -> None:
    plan = chaos_plan(2000, 0.05, seed=3)
    assert plan == chaos_plan(2000, 0.05, seed=3)  # reproducible
    assert 50 < sum(map(len, plan.values())) < 150
    src = FaultySource(
        LedgerSource(2000),
        raise_at=plan["raise"],
        stall_at=plan["stall"],
        corrupt_at=plan["corrupt"],
        stall_s=0.0,
    )
    bad_read, bad_decode = set(), set()
    for i in range(2000):
        try:
            rec = src.read(i)
        except InjectedError as exc:
            assert f"ledger[{i}]" in str(exc)
            bad_read.add(i)
            continue
        try:
            LedgerDecode()(rec.data)
        except DecodeError:
            bad_decode.add(i)
    assert (bad_read, bad_decode) == (plan["raise"], plan["corrupt"])
    assert src.fired == plan
