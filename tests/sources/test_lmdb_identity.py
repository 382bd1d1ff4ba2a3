"""LMDBSource.identity(): what MemoryCache(shared=True) keys an LMDB's machine-wide copy on."""

from __future__ import annotations

import os

from fastfeed.sources import shared_cache
from fastfeed.sources.lmdb import FORMAT_VERSION, LMDBSource
from fastfeed.sources.memory import MemoryCache
from fastfeed.testing import write_lmdb


def test_identity_is_path_size_mtime_version_and_count(tmp_path):
    path = write_lmdb(tmp_path / "db", [b"a" * 10, b"bb", b"ccc"], labels=[0, 1, 2])
    src = LMDBSource(path)
    st = os.stat(src.data_path)
    expected = (
        "LMDBSource",
        os.path.realpath(path),
        st.st_size,
        st.st_mtime_ns,
        FORMAT_VERSION,
        3,
    )
    assert src.identity() == expected
    assert shared_cache.source_identity(src) == expected
    # Another process opening the same path (here: another instance) finds the same.
    assert LMDBSource(path).identity() == expected


def test_identity_changes_when_the_data_file_is_rewritten(tmp_path):
    path = write_lmdb(tmp_path / "db", [b"x" * 100] * 4)
    before = LMDBSource(path).identity()
    st = os.stat(os.path.join(path, "data.mdb"))
    os.utime(os.path.join(path, "data.mdb"), ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    after = LMDBSource(path).identity()
    assert before[3] + 1_000_000 == after[3]
    assert before != after


def test_shared_cache_of_an_lmdb_serves_its_records(tmp_path):
    payloads = [bytes([i]) * (50 + i) for i in range(12)]
    src = LMDBSource(write_lmdb(tmp_path / "db", payloads, labels=list(range(12))))
    cache = MemoryCache(src, 10**6, shared=True)
    try:
        first = cache.read_many(list(range(12)))
        again = cache.read_many(list(range(12)))
        assert [bytes(r.data) for r in again] == payloads
        assert [r.label for r in first] == list(range(12))
        stats = cache.cache_stats()
        assert stats["process"]["misses"] == 12 and stats["process"]["hits"] == 12
        assert stats["machine"]["filled_records"] == 12
    finally:
        cache.detach()
