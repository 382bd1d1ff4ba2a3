"""pack() safety: overlapping paths, symlinked OUT, umask, signals, stale temp dirs, warnings."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
from PIL import Image

from fastfeed import packing
from fastfeed.errors import ConfigError, PackError
from fastfeed.packing import pack
from fastfeed.sources import FileSource, LMDBSource
from fastfeed.testing import make_image_folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "imgs", 2, 3, ((48, 48), (48, 48)))


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_refuses_overlap_even_with_overwrite(folder: Path, tmp_path: Path) -> None:
    before = _files(folder)
    with pytest.raises(ConfigError, match="the input and the output are the same path"):
        pack(folder, folder, overwrite=True, progress=False)
    with pytest.raises(ConfigError, match="is inside the input"):
        pack(folder, folder / "class_000" / "o.lmdb", overwrite=True, progress=False)
    with pytest.raises(ConfigError, match="is inside the output"):
        pack(folder / "class_000", folder, overwrite=True, progress=False)
    src = FileSource(folder)  # a Source: its root is checked too
    with pytest.raises(ConfigError, match="the input and the output are the same path"):
        pack(src, folder, overwrite=True, progress=False)
    src.close()
    assert _files(folder) == before  # nothing deleted, nothing added


def test_symlinked_out_is_written_through(folder: Path, tmp_path: Path) -> None:
    target = tmp_path / "other_disk" / "train.lmdb"
    target.parent.mkdir()
    link = tmp_path / "train.lmdb"
    link.symlink_to(target)  # dangling: the target does not exist yet
    pack(folder, link, progress=False)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert (target / "data.mdb").is_file()
    with LMDBSource(link) as src:
        assert len(src) == 6
    pack(str(folder / "class_000" / "*.jpg"), link, overwrite=True, progress=False)  # replace
    assert link.is_symlink()
    with LMDBSource(target) as src:
        assert len(src) == 3
    assert sorted(os.listdir(target.parent)) == ["train.lmdb"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_output_mode_follows_the_umask(folder: Path, tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        pack(folder, tmp_path / "o.lmdb", progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "o.lmdb").st_mode) == 0o777 & ~umask
    assert stat.S_IMODE(os.stat(tmp_path / "o.lmdb" / "data.mdb").st_mode) == 0o666 & ~umask


def test_parent_that_is_a_file_is_one_clear_error(folder: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(PackError, match=r"cannot create the folder of .*afile"):
        pack(folder, tmp_path / "afile" / "o.lmdb", progress=False)


_SLOW_PACK = """
import sys, time
from fastfeed import packing
real = packing._put_batch
def slow(env, items):
    real(env, items)
    print("wrote", flush=True)
    time.sleep(30)
packing._put_batch = slow
packing._BATCH_RECORDS = 2
packing.pack(sys.argv[1], sys.argv[2], progress=False)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_leaves_nothing_behind(folder: Path, tmp_path: Path, sig: int) -> None:
    out = tmp_path / "o.lmdb"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_PACK, str(folder), str(out)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "wrote"  # the temp dir exists now
        assert any(n.endswith(".packing") for n in os.listdir(tmp_path))
        proc.send_signal(sig)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert rc == -sig  # died of the signal, as without fastfeed
    assert sorted(os.listdir(tmp_path)) == ["imgs"]


def test_stale_temp_dir_of_a_killed_run_is_removed(folder: Path, tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    host = packing._tmp_owner().rsplit("-", 1)[0]
    stale = tmp_path / f".o.lmdb.{host}-{dead.pid}-abcd1234.packing"
    stale.mkdir()
    (stale / "data.mdb").write_bytes(b"partial")
    other = tmp_path / ".o.lmdb.otherhost-1-abcd1234.packing"
    other.mkdir()
    report = pack(folder, tmp_path / "o.lmdb", progress=False)
    assert report.stale_removed == [str(stale)] and not stale.exists()
    assert other.exists() and len(report.stale_left) == 1
    assert "from host otherhost" in report.stale_left[0]
    assert f"removed {stale}" in report.summary()


def test_no_global_warning_filter_change_with_threads(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs", 1, 6, ((40, 40), (40, 40)))
    filters_before = list(warnings.filters)
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            pack(root, tmp_path / f"o{k}.lmdb", max_side=16, workers=4, progress=False)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert warnings.filters == filters_before


def test_decompression_bomb_is_a_named_bad_record(tmp_path: Path, monkeypatch) -> None:
    root = make_image_folder(tmp_path / "imgs", 1, 2, ((20, 20), (20, 20)))
    Image.new("RGB", (40, 40)).save(root / "class_000" / "img_0001.jpg")  # 1600 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(PackError, match=r"img_0001\.jpg.*exceeds PIL.Image.MAX_IMAGE_PIXELS"):
            pack(root, tmp_path / "o.lmdb", verify=True, progress=False)
        report = pack(root, tmp_path / "o.lmdb", verify=True, on_error="skip", progress=False)
    assert report.records == 1
    assert [(i, os.path.basename(w)) for i, w, _ in report.skipped] == [(1, "img_0001.jpg")]


def test_verify_without_max_side_checks_every_image(folder: Path, tmp_path: Path) -> None:
    bad = folder / "class_001" / "img_0004.jpg"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated JPEG
    plain = pack(folder, tmp_path / "plain.lmdb", progress=False)
    assert plain.records == 6 and plain.verified == 0  # no decode without verify
    report = pack(folder, tmp_path / "v.lmdb", verify=True, on_error="skip", progress=False)
    assert report.records == 5 and report.verified == 5 and report.reencoded == 0
    assert [(i, os.path.basename(w)) for i, w, _ in report.skipped] == [(4, "img_0004.jpg")]
    with LMDBSource(tmp_path / "v.lmdb") as src, FileSource(folder) as files:
        assert src.read(0).data == files.read(0).data  # copied byte for byte


def test_tmp_dir_name_identifies_host_and_pid(folder: Path, tmp_path: Path) -> None:
    name = os.path.basename(packing._make_tmp_dir(str(tmp_path), "o.lmdb"))
    m = packing._STALE_RE.match(name)
    assert m is not None and m.group("base") == "o.lmdb"
    assert int(m.group("pid")) == os.getpid()
    assert socket.gethostname().split(".")[0].startswith(m.group("host")[:3])
    os.rmdir(tmp_path / name)


def test_a_file_list_next_to_out_is_not_an_overlap(folder: Path, tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text("imgs/class_000/img_0000.jpg\n")
    with FileSource(listing) as src:  # its root is tmp_path, where OUT goes
        assert pack(src, tmp_path / "o.lmdb", progress=False).records == 1
    assert pack(listing, tmp_path / "p.lmdb", progress=False).records == 1
