"""Tests of fastfeed.image: decode, modes, torchvision-compatible sampling, fusion, errors."""

from __future__ import annotations

import functools
import gc
import io
import math
import pickle
import random
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

import fastfeed.image as ffi
from fastfeed import rng as _rng
from fastfeed.errors import ConfigError, DecodeError
from fastfeed.image import _decode, _plan
from fastfeed.testing import run_in_threads


def _pixels(width: int, height: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Gradients plus mild noise: compresses like a photo, not like white noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    planes = [x * 255.0 / width, y * 255.0 / height, (x + y) * 127.0 / (width + height)]
    base = np.stack(planes[:channels] + [np.full_like(planes[0], 200.0)] * (channels - 3), -1)
    noisy = base + rng.normal(0, 6, base.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _encode(img: Image.Image, fmt: str = "JPEG", **params: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _jpeg(width: int = 64, height: int = 48, seed: int = 0, **params: Any) -> bytes:
    return _encode(Image.fromarray(_pixels(width, height, seed=seed)), "JPEG", quality=90, **params)


def _png(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    return _encode(Image.fromarray(_pixels(width, height, seed=seed)), "PNG")


def _with_key(key: tuple[int, int, int], fn: Callable[[], Any]) -> Any:
    _rng.set_sample_key(key)
    try:
        return fn()
    finally:
        _rng.set_sample_key(None)


def _mad(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.to(torch.int32) - b.to(torch.int32)).abs().float().mean().item()


def _train(size: int = 32, **kwargs: Any) -> ffi.Compose:
    return ffi.Compose([ffi.RandomResizedCrop(size), ffi.RandomHorizontalFlip()], **kwargs)


# --------------------------------------------------------------------------- modes


def _mode_samples() -> dict[str, bytes]:
    rgb = _pixels(40, 30)
    gray = Image.fromarray(rgb[:, :, 0])
    alpha = Image.fromarray(rgb[:, :, 1])
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    cmyk = Image.fromarray(_pixels(40, 30, channels=4)).convert("CMYK")
    sixteen = Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257)
    rgba = Image.merge("RGBA", [*Image.fromarray(rgb).split(), alpha])
    return {
        "L": _encode(gray, "PNG"),
        "LA": _encode(Image.merge("LA", [gray, alpha]), "PNG"),
        "P+transparency": _encode(pal, "PNG", transparency=0),
        "RGBA": _encode(rgba, "PNG"),
        "CMYK": _encode(cmyk, "JPEG", quality=90),
        "I;16": _encode(sixteen, "PNG"),
        "RGB": _jpeg(40, 30),
    }


@pytest.mark.parametrize("kind", list(_mode_samples()))
@pytest.mark.parametrize(("mode", "channels"), [("RGB", 3), ("L", 1)])
def test_every_input_mode_gives_requested_mode_and_shape(kind: str, mode: str, channels: int):
    data = _mode_samples()[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Pillow's palette-transparency warning
        img = ffi.decode_image(data, mode=mode)
        out = _with_key((0, 0, 1), lambda: _train(24, mode=mode)(data))
    assert img.mode == mode
    assert img.size == (40, 30)
    assert out.shape == (channels, 24, 24)
    assert out.dtype == torch.uint8
    # Not blank: the content survived conversion (a clipped 16-bit image would be all 255).
    assert 20 < out.float().mean().item() < 235


def test_sixteen_bit_keeps_high_byte():
    values = np.array([[0x0000, 0x00FF, 0x1234, 0xFFFF]], dtype=np.uint16)
    data = _encode(Image.fromarray(values), "PNG")
    assert np.asarray(ffi.decode_image(data, mode="L")).tolist() == [[0x00, 0x00, 0x12, 0xFF]]


def test_alpha_is_dropped_not_composited():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert ffi.decode_image(_encode(rgba, "PNG")).getpixel((0, 0)) == (10, 20, 30)


def test_exif_orientation_ignored_by_default_applied_on_request():
    base = Image.fromarray(_pixels(40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _encode(base, "JPEG", quality=95, exif=exif.tobytes())
    plain = ffi.decode_image(data)
    turned = ffi.decode_image(data, exif_transpose=True)
    assert plain.size == (40, 20)
    assert turned.size == (20, 40)
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert np.array_equal(np.asarray(turned), np.asarray(reference))
    # The fused path plans the crop on the displayed (rotated) geometry.
    whole = ffi.Compose([ffi.Resize((40, 20))], exif_transpose=True)(data)
    assert whole.shape == (3, 40, 20)
    assert _mad(whole, ffi.to_tensor_uint8(reference)) < 1.0


# --------------------------------------------------------------------------- sampling


def _torchvision_get_params(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rnd
) -> tuple[int, int, int, int]:
    """torchvision.transforms.RandomResizedCrop.get_params, with Python's random."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rnd.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rnd.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect_ratio))
        h = round(math.sqrt(target_area / aspect_ratio))
        if 0 < w <= width and 0 < h <= height:
            i = rnd.randint(0, height - h)
            j = rnd.randint(0, width - w)
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        h = height
        w = round(h * max(ratio))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


def _crop_stats(boxes: list[tuple[int, int, int, int]], width: int, height: int) -> dict:
    arr = np.array(boxes, dtype=np.float64)
    top, left, h, w = arr.T
    return {
        "area": (h * w / (width * height)),
        "log_ratio": np.log(w / h),
        "center_x": (left + w / 2) / width,
        "center_y": (top + h / 2) / height,
    }


@pytest.mark.parametrize(("width", "height"), [(500, 375), (120, 400)])
def test_crop_distribution_matches_torchvision(width: int, height: int):
    draws = 5000
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    rnd = random.Random(1)
    ref = [_torchvision_get_params(width, height, scale, ratio, rnd) for _ in range(draws)]
    gen = np.random.default_rng(2)
    ours = [
        ffi.RandomResizedCrop.get_params((width, height), scale, ratio, gen) for _ in range(draws)
    ]
    ref_stats, our_stats = _crop_stats(ref, width, height), _crop_stats(ours, width, height)
    for name in ref_stats:
        r, o = ref_stats[name], our_stats[name]
        # Means agree within ~5 standard errors; spreads within 5%.
        assert abs(r.mean() - o.mean()) < 5 * r.std() / math.sqrt(draws) + 1e-3, name
        assert abs(r.std() - o.std()) < 0.05 * r.std() + 1e-3, name
    # Every crop lies inside the image with the requested ratio range (up to rounding).
    for top, left, h, w in ours:
        assert top >= 0 and top + h <= height and left >= 0 and left + w <= width


def test_crop_fallback_for_extreme_aspect_ratios_is_exact():
    gen = np.random.default_rng(0)
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    rrc = ffi.RandomResizedCrop
    for _ in range(20):
        assert rrc.get_params((1000, 10), scale, ratio, gen) == (0, 493, 10, 13)
        assert rrc.get_params((10, 1000), scale, ratio, gen) == (493, 0, 13, 10)
    # In-range ratio but no attempt fits (area > image): the whole image.
    assert rrc.get_params((50, 40), (1.5, 2.0), (0.5, 2.0), gen) == (0, 0, 40, 50)
    for width, height in [(1000, 10), (10, 1000), (50, 40)]:
        rnd = random.Random(0)
        for _ in range(5):
            expected = _torchvision_get_params(width, height, scale, ratio, rnd)
            if width == 50:
                expected = _torchvision_get_params(width, height, (1.5, 2.0), (0.5, 2.0), rnd)
                assert rrc.get_params((50, 40), (1.5, 2.0), (0.5, 2.0), gen) == expected
            else:
                assert rrc.get_params((width, height), scale, ratio, gen) == expected


# --------------------------------------------------------------------------- fusion


def _pil_chain(transforms: list[Any], data: bytes) -> torch.Tensor:
    img = ffi.decode_image(data)
    for op in transforms:
        img = op.apply_pil(img)
    return ffi.to_tensor_uint8(img)


@pytest.mark.parametrize(
    "make",
    [
        lambda: [ffi.RandomResizedCrop(32), ffi.RandomHorizontalFlip()],
        lambda: [ffi.Resize(40), ffi.CenterCrop(32)],
        lambda: [ffi.RandomHorizontalFlip(p=1.0), ffi.CenterCrop((20, 33))],
        lambda: [ffi.RandomHorizontalFlip(), ffi.RandomResizedCrop((24, 30), scale=(0.3, 0.6))],
        lambda: [ffi.Resize(40), ffi.RandomResizedCrop(32)],  # resize, crop, resize: two plans
        lambda: [ffi.CenterCrop(50), ffi.Resize((20, 30), interpolation="lanczos")],
        lambda: [ffi.RandomResizedCrop(32, interpolation="nearest")],
        lambda: [ffi.RandomResizedCrop(32, interpolation="bicubic")],
    ],
)
def test_fused_path_matches_torchvision_style_pil_chain(make: Callable[[], list[Any]]):
    data = _png(64, 48)
    for index in range(6):
        key = (3, 0, index)
        fused = _with_key(key, lambda: ffi.Compose(make())(data))
        reference = _with_key(key, lambda: _pil_chain(make(), data))
        assert fused.shape == reference.shape
        # Same crop and flip; only the resampler (torch vs Pillow) differs slightly.
        assert _mad(fused, reference) < 1.0, index


def test_flip_happens_and_mirrors():
    data = _png(64, 48)
    plain = ffi.Compose([ffi.CenterCrop(32)])(data)
    flipped = ffi.Compose([ffi.RandomHorizontalFlip(p=1.0), ffi.CenterCrop(32)])(data)
    assert torch.equal(flipped, plain.flip(-1))
    assert not torch.equal(flipped, plain)


def test_resize_shorter_side_and_center_crop_padding_follow_torchvision():
    data = _png(60, 40)
    assert ffi.Compose([ffi.Resize(32)])(data).shape == (3, 32, 48)
    assert ffi.Compose([ffi.Resize(32, max_size=40)])(data).shape == (3, 26, 40)
    white = _encode(Image.new("RGB", (7, 5), (255, 255, 255)), "PNG")
    padded = ffi.Compose([ffi.CenterCrop(10)])(white)[0]
    # torchvision pads floor(3/2)=1 left, 2 right; floor(5/2)=2 top, 3 bottom.
    assert padded.shape == (10, 10)
    assert padded[2:7, 1:8].min().item() == 255
    assert padded.sum().item() == 255 * 35


def test_draft_decode_is_used_and_close_to_full_decode(monkeypatch: pytest.MonkeyPatch):
    data = _jpeg(960, 720, seed=5)
    encoded = ffi.EncodedImage(data)
    img, factor = encoded.decode(8)
    assert (factor, img.size) == (8.0, (120, 90))
    pipeline = ffi.Compose([ffi.RandomResizedCrop(64, scale=(0.5, 1.0))])
    keys = [(0, 0, i) for i in range(8)]
    drafted = [_with_key(k, lambda: pipeline(data)) for k in keys]
    monkeypatch.setattr(_plan, "DRAFT_GAP", float("inf"))
    full = [_with_key(k, lambda: pipeline(data)) for k in keys]
    mads = [_mad(a, b) for a, b in zip(drafted, full, strict=True)]
    assert max(mads) < 3.0
    assert min(mads) > 0.0  # the reduced decode really ran


def test_materialized_draft_matches_fused_draft():
    # A user callable after the crop forces the PIL path; on a drafted decode both paths
    # resample the same float box with Pillow, so the pixels are identical.
    data = _jpeg(960, 720, seed=6)
    fused = ffi.Compose([ffi.RandomResizedCrop(64, scale=(0.5, 1.0))])
    generic = ffi.Compose([ffi.RandomResizedCrop(64, scale=(0.5, 1.0)), lambda im: im])
    assert not isinstance(generic, ffi.SlotWriter)
    for index in range(4):
        a = _with_key((0, 0, index), lambda: fused(data))
        b = _with_key((0, 0, index), lambda: generic(data))
        assert torch.equal(a, b)


def test_pixel_view_is_zero_copy_and_outlives_the_image():
    rgb = Image.fromarray(_pixels(40, 30))
    view = _decode.pixel_view(rgb)
    assert view is not None and view.shape == (30, 40, 4)
    assert np.array_equal(view[:, :, :3], np.asarray(rgb))
    rgb.putpixel((3, 2), (1, 2, 3))  # the view sees Pillow's memory, not a copy
    assert view[2, 3, :3].tolist() == [1, 2, 3]
    expected = view[:, :, :3].copy()
    del rgb
    gc.collect()
    junk = [Image.new("RGB", (40, 30), (9, 9, 9)) for _ in range(50)]  # reuse freed memory
    assert np.array_equal(view[:, :, :3], expected) and len(junk) == 50
    gray = Image.fromarray(_pixels(40, 30)[:, :, 0])
    gray_view = _decode.pixel_view(gray)
    assert gray_view is not None and gray_view.shape == (30, 40, 1)
    assert np.array_equal(gray_view[:, :, 0], np.asarray(gray))
    assert _decode.pixel_view(rgb_a := Image.new("RGBA", (4, 4))) is None and rgb_a.mode == "RGBA"
    hwc = _decode.hwc_array(gray)
    assert hwc.shape == (30, 40, 1) and not hwc.flags.writeable


def test_fused_path_without_pixel_view_gives_identical_pixels(monkeypatch: pytest.MonkeyPatch):
    # Pillow without Arrow export, or a very large image (rows in several blocks):
    # the box is converted through a copy instead, with the same result.
    data = _jpeg(90, 70)
    pipelines = [
        _train(32),
        ffi.Compose([ffi.Resize(40), ffi.CenterCrop(32)]),
        _train(32, mode="L"),
    ]
    keys = [(5, 0, i) for i in range(4)]

    def run_all() -> list[torch.Tensor]:
        return [_with_key(k, functools.partial(p, data)) for p in pipelines for k in keys]

    direct = run_all()
    monkeypatch.setattr(_decode, "_SCRATCH_LIMIT_BYTES", 0)  # no scratch decode either
    monkeypatch.setattr(_decode, "pixel_view", lambda img: None)
    monkeypatch.setattr(_plan, "pixel_view", lambda img: None)
    copied = run_all()
    assert len(direct) == 12
    assert all(torch.equal(a, b) for a, b in zip(direct, copied, strict=True))


def test_scratch_decode_reuses_one_buffer_and_matches_decode(monkeypatch: pytest.MonkeyPatch):
    small, large = _jpeg(60, 40, seed=1), _jpeg(90, 70, seed=2)
    img, factor, pixels = ffi.EncodedImage(large).decode_scratch()
    assert factor == 1.0 and pixels is not None and pixels.shape == (70, 90, 4)
    reference = ffi.decode_image(large)
    assert np.array_equal(pixels[:, :, :3], np.asarray(reference))
    assert np.array_equal(np.asarray(img), np.asarray(reference))
    address = pixels.__array_interface__["data"][0]
    _, _, again = ffi.EncodedImage(small).decode_scratch()
    assert again is not None and again.__array_interface__["data"][0] == address
    assert np.array_equal(again[:, :, :3], np.asarray(ffi.decode_image(small)))
    gray = ffi.EncodedImage(large, "L").decode_scratch()[2]
    assert gray is not None and gray.shape == (70, 90, 1)
    assert np.array_equal(gray[:, :, 0], np.asarray(ffi.decode_image(large, mode="L")))
    # Where the scratch buffer is not used, the image owns its memory.
    assert ffi.EncodedImage(_png(60, 40)).decode_scratch()[2] is None
    assert ffi.EncodedImage(large, exif_transpose=True).decode_scratch()[2] is not None
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert ffi.EncodedImage(large).decode_scratch()[2] is None
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    with monkeypatch.context() as patch:  # a Pillow without map_buffer decodes normally
        patch.delattr(Image.core, "map_buffer")
        img, _, none = ffi.EncodedImage(large).decode_scratch()
        assert none is None and np.array_equal(np.asarray(img), np.asarray(reference))
    monkeypatch.setattr(_decode, "_SCRATCH_LIMIT_BYTES", 60 * 40 * 4)
    assert ffi.EncodedImage(small).decode_scratch()[2] is not None
    assert ffi.EncodedImage(large).decode_scratch()[2] is None


def test_fused_results_do_not_depend_on_what_the_thread_decoded_before(
    monkeypatch: pytest.MonkeyPatch,
):
    # The scratch buffer carries the previous image's pixels: every output must still
    # equal the one decoded into fresh memory, in any order, at any size.
    payloads = [_jpeg(w, h, seed=w) for w, h in [(90, 70), (50, 40), (120, 30), (64, 64)]]
    pipelines = [_train(24), ffi.Compose([ffi.Resize(30), ffi.CenterCrop(24)])]

    def run(pipeline: ffi.Compose, k: int) -> torch.Tensor:
        return _with_key((9, 0, k), functools.partial(pipeline, payloads[k]))

    with monkeypatch.context() as patch:
        patch.setattr(_decode, "_SCRATCH_LIMIT_BYTES", 0)
        fresh = [[run(p, k) for k in range(4)] for p in pipelines]
    for p, expected in zip(pipelines, fresh, strict=True):
        for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 3, 2]):
            for k in order:
                assert torch.equal(run(p, k), expected[k]), (order, k)


def test_torch_kernel_called_directly_equals_f_interpolate(monkeypatch: pytest.MonkeyPatch):
    data = _jpeg(90, 70, seed=3)
    pipelines = [_train(32), ffi.Compose([ffi.RandomResizedCrop(32, interpolation="bicubic")])]
    keys = [(2, 0, i) for i in range(3)]
    direct = [_with_key(k, functools.partial(p, data)) for p in pipelines for k in keys]
    assert set(_plan._AA_KERNELS) == {"bilinear", "bicubic"}
    monkeypatch.setattr(_plan, "_AA_KERNELS", {})
    generic = [_with_key(k, functools.partial(p, data)) for p in pipelines for k in keys]
    assert all(torch.equal(a, b) for a, b in zip(direct, generic, strict=True))


def test_lab_and_other_modes_convert_or_raise_decode_error():
    assert ffi.convert_mode(Image.new("LAB", (4, 4)), "L").mode == "L"
    with pytest.raises(DecodeError, match="cannot convert La image to RGB"):
        ffi.convert_mode(Image.new("La", (4, 4)), "RGB")


def test_draft_factor_keeps_the_output_resolution():
    plan = _plan.Plan.start((1000, 800))
    plan.crop_view(0, 0, 500, 460)
    plan.resize_view(224, 224, "bilinear")
    assert _plan.draft_factor(plan) == 2  # 460 / 224 = 2.05
    plan = _plan.Plan.start((1000, 800))
    plan.resize_view(224, 224, "bilinear")
    assert _plan.draft_factor(plan) == 2  # 800 / 224 = 3.6: 4 would go under 224
    assert _plan.draft_factor(_plan.Plan.start((1000, 800))) == 1


# --------------------------------------------------------------------------- determinism


def test_same_key_same_tensor_different_index_different():
    data = _jpeg(80, 60)
    pipeline = _train(32)
    a = _with_key((7, 1, 3), lambda: pipeline(data))
    b = _with_key((7, 1, 3), lambda: pipeline(data))
    c = _with_key((7, 1, 4), lambda: pipeline(data))
    d = _with_key((7, 2, 3), lambda: pipeline(data))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, d)


def test_results_identical_with_one_or_four_threads():
    payloads = [_jpeg(80, 60, seed=s) for s in range(4)]
    pipeline = _train(32)
    n = 24

    def run(threads: int) -> list[torch.Tensor]:
        results: list[torch.Tensor | None] = [None] * n

        def work(worker: int) -> None:
            for index in range(worker, n, threads):
                _rng.set_sample_key((11, 0, index))
                results[index] = pipeline(payloads[index % 4])
            _rng.set_sample_key(None)

        run_in_threads(work, threads, timeout_s=30)
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    one, four = run(1), run(4)
    assert all(torch.equal(x, y) for x, y in zip(one, four, strict=True))
    assert len({bytes(x.numpy()) for x in one}) == n  # every sample got its own crop


def test_sample_rng_is_philox_keyed_by_seed_with_epoch_and_index_in_the_counter():
    for seed, epoch, index in [(7, 1, 3), (0, 0, 0), (2**64 + 5, 3, -1), (-2, -3, 2**70)]:
        mask = 2**64 - 1
        expected = np.random.Generator(
            np.random.Philox(
                key=np.array([seed & mask, (seed >> 64) & mask], dtype=np.uint64),
                counter=np.array([0, 0, index & mask, epoch & mask], dtype=np.uint64),
            )
        ).random(6)

        def draws() -> list[float]:
            first = _rng.sample_rng().random(2).tolist()
            return first + _rng.sample_rng().random(4).tolist()  # same sample: continues

        assert _with_key((seed, epoch, index), draws) == expected.tolist(), (seed, epoch, index)
    firsts = {
        key: _with_key(key, lambda: _rng.sample_rng().random())
        for key in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (5, 0, 0), (2**64 + 5, 0, 0)]
    }
    assert len(set(firsts.values())) == len(firsts)
    assert _rng.sample_rng().random() != _rng.sample_rng().random()  # no key: unseeded


def test_sample_rng_streams_of_neighbouring_indices_look_independent():
    n = 4000
    draws = np.array([_with_key((3, 1, i), lambda: _rng.sample_rng().random(2)) for i in range(n)])
    first, second = draws[:, 0], draws[:, 1]
    sigma = math.sqrt(1 / 12 / n)
    assert abs(first.mean() - 0.5) < 5 * sigma
    assert abs(first.std() - math.sqrt(1 / 12)) < 0.01
    counts = np.histogram(first, bins=10, range=(0, 1))[0]
    assert np.all(np.abs(counts - n / 10) < 5 * math.sqrt(n / 10))
    # Index i vs i + 1, and a sample's first vs second draw: uncorrelated.
    for a, b in [(first[:-1], first[1:]), (first, second), (first[:-1], second[1:])]:
        assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(n)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("fraction", [0.9, 0.5, 0.01])
def test_truncated_jpeg_raises_decode_error(fraction: float):
    data = _jpeg(200, 150)
    cut = data[: int(len(data) * fraction)]
    with pytest.raises(DecodeError, match="truncated") as info:
        _with_key((0, 0, 0), lambda: _train(32)(cut))
    assert info.value.__cause__ is not None
    with pytest.raises(DecodeError, match="truncated"):
        ffi.decode_image(cut)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncation_message_names_format_and_size():
    data = _jpeg(200, 150)
    with pytest.raises(DecodeError) as info:
        ffi.decode_image(data[: len(data) // 2])
    assert f"truncated or corrupt image data (JPEG 200x150, {len(data) // 2} bytes)" in str(
        info.value
    )
    assert isinstance(info.value.__cause__, OSError)


def test_zero_bytes_and_text_raise_decode_error():
    with pytest.raises(DecodeError, match="zero bytes"):
        _train(32)(b"")
    html = b"<!DOCTYPE html><html><body>404 Not Found</body></html>"
    with pytest.raises(DecodeError, match=r"not an image.*b'<!DOCTYPE html><'") as info:
        _train(32)(html)
    assert isinstance(info.value.__cause__, Image.UnidentifiedImageError)
    with pytest.raises(TypeError, match="bytes-like"):
        _train(32)("photo.jpg")


def test_decompression_bomb_rejected_from_header(monkeypatch: pytest.MonkeyPatch):
    data = _jpeg(64, 48)
    with pytest.raises(DecodeError, match=r"decompression bomb: JPEG image of 64x48 = 3072 pixels"):
        ffi.decode_image(data, max_pixels=3000)
    with pytest.raises(DecodeError, match="> limit 1000 pixels"):
        _train(32, max_pixels=1000)(data)
    assert ffi.decode_image(data, max_pixels=3072).size == (64, 48)
    # The default follows Pillow's global; Pillow itself refuses above twice it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DecodeError, match="decompression bomb") as info:
        ffi.decode_image(data)
    assert isinstance(info.value.__cause__, Image.DecompressionBombError)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(DecodeError, match="2000"):
        ffi.decode_image(data)


# --------------------------------------------------------------------------- outputs


def test_out_writes_into_batch_row_and_returns_it():
    data = _jpeg(80, 60)
    pipeline = _train(32)
    assert isinstance(pipeline, ffi.SlotWriter)
    assert pipeline.sample_spec() == ((3, 32, 32), torch.uint8)
    batch = torch.zeros((4, 3, 32, 32), dtype=torch.uint8)
    row = _with_key((1, 0, 9), lambda: pipeline(data, out=batch[2]))
    assert row.data_ptr() == batch[2].data_ptr()
    assert torch.equal(batch[2], _with_key((1, 0, 9), lambda: pipeline(data)))
    assert batch[[0, 1, 3]].sum().item() == 0
    with pytest.raises(ConfigError, match=r"shape \(3, 32, 32\)"):
        pipeline(data, out=torch.zeros((3, 30, 32), dtype=torch.uint8))


def test_hwc_layout_and_single_channel():
    data = _jpeg(80, 60)
    chw = _with_key((0, 0, 5), lambda: _train(32)(data))
    hwc_pipe = _train(32, layout="HWC")
    assert hwc_pipe.sample_spec() == ((32, 32, 3), torch.uint8)
    hwc = _with_key((0, 0, 5), lambda: hwc_pipe(data))
    assert torch.equal(hwc, chw.permute(1, 2, 0))
    gray = _train(32, mode="L", layout="HWC")
    assert gray.sample_spec() == ((32, 32, 1), torch.uint8)
    assert _with_key((0, 0, 5), lambda: gray(data)).shape == (32, 32, 1)


@pytest.mark.parametrize("layout", ["CHW", "HWC"])
def test_float_normalize_matches_float64_reference(layout: str):
    data = _jpeg(80, 60)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    u8 = _with_key((0, 0, 2), lambda: _train(32, layout=layout)(data))
    pipe = ffi.Compose(
        [ffi.RandomResizedCrop(32), ffi.RandomHorizontalFlip(), ffi.ToFloat(mean, std)],
        layout=layout,
    )
    assert pipe.sample_spec()[1] == torch.float32
    out = torch.empty(pipe.sample_spec()[0], dtype=torch.float32)
    got = _with_key((0, 0, 2), lambda: pipe(data, out=out))
    assert got.data_ptr() == out.data_ptr()
    shape = (3, 1, 1) if layout == "CHW" else (1, 1, 3)
    ref = (u8.double() / 255.0 - torch.tensor(mean, dtype=torch.float64).reshape(shape)) / (
        torch.tensor(std, dtype=torch.float64).reshape(shape)
    )
    assert torch.allclose(got.double(), ref, atol=1e-5)
    assert not torch.allclose(got.double(), u8.double() / 255.0, atol=1e-2)


# --------------------------------------------------------------------------- API shape


def test_compose_picks_slotwriter_only_for_fixed_shapes():
    assert isinstance(ffi.Compose([ffi.Resize(256), ffi.CenterCrop(224)]), ffi.ImagePipeline)
    assert isinstance(ffi.RandomResizedCrop(224), ffi.SlotWriter)
    assert ffi.RandomResizedCrop(224).sample_spec() == ((3, 224, 224), torch.uint8)
    for transforms in ([ffi.Resize(256)], [ffi.CenterCrop(32), lambda im: im], []):
        pipeline = ffi.Compose(transforms)
        assert not isinstance(pipeline, ffi.SlotWriter)
        assert isinstance(pipeline, ffi.Compose)
    with pytest.raises(ConfigError, match="fixed output size"):
        ffi.ImagePipeline([ffi.Resize(256)])


def test_generic_path_runs_user_callables_on_pil():
    data = _jpeg(80, 60)
    seen: list[tuple[str, tuple[int, int]]] = []

    def rotate(img: Image.Image) -> Image.Image:
        seen.append((img.mode, img.size))
        return img.rotate(90)

    pipeline = ffi.Compose([ffi.RandomResizedCrop((20, 30)), rotate])
    out = _with_key((0, 0, 1), lambda: pipeline(data))
    assert seen == [("RGB", (30, 20))]
    assert out.shape == (3, 20, 30) and out.dtype == torch.uint8
    img = ffi.decode_image(memoryview(data))
    assert torch.equal(ffi.to_tensor_uint8(img), torch.from_numpy(np.array(img)).permute(2, 0, 1))
    assert ffi.to_tensor_uint8(img, layout="HWC").shape == (60, 80, 3)


def test_transforms_on_pil_return_pil_like_torchvision():
    img = Image.fromarray(_pixels(64, 48))
    assert ffi.RandomResizedCrop((20, 30))(img).size == (30, 20)
    assert ffi.Resize(24)(img).size == (32, 24)
    assert ffi.CenterCrop(16)(img).size == (16, 16)
    assert ffi.RandomHorizontalFlip(p=0.0)(img) is img
    assert ffi.RandomResizedCrop(16)(_jpeg()).shape == (3, 16, 16)
    # Compose also accepts a decoded image and still returns a tensor.
    cropped = ffi.Compose([ffi.CenterCrop(16)])(img)
    assert torch.equal(cropped, ffi.to_tensor_uint8(ffi.CenterCrop(16)(img)))
    gray = ffi.Compose([ffi.CenterCrop(16)], mode="L")(img)
    assert torch.equal(gray, ffi.to_tensor_uint8(ffi.CenterCrop(16)(img.convert("L"))))


def test_pipeline_pickles():
    data = _jpeg(80, 60)
    pipeline = _train(32, layout="HWC")
    clone = pickle.loads(pickle.dumps(pipeline))
    assert isinstance(clone, ffi.ImagePipeline)
    assert clone.sample_spec() == pipeline.sample_spec()
    assert torch.equal(
        _with_key((0, 0, 1), lambda: clone(data)), _with_key((0, 0, 1), lambda: pipeline(data))
    )


class _TorchvisionLikeMode:
    value = "bicubic"


def test_interpolation_accepts_names_pil_and_torchvision_enums():
    assert ffi.RandomResizedCrop(8, interpolation=Image.Resampling.BICUBIC).interpolation == (
        "bicubic"
    )
    assert ffi.Resize(8, interpolation=_TorchvisionLikeMode()).interpolation == "bicubic"
    with pytest.raises(ConfigError, match="interpolation must be one of"):
        ffi.Resize(8, interpolation="cubic-ish")
    with pytest.raises(ConfigError, match="mode must be one of"):
        ffi.Compose([ffi.CenterCrop(8)], mode="CMYK")
    with pytest.raises(ConfigError, match="scale and ratio"):
        ffi.RandomResizedCrop(8, scale=(1.0, 0.5))
