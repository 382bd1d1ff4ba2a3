"""Partial JPEG decode (fastfeed.image._jpeg): pixels, fallbacks, errors, GIL, determinism.

The partial path needs nvImageCodec (``pip install nvidia-nvimgcodec-cu12``, in the
``dev`` and ``jpeg`` extras); without it these tests skip, except the ones that check the
Pillow fallback, which run everywhere.
"""

from __future__ import annotations

import io
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import fastfeed.image as ffi
from fastfeed import rng as _rng
from fastfeed.errors import DecodeError
from fastfeed.image import _jpeg
from fastfeed.image._decode import EncodedImage
from fastfeed.image._plan import Plan, draft_factor, region_box
from fastfeed.testing import random_image

needs_partial = pytest.mark.skipif(
    not _jpeg.available(), reason="nvImageCodec (nvidia-nvimgcodec-cu12) is not installed"
)

TRAIN = [ffi.RandomResizedCrop(224), ffi.RandomHorizontalFlip()]
EVAL = [ffi.Resize(256), ffi.CenterCrop(224)]


def _jpeg_bytes(img: Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def _variants() -> dict[str, tuple[bytes, str]]:
    """JPEG encodings that the partial path must handle: name -> (bytes, mode)."""
    rng = np.random.default_rng(7)
    rgb = random_image(rng, 403, 301)  # odd sizes: partial iMCUs at the right and bottom
    return {
        "baseline 4:2:0": (_jpeg_bytes(rgb, subsampling=2), "RGB"),
        "baseline 4:2:2": (_jpeg_bytes(rgb, subsampling=1), "RGB"),
        "baseline 4:4:4": (_jpeg_bytes(rgb, subsampling=0), "RGB"),
        "progressive 4:2:0": (_jpeg_bytes(rgb, progressive=True), "RGB"),
        "grey": (_jpeg_bytes(rgb.convert("L")), "L"),
        "grey as RGB": (_jpeg_bytes(rgb.convert("L")), "RGB"),
        "RGB as grey": (_jpeg_bytes(rgb), "L"),
        "tiny 17x9": (_jpeg_bytes(random_image(rng, 17, 9)), "RGB"),
    }


VARIANTS = _variants()


def _scan_clean(data: bytes) -> bool:
    frame = _jpeg._read_frame(data)
    assert frame is not None and frame[0] in (0xC0, 0xC1)
    return _jpeg._scan_is_clean(data, len(data), frame[-1])


def _full_decode(data: bytes, mode: str) -> np.ndarray:
    """fastfeed's Pillow decode (for "L" of a colour JPEG: libjpeg's Y channel, as before)."""
    arr = np.asarray(EncodedImage(data, mode).decode()[0])
    return arr[:, :, None] if arr.ndim == 2 else arr


def _run(pipeline: ffi.Compose, data: bytes, key: tuple[int, int, int], partial: bool):
    old = _jpeg.set_enabled(partial)
    _rng.set_sample_key(key)
    try:
        return pipeline(data)
    finally:
        _rng.set_sample_key(None)
        _jpeg.set_enabled(old)


def _reference(data: bytes, mode: str, plan: Plan) -> torch.Tensor:
    """Full Pillow decode, crop the plan's source box, torch's antialiased bilinear resize,
    crop, flip: the definition the partial path must meet (CHW uint8)."""
    full = torch.from_numpy(_full_decode(data, mode).copy()).permute(2, 0, 1).float()
    x0, y0, x1, y1 = plan.src_box
    box = full[None, :, y0:y1, x0:x1]
    width, height = plan.resize_to
    resized = torch.nn.functional.interpolate(
        box, size=(height, width), mode="bilinear", align_corners=False, antialias=True
    )
    cx0, cy0, cx1, cy1 = plan.crop
    out = resized[0, :, cy0:cy1, cx0:cx1].round().clamp(0, 255).to(torch.uint8)
    return out.flip(-1) if plan.flip else out


def _plan_for(transforms: list, size: tuple[int, int], key: tuple[int, int, int]) -> Plan:
    plan = Plan.start(size)
    _rng.set_sample_key(key)
    try:
        for op in transforms:
            assert op.fuse(plan)
    finally:
        _rng.set_sample_key(None)
    return plan


@needs_partial
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_region_equals_the_same_box_of_a_full_decode(name: str):
    data, mode = VARIANTS[name]
    header = _jpeg.open_jpeg(data)
    assert header is not None
    full = _full_decode(data, mode)
    height, width = full.shape[:2]
    assert header.size == (width, height)
    boxes = [
        (0, 0, width, height),
        (1, 2, width - 3, height - 1),
        (width // 3, height // 4, width - 5, height // 2 + 1),
    ]
    for box in boxes:
        region = _jpeg.decode_region(header, box, mode)
        assert region is not None
        x0, y0, x1, y1 = box
        assert region.shape == (y1 - y0, x1 - x0, 1 if mode == "L" else 3)
        # Same libjpeg-turbo, islow IDCT, fancy upsampling: identical, not just close.
        np.testing.assert_array_equal(region, full[y0:y1, x0:x1], err_msg=f"{name} {box}")


@needs_partial
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_train_transform_within_one_grey_level_of_full_decode_and_crop(name: str):
    data, mode = VARIANTS[name]
    if name.startswith("tiny"):
        pytest.skip("a 17x9 image upsamples: the identical-batches test covers it")
    pipeline = ffi.Compose(TRAIN, mode=mode)
    size = Image.open(io.BytesIO(data)).size
    checked = 0
    for index in range(6):
        key = (3, 1, index)
        plan = _plan_for(TRAIN, size, key)
        assert draft_factor(plan) == 1  # crops < 448 px: the partial path, not a DCT draft
        got = _run(pipeline, data, key, partial=True)
        ref = _reference(data, mode, plan)
        assert got.shape == ref.shape == (1 if mode == "L" else 3, 224, 224)
        assert (got.int() - ref.int()).abs().max().item() <= 1, (name, index, plan)
        checked += 1
    assert checked == 6


@needs_partial
@pytest.mark.parametrize(
    "transforms", [TRAIN, EVAL, [ffi.CenterCrop(100)]], ids=["train", "eval", "crop"]
)
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_partial_and_pillow_paths_give_identical_batches(name: str, transforms: list):
    data, mode = VARIANTS[name]
    pipeline = ffi.Compose(transforms, mode=mode)
    for index in range(4):
        key = (0, 2, index)
        fast = _run(pipeline, data, key, partial=True)
        slow = _run(pipeline, data, key, partial=False)
        assert torch.equal(fast, slow), (name, index)


@needs_partial
@pytest.mark.parametrize("interpolation", ["nearest", "box", "bicubic", "lanczos", "hamming"])
def test_pillow_filters_on_a_region_equal_the_full_decode(interpolation: str):
    data, mode = VARIANTS["baseline 4:2:0"]
    pipeline = ffi.Compose([ffi.RandomResizedCrop(160, interpolation=interpolation)], mode=mode)
    for index in range(5):
        key = (1, 0, index)
        fast = _run(pipeline, data, key, partial=True)
        slow = _run(pipeline, data, key, partial=False)
        assert torch.equal(fast, slow), (interpolation, index)


@needs_partial
def test_region_box_of_a_pillow_filter_covers_its_reach_from_the_origin():
    plan = Plan((100, 50, 300, 250), (100, 100), (0, 0, 100, 100), interpolation="lanczos")
    # Lanczos reaches 3 source pixels at scale 1, 6 at the 2x downscale here (+1 spare);
    # full rows from the top (Pillow's result depends on the image's width).
    assert region_box(plan, (400, 300)) == (0, 0, 400, 257)
    assert region_box(plan, (302, 251)) == (0, 0, 302, 251)  # clamped to the image
    torch_plan = Plan((100, 50, 300, 250), (100, 100), (0, 0, 100, 100))
    assert region_box(torch_plan, (400, 300)) == (100, 50, 300, 250)
    unscaled = Plan((0, 0, 400, 300), (400, 300), (10, 20, 110, 220))
    assert region_box(unscaled, (400, 300)) == (10, 20, 110, 220)


@needs_partial
def test_hwc_layout_and_float_output_match_the_pillow_path():
    data, _ = VARIANTS["baseline 4:4:4"]
    for pipeline in (
        ffi.Compose(TRAIN, layout="HWC"),
        ffi.Compose([*TRAIN, ffi.ToFloat((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))]),
    ):
        shape, dtype = pipeline.sample_spec()
        out = torch.empty(shape, dtype=dtype)
        _jpeg.set_enabled(True)
        _rng.set_sample_key((5, 5, 5))
        try:
            written = pipeline(data, out=out)
        finally:
            _rng.set_sample_key(None)
        assert written is out
        assert torch.equal(out, _run(pipeline, data, (5, 5, 5), partial=False))


@needs_partial
def test_same_key_same_pixels_and_crop_parameters_as_before():
    data, _ = VARIANTS["progressive 4:2:0"]
    pipeline = ffi.Compose(TRAIN)
    first = _run(pipeline, data, (9, 4, 11), partial=True)
    again = _run(pipeline, data, (9, 4, 11), partial=True)
    other = _run(pipeline, data, (9, 4, 12), partial=True)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # The crop is drawn from the header's size, which equals Pillow's: same parameters.
    size = Image.open(io.BytesIO(data)).size
    assert _jpeg.open_jpeg(data).size == size
    assert _plan_for(TRAIN, size, (9, 4, 11)) == _plan_for(TRAIN, size, (9, 4, 11))


@needs_partial
def test_threads_decode_with_their_own_decoders_and_agree():
    data, _ = VARIANTS["baseline 4:2:0"]
    pipeline = ffi.Compose(TRAIN)
    expected = [_run(pipeline, data, (0, 0, i), partial=True) for i in range(16)]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for i in range(offset, 16, 4):
                _rng.set_sample_key((0, 0, i))
                results[i] = pipeline(data)
            _rng.set_sample_key(None)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,), name=f"test-decode-{k}") for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert sorted(results) == list(range(16))
    for i in range(16):
        assert torch.equal(results[i], expected[i]), i


