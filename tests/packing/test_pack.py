"""pack(): byte-identical round trips, --max-side, bad input, atomic output."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import lmdb
import pytest
from PIL import Image

from fastfeed import packing as pack_mod
from fastfeed.errors import ConfigError, OutputExistsError, PackError, SourceNotFoundError
from fastfeed.packing import PackReport, pack
from fastfeed.sources import FileSource, LMDBSource, open_source
from fastfeed.testing import ListSource, make_image_folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "imgs", 3, 4, ((64, 64), (48, 48)))


def _leftovers(parent: Path, keep: set[str]) -> list[str]:
    return sorted(set(os.listdir(parent)) - keep)


def test_pack_folder_round_trip(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "train.lmdb"
    report = pack(folder, out, progress=False)
    assert isinstance(report, PackReport)
    assert (report.records, report.reencoded, report.skipped) == (12, 0, [])
    assert (
        report.bytes_in == report.bytes_out == sum(p.stat().st_size for p in folder.rglob("*.jpg"))
    )
    assert report.file_bytes == (out / "data.mdb").stat().st_size
    assert os.listdir(out) == ["data.mdb"]  # lock=False: no lock.mdb
    assert _leftovers(tmp_path, {"imgs", "train.lmdb"}) == []
    files = FileSource.from_folder(folder)
    with LMDBSource(out) as src, files:
        assert len(src) == 12
        assert src.classes == files.classes == ["class_000", "class_001", "class_002"]
        assert src.labels == files.labels
        assert src.origins == [files.relpath(i) for i in range(12)]
        assert [r for r in src.read_many(list(range(12)))] == files.read_many(list(range(12)))
        assert src.describe(7) == f"{out} key 0000000007 (from class_001/img_0007.jpg)"
        assert src.meta["format_version"] == 1
        assert src.meta["count"] == 12
        assert src.meta["has_labels"] is True
    assert "packed 12 records, 3 classes" in report.summary()


def test_pack_from_list_lmdb_and_source(folder: Path, tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text("imgs/class_002/img_0009.jpg\t5\nimgs/class_000/img_0000.jpg\t7\n")
    pack(listing, tmp_path / "a.lmdb", progress=False)
    with LMDBSource(tmp_path / "a.lmdb") as a:
        assert a.labels == [5, 7]
        assert a.classes is None
        assert a.origins == ["imgs/class_002/img_0009.jpg", "imgs/class_000/img_0000.jpg"]
        assert a.read(1).data == (folder / "class_000" / "img_0000.jpg").read_bytes()
    # LMDB -> LMDB keeps bytes, labels and the original paths
    pack(tmp_path / "a.lmdb", tmp_path / "b.lmdb", progress=False)
    with LMDBSource(tmp_path / "a.lmdb") as a, LMDBSource(tmp_path / "b.lmdb") as b:
        assert b.read_many([0, 1]) == a.read_many([0, 1])
        assert b.origins == a.origins
    # any Source; records without labels store none
    src = ListSource([b"alpha", b"beta", b"gamma"])
    report = pack(src, tmp_path / "c.lmdb", progress=False)
    assert report.records == 3
    with LMDBSource(tmp_path / "c.lmdb") as c:
        assert [r.data for r in c.read_many([2, 0])] == [b"gamma", b"alpha"]
        assert c.labels is None
        assert c.origins == ["list[0]", "list[1]", "list[2]"]


def test_map_grows_when_full(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "small-map.lmdb"
    pack(folder, out, progress=False, map_bytes=16 * 1024)
    with LMDBSource(out) as src, FileSource.from_folder(folder) as files:
        assert src.read_many(list(range(12))) == files.read_many(list(range(12)))


def test_max_side_resizes_large_images_only(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "mixed", 2, 3, ((40, 160), (30, 120)), seed=3)
    files = FileSource.from_folder(root)
    sizes = [Image.open(p).size for p in files.paths]
    assert any(max(s) > 80 for s in sizes) and any(max(s) <= 80 for s in sizes)
    out = tmp_path / "small.lmdb"
    report = pack(root, out, max_side=80, quality=85, workers=2, progress=False)
    assert report.reencoded == sum(max(s) > 80 for s in sizes)
    with LMDBSource(out) as src:
        assert src.meta["max_side"] == 80
        for i, (w, h) in enumerate(sizes):
            data = src.read(i).data
            if max(w, h) <= 80:
                assert data == files.read(i).data  # copied byte for byte
                continue
            img = Image.open(io.BytesIO(data))
            assert img.format == "JPEG"
            nw, nh = img.size
            assert max(nw, nh) == 80
            assert abs(nw / nh - w / h) < 0.05 * (w / h) + 1 / min(nw, nh)
    files.close()


def _corrupt(folder: Path) -> Path:
    bad = folder / "class_001" / "img_0005.jpg"
    bad.write_bytes(bad.read_bytes()[:40])  # a JPEG header and nothing else
    return bad


def test_corrupt_image_with_max_side_raises_naming_the_file(folder: Path, tmp_path: Path) -> None:
    bad = _corrupt(folder)
    out = tmp_path / "out.lmdb"
    with pytest.raises(PackError, match=str(bad)) as info:
        pack(folder, out, max_side=32, progress=False)
    assert "record 5" in str(info.value)
    assert info.value.__cause__ is not None
    assert not out.exists()
    assert _leftovers(tmp_path, {"imgs"}) == []


def test_corrupt_image_skipped_and_listed(folder: Path, tmp_path: Path) -> None:
    bad = _corrupt(folder)
    out = tmp_path / "out.lmdb"
    report = pack(folder, out, max_side=32, on_error="skip", progress=False)
    assert report.records == 11
    assert [(i, where) for i, where, _ in report.skipped] == [(5, str(bad))]
    assert f"skipped 5 ({bad})" in report.summary()
    with LMDBSource(out) as src:
        assert len(src) == 11
        assert "class_001/img_0005.jpg" not in src.origins
        assert src.origins[5] == "class_001/img_0006.jpg"
        assert src.labels[5] == 1


def test_zero_byte_file(folder: Path, tmp_path: Path) -> None:
    empty = folder / "class_002" / "img_0010.jpg"
    empty.write_bytes(b"")
    with pytest.raises(PackError, match=f"{empty} is empty"):
        pack(folder, tmp_path / "x.lmdb", progress=False)
    assert not (tmp_path / "x.lmdb").exists()
    report = pack(folder, tmp_path / "y.lmdb", on_error="skip", progress=False)
    assert [i for i, _, _ in report.skipped] == [10]
    assert report.records == 11


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, RuntimeError])
def test_interrupted_pack_leaves_nothing(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc_type: type
) -> None:
    monkeypatch.setattr(pack_mod, "_BATCH_RECORDS", 4)
    real = pack_mod._put_batch
    calls = []

    def failing(env: lmdb.Environment, items: list) -> None:
        calls.append(len(items))
        if len(calls) == 2:
            raise exc_type("injected mid-pack")
        real(env, items)

    monkeypatch.setattr(pack_mod, "_put_batch", failing)
    out = tmp_path / "out.lmdb"
    with pytest.raises(exc_type, match="injected mid-pack"):
        pack(folder, out, progress=False)
    assert calls == [4, 4]
    assert not out.exists()
    assert _leftovers(tmp_path, {"imgs"}) == []


def test_refuses_to_overwrite_unless_asked(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.lmdb"
    pack(ListSource([b"old"]), out, progress=False)
    with pytest.raises(OutputExistsError, match=f"{out} already exists"):
        pack(folder, out, progress=False)
    with LMDBSource(out) as src:
        assert src.read(0).data == b"old"
    report = pack(folder, out, overwrite=True, progress=False)
    assert report.records == 12
    with LMDBSource(out) as src:
        assert len(src) == 12
    assert _leftovers(tmp_path, {"imgs", "out.lmdb"}) == []


def test_bad_arguments_and_missing_input(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError, match=str(tmp_path / "nope")):
        pack(tmp_path / "nope", tmp_path / "o.lmdb", progress=False)
    with pytest.raises(ConfigError, match="on_error"):
        pack(folder, tmp_path / "o.lmdb", on_error="ignore", progress=False)
    with pytest.raises(ConfigError, match="max_side"):
        pack(folder, tmp_path / "o.lmdb", max_side=0, progress=False)
    assert _leftovers(tmp_path, {"imgs"}) == []


def test_metadata_layout_is_documented(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.lmdb"
    pack(folder, out, progress=False)
    with lmdb.open(str(out), readonly=True, lock=False) as env, env.begin() as txn:
        keys = [bytes(k) for k in txn.cursor().iternext(values=False)]
        meta = json.loads(txn.get(b"__fastfeed__"))
        labels = txn.get(b"__fastfeed__/labels")
        paths = json.loads(txn.get(b"__fastfeed__/paths"))
    assert keys[:12] == [b"%010d" % i for i in range(12)]
    assert keys[12:] == [b"__fastfeed__", b"__fastfeed__/labels", b"__fastfeed__/paths"]
    assert meta["classes"] == ["class_000", "class_001", "class_002"]
    assert list(memoryview(labels).cast("q")) == [0] * 4 + [1] * 4 + [2] * 4
    assert paths[0] == "class_000/img_0000.jpg"


def test_open_source_dispatch(folder: Path, tmp_path: Path) -> None:
    assert isinstance(open_source(folder), FileSource)
    pack(folder, tmp_path / "o.lmdb", progress=False)
    with open_source(tmp_path / "o.lmdb") as s:
        assert isinstance(s, LMDBSource)
    with open_source(tmp_path / "o.lmdb" / "data.mdb") as s:
        assert isinstance(s, LMDBSource)