@needs_partial
def test_scratch_region_decode_reuses_the_thread_image_and_equals_a_fresh_one(
    monkeypatch: pytest.MonkeyPatch,
):
    data, _ = VARIANTS["baseline 4:2:0"]
    header = _jpeg.open_jpeg(data)
    assert header is not None
    boxes = [(0, 0, 403, 301), (10, 20, 200, 150), (100, 50, 390, 290)]
    fresh = [_jpeg.decode_region(header, box, "RGB").copy() for box in boxes]
    addresses = set()
    for box, expected in zip(boxes, fresh, strict=True):
        region = _jpeg.decode_region(header, box, "RGB", scratch=True)
        assert region is not None
        np.testing.assert_array_equal(region, expected)
        addresses.add(region.__array_interface__["data"][0])
    # The largest region came first: the later ones fit in the same buffer.
    assert len(addresses) == 1
    grey = _jpeg.decode_region(header, boxes[1], "L", scratch=True)
    assert grey is not None and grey.shape == (130, 190, 1)
    np.testing.assert_array_equal(grey, _jpeg.decode_region(header, boxes[1], "L"))
    # Over the limit: a fresh image, and the thread's scratch image is left alone.
    monkeypatch.setattr(_jpeg, "_SCRATCH_LIMIT_BYTES", 100)
    big = _jpeg.decode_region(header, boxes[1], "RGB", scratch=True)
    assert big is not None and big.__array_interface__["data"][0] not in addresses
    np.testing.assert_array_equal(big, fresh[1])


@needs_partial
def test_gil_is_released_for_the_whole_decode():
    # A 4000x3000 noise JPEG takes tens of milliseconds to decode in C. A Python thread
    # beside it advances only while the decoding thread does not hold the GIL.
    rng = np.random.default_rng(0)
    big = _jpeg_bytes(Image.fromarray(rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8)))
    header = _jpeg.open_jpeg(big)
    assert header is not None
    _jpeg.decode_region(header, (0, 0, 64, 64), "RGB")  # this thread's decoder exists
    count = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    spinner = threading.Thread(target=spin, name="test-gil-spinner")
    spinner.start()
    try:
        before = count[0]
        region = _jpeg.decode_region(header, (0, 0, 4000, 3000), "RGB")
        during = count[0] - before
    finally:
        stop.set()
        spinner.join(timeout=10)
        sys.setswitchinterval(old_interval)
    assert region is not None and region.shape == (3000, 4000, 3)
    # Held for the whole call, the spinner could not run a single iteration of its loop
    # once the call began; released, it runs thousands.
    assert during > 1000, during


def test_cmyk_png_truncated_and_exif_requests_take_the_pillow_path():
    rng = np.random.default_rng(3)
    img = random_image(rng, 120, 90)
    cmyk = _jpeg_bytes(img.convert("CMYK"))
    png = io.BytesIO()
    img.save(png, "PNG")
    good = _jpeg_bytes(img)
    trailing = good + b"padding after EOI"
    for data in (cmyk, png.getvalue(), good[: len(good) // 2], trailing):
        assert _jpeg.open_jpeg(data) is None
        assert _jpeg.open_partial(data, "RGB", exif_transpose=False, max_pixels=None) is None
    assert _jpeg.open_partial(good, "RGB", exif_transpose=True, max_pixels=None) is None
    # A bomb opens through Pillow, which raises the usual message.
    assert _jpeg.open_partial(good, "RGB", exif_transpose=False, max_pixels=100) is None
    pipeline = ffi.Compose([ffi.CenterCrop(64)])
    for data in (cmyk, png.getvalue(), trailing):
        out = pipeline(data)
        assert out.shape == (3, 64, 64)
        ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[13:77, 28:92]
        np.testing.assert_array_equal(out.permute(1, 2, 0).numpy(), ref)
    with pytest.raises(DecodeError, match="decompression bomb"):
        ffi.Compose([ffi.CenterCrop(64)], max_pixels=100)(good)


def test_set_enabled_returns_the_old_setting():
    old = _jpeg.set_enabled(False)
    try:
        assert _jpeg.set_enabled(False) is False
        assert _jpeg.available() is False
        assert _jpeg.open_jpeg(_jpeg_bytes(Image.new("RGB", (16, 16)))) is None
    finally:
        _jpeg.set_enabled(old)


@pytest.mark.parametrize("partial", [True, False])
def test_corrupt_jpeg_raises_decode_error_naming_the_stage(partial: bool):
    if partial and not _jpeg.available():
        pytest.skip("nvImageCodec is not installed")
    rng = np.random.default_rng(4)
    good = _jpeg_bytes(random_image(rng, 200, 150))
    sos = good.index(b"\xff\xda")
    scan_start = sos + 2 + int.from_bytes(good[sos + 2 : sos + 4], "big")
    # A stray marker early in the entropy-coded data (the header parses, EOI still ends
    # the stream). A region decode would stop before reaching the point where libjpeg
    # fails on it, so the scan check sends it to the Pillow path, which reports the
    # pixel-data stage.
    stray = good[: scan_start + 20] + b"\xff\xc6" + good[scan_start + 20 :]
    assert not _scan_clean(stray)
    assert _scan_clean(good)
    # A broken marker segment right after SOI: the header stage.
    header = good[:2] + b"\xff\xc0\x00\x05" + good[6:]
    pipeline = ffi.Compose([ffi.CenterCrop(64)])
    for crop in (pipeline, ffi.Compose(TRAIN)):
        with pytest.raises(DecodeError, match="image data"):
            _run(crop, stray, (0, 0, 0), partial=partial)
    with pytest.raises(DecodeError, match="header"):
        _run(pipeline, header, (0, 0, 0), partial=partial)
    with pytest.raises(DecodeError, match="truncated"):
        _run(pipeline, good[: len(good) * 3 // 4], (0, 0, 0), partial=partial)


@needs_partial
def test_exif_thumbnail_and_restart_markers_keep_the_partial_path():
    rng = np.random.default_rng(5)
    img = random_image(rng, 320, 240)
    # An APP1 holding a whole JPEG (a camera thumbnail, with its own SOS and EOI) must
    # not be mistaken for the scan; restart markers inside the scan are legal.
    thumb = _jpeg_bytes(img.resize((40, 30)))
    exif = Image.Exif()
    exif[0x010E] = "thumbnail follows"
    app1_body = b"Exif\x00\x00" + exif.tobytes() + thumb
    plain = _jpeg_bytes(img)
    with_thumb = plain[:2] + b"\xff\xe1" + (len(app1_body) + 2).to_bytes(2, "big") + app1_body
    with_thumb += plain[2:]
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, restart_marker_blocks=4)
    restarts = buf.getvalue()
    for data in (with_thumb, restarts):
        assert _scan_clean(data)
        assert _jpeg.open_jpeg(data) is not None
        pipeline = ffi.Compose(TRAIN)
        assert torch.equal(
            _run(pipeline, data, (2, 0, 1), partial=True),
            _run(pipeline, data, (2, 0, 1), partial=False),
        )


@needs_partial
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_eval_transform_decodes_only_the_part_its_crop_needs_with_identical_pixels(
    interpolation: str,
):
    rng = np.random.default_rng(11)
    pipeline = ffi.Compose([ffi.Resize(256, interpolation=interpolation), ffi.CenterCrop(224)])
    partial_regions = 0
    for _ in range(24):
        width, height = int(rng.integers(120, 700)), int(rng.integers(120, 700))
        data = _jpeg_bytes(random_image(rng, width, height))
        plan = Plan.start((width, height))
        for op in pipeline.transforms:
            assert op.fuse(plan)
        box = region_box(plan, (width, height))
        downscale = width > plan.resize_to[0] and height > plan.resize_to[1]
        if downscale:
            # Top-left anchored, short of the full image on at least one side.
            assert box[:2] == (0, 0) and box[2:] != (width, height), (width, height, box)
            partial_regions += 1
        else:
            assert box == (0, 0, width, height)
        fast = _run(pipeline, data, (0, 0, 0), partial=True)
        slow = _run(pipeline, data, (0, 0, 0), partial=False)
        assert torch.equal(fast, slow), (width, height, interpolation)
    assert partial_regions >= 8


@needs_partial
def test_bytes_likes_take_the_partial_path_and_non_bytes_keep_their_error():
    data, _ = VARIANTS["baseline 4:2:0"]
    pipeline = ffi.Compose(TRAIN)
    expected = _run(pipeline, data, (4, 0, 2), partial=False)
    for wrapped in (bytearray(data), memoryview(data), np.frombuffer(data, np.uint8)):
        header = _jpeg.open_jpeg(wrapped)
        assert header is not None and header.nbytes == len(data)
        assert torch.equal(_run(pipeline, wrapped, (4, 0, 2), partial=True), expected)
    assert _jpeg.open_jpeg("not bytes") is None
    with pytest.raises(TypeError, match="expected encoded image bytes"):
        pipeline("not bytes")


def test_unusual_chroma_sampling_takes_the_pillow_path():
    data = _jpeg_bytes(random_image(np.random.default_rng(6), 64, 48), subsampling=0)
    frame = _jpeg._read_frame(data)
    assert frame is not None and frame[1:5] == (8, 48, 64, 3)
    sof = data.index(b"\xff\xc0")
    luma = sof + 11  # SOF: marker, length, precision, height, width, count, then components
    assert data[luma] == 0x11
    for factors in (0x12, 0x41, 0x14):  # 4:4:0, 4:1:1, 4:1:0
        patched = data[:luma] + bytes([factors]) + data[luma + 1 :]
        assert _jpeg._read_frame(patched) is None
        assert _jpeg.open_jpeg(patched) is None
    chroma = sof + 14
    patched = data[:chroma] + bytes([0x21]) + data[chroma + 1 :]  # subsampled Cb plane
    assert _jpeg._read_frame(patched) is None


def _decode_in_child(data: bytes, queue: object) -> None:
    out: list[tuple[int, ...]] = []

    def in_thread() -> None:
        region = _jpeg.decode_region(_jpeg.open_jpeg(data), (0, 0, 50, 40), "RGB")
        out.append(region.shape)

    region = _jpeg.decode_region(_jpeg.open_jpeg(data), (3, 4, 103, 84), "RGB")
    worker = threading.Thread(target=in_thread, name="test-child-decode")
    worker.start()
    worker.join(timeout=30)
    queue.put((region.shape, out))  # type: ignore[attr-defined]


@needs_partial
def test_forked_worker_decodes_after_the_parent_did():
    # fastfeed's process workers may fork a parent that already decoded (its decoder and
    # nvImageCodec's instance are copied): the child's threads must still decode.
    import multiprocessing

    data, _ = VARIANTS["baseline 4:2:0"]
    assert _jpeg.decode_region(_jpeg.open_jpeg(data), (0, 0, 8, 8), "RGB") is not None
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_decode_in_child, args=(data, queue), name="test-fork-decode")
    child.start()
    try:
        shapes = queue.get(timeout=60)
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
            child.join(timeout=10)
    assert shapes == ((80, 100, 3), [(40, 50, 3)])
    assert child.exitcode == 0
