"""Partial JPEG decode: only the crop window, through nvImageCodec's CPU (libjpeg-turbo) backend.

Why: RandomResizedCrop keeps about half of an image's area, yet a full decode pays the
inverse DCT, upsampling and colour conversion for every pixel. libjpeg-turbo can skip the
scanlines below the window, entropy-decode only (no IDCT) the ones above it, and crop the
columns to iMCU boundaries (``jpeg_skip_scanlines`` / ``jpeg_crop_scanline``); DALI decodes
this way. nvImageCodec's CPU backend (``pip install nvidia-nvimgcodec-cu12``, one 32 MB
``py3-none`` wheel per platform, manylinux x86_64 and aarch64, CPython 3.9-3.14,
libjpeg-turbo inside, Apache-2.0, no CUDA needed for ``CPU_ONLY``) exposes it as a region
decode that releases the GIL.

Survey (``benchmarks/image_decode.py --decoders``: 200 ImageNet-like JPEGs of 320-640 px,
CPU ms per image of the whole process, one core, shared machine, one run)::

    decoder                 decodes              cpu ms/img
    Pillow 13 (fastfeed's)  full decode          0.834
    simplejpeg 1.9          full decode          0.767   (no region; DCT scaling only)
    opencv-headless 5.0     full decode          0.792   (no region; IMREAD_REDUCED_*)
    imagecodecs 2026.3      full decode          0.771   (no region)
    PyTurboJPEG 2.6         -                    needs a system libturbojpeg >= 3.0
    nvImageCodec 0.9 CPU    full decode          0.827
    nvImageCodec 0.9 CPU    RandomResizedCrop    0.661

Only nvImageCodec decodes a region. Its pixels equal a full decode's (same libjpeg-turbo,
islow IDCT, fancy upsampling): identical on baseline, progressive, 4:4:4, 4:2:2, 4:2:0,
grey and CMYK. Where the time goes: skipping the rows below the window is most of the
win; the rows above still cost their entropy decoding, and cropping columns saves little
(a bottom-half region costs more than a full decode; the exact window is cheapest).
Progressive files gain little (every scan is entropy-decoded first) but release the GIL.

Where the train transform's time goes (RandomResizedCrop 224 + flip into a CHW row, the
same 200 images, thread CPU per image, one core, shared machine)::

    region decode (libjpeg-turbo)            ~590 us   Huffman decoding ~2/3 of it: rows
                                                       above the window are entropy-decoded
    torch antialiased resize, channels-last   ~70 us
    flip + HWC->CHW copy into the row          ~38 us   (numpy, one strided copy)
    scan check, header walk, CodeStream        ~25 us   (cold JPEG bytes: ~8 us when cached)
    plan, RNG, Python glue                     ~25 us

Decode + resize + copy called back to back with no Python around them take ~730-745 us,
so ~0.75 ms is this path's floor here; what is left of the rest holds the GIL.

Why not ctypes over the libjpeg-turbo inside Pillow's wheel: it has ``jpeg_crop_scanline``
and ``jpeg_skip_scanlines`` but only the libjpeg API, whose ``error_exit`` must not return
(it ``longjmp``\\s in C); a ctypes callback cannot, so a corrupt file would ``exit()`` the
process. The TurboJPEG API (which returns error codes) ships in no wheel we can rely on.

Everything this backend does not take (no nvImageCodec, not a JPEG, a truncated stream or
bytes after EOI, not 8-bit, CMYK/YCCK, lossless/arithmetic frames, a stray marker in the
scan data, an EXIF-oriented request, a failed decode) returns None and the caller takes
the Pillow path, which raises the precise :class:`~fastfeed.errors.DecodeError`. A file
that passes these checks and still fails makes nvImageCodec print two log lines to stderr
(it has no switch for them) before the Pillow path reports it.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import tempfile
import threading
from typing import Any

import numpy as np
import torch
from PIL import Image

from fastfeed.image._decode import EncodedImage, _pixel_limit
from fastfeed.image._plan import Plan, draft_factor, execute_region_into, region_box

__all__ = [
    "JpegHeader",
    "PartialJpeg",
    "available",
    "decode_region",
    "open_jpeg",
    "open_partial",
    "set_enabled",
]

_SOI = b"\xff\xd8"
_EOI = b"\xff\xd9"
_ENV_DISABLE = "FASTFEED_PARTIAL_JPEG"  # "0" turns the backend off (Pillow everywhere)
# A region larger than this gets its own image instead of the thread's scratch image
# (the scratch image keeps its largest size for the thread's lifetime).
_SCRATCH_LIMIT_BYTES = 16 << 20

_lock = threading.Lock()
_module: Any = None
_loaded = False
_enabled = os.environ.get(_ENV_DISABLE, "1") != "0"
_local = threading.local()
_ext_dir: str | None = None


def _nv() -> Any:
    """The ``nvidia.nvimgcodec`` module, or None when it does not import."""
    global _module, _loaded
    if not _loaded:
        with _lock:
            if not _loaded:
                _module, _loaded = _import_quietly(), True
    return _module


def _import_quietly() -> Any:
    """Import nvImageCodec with only its CPU JPEG extension.

    It loads every extension in its folder at import; without CUDA the nvJPEG, nvJPEG2000
    and nvTIFF ones print nine lines of errors to stderr. ``NVIMGCODEC_EXTENSIONS_PATH``
    pointed (for the import only, unless the user set it) at a private folder holding a
    link to the libjpeg-turbo extension keeps it quiet.
    """
    key = "NVIMGCODEC_EXTENSIONS_PATH"
    user_set = key in os.environ
    try:
        spec = importlib.util.find_spec("nvidia.nvimgcodec")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    if not user_set:
        folder = _jpeg_only_extensions(spec.submodule_search_locations[0])
        if folder is not None:
            os.environ[key] = folder
    try:
        from nvidia import nvimgcodec  # type: ignore[import-not-found]
    except Exception:  # a wheel for another platform, a missing system library
        return None
    finally:
        if not user_set:
            os.environ.pop(key, None)
            _remove_ext_dir()  # loaded at import: the link is not needed any more
    return nvimgcodec


def available() -> bool:
    """Whether partial JPEG decode is on: nvImageCodec imports and it is not disabled."""
    return _enabled and _nv() is not None


def set_enabled(enabled: bool) -> bool:
    """Turn the partial-decode backend on or off (process-wide); returns the old setting.

    ``FASTFEED_PARTIAL_JPEG=0`` in the environment starts with it off.
    """
    global _enabled
    old, _enabled = _enabled, bool(enabled)
    return old


def _remove_ext_dir() -> None:
    global _ext_dir
    if _ext_dir is not None:
        shutil.rmtree(_ext_dir, ignore_errors=True)
        _ext_dir = None


def _jpeg_only_extensions(package_dir: str) -> str | None:
    """A private folder holding only a link to nvImageCodec's libjpeg-turbo extension."""
    global _ext_dir
    if _ext_dir is None:
        found = glob.glob(os.path.join(package_dir, "extensions", "libjpeg_turbo_ext.so*"))
        if not found:
            return None
        folder = tempfile.mkdtemp(prefix="fastfeed-nvimgcodec-")
        os.symlink(found[0], os.path.join(folder, os.path.basename(found[0])))
        _ext_dir = folder
    return _ext_dir


def _decoder() -> Any:
    """This thread's CPU-only decoder (one per thread: a decoder runs one decode at a time)."""
    decoder = getattr(_local, "decoder", None)
    if decoder is None:
        nv = _nv()
        decoder = nv.Decoder(
            max_num_cpu_threads=1,
            device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY,
            backends=[nv.Backend(nv.BackendKind.CPU_ONLY)],
        )
        _local.params = {
            "RGB": nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.ColorSpec.SRGB),
            "L": nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.ColorSpec.GRAY),
        }
        _local.scratch = None
        _local.decoder = decoder
    return decoder


class JpegHeader:
    """A JPEG checked for partial decode, with nvImageCodec's handle on its stream.

    Attributes:
        size: (width, height) in pixels.
        channels: Components in the file (1 grey, 3 YCbCr).
        nbytes: Length of the encoded stream in bytes.
    """

    __slots__ = ("_buffer", "_stream", "channels", "nbytes", "size")

    def __init__(
        self, stream: Any, buffer: Any, size: tuple[int, int], channels: int, nbytes: int
    ) -> None:
        self._stream = stream
        self._buffer = buffer  # the stream may point into it: keep it alive as long
        self.size = size
        self.channels = channels
        self.nbytes = nbytes


def open_jpeg(data: Any) -> JpegHeader | None:
    """Check a JPEG for partial decode, or None where the Pillow path must run.

    The header is read by a walk over segment lengths (a handful of steps, ~3 us: no
    segment's content is parsed, unlike Pillow's ``Image.open``) that finds the frame
    and the first scan; nvImageCodec parses the stream in C++ (~1 us).

    None for: the backend off or missing, not a JPEG, a stream that does not end in EOI
    (truncated, or trailing bytes: Pillow reports or tolerates those precisely), not
    baseline/extended/progressive Huffman, not 8-bit, not 1 or 3 components (CMYK and
    YCCK convert through Pillow's formula), or a stray marker in sequential scan data.
    """
    if not _enabled:
        return None
    nv = _module if _loaded else _nv()
    if nv is None:
        return None
    if isinstance(data, bytes):
        buffer: Any = data
        nbytes = len(data)
        framed = data.startswith(_SOI) and data.endswith(_EOI)
    else:
        try:
            view = memoryview(data).cast("B")
        except TypeError:  # not bytes-like, or not contiguous: EncodedImage says which
            return None
        buffer, nbytes = np.frombuffer(view, np.uint8), view.nbytes
        framed = nbytes >= 4 and view[:2] == _SOI and view[-2:] == _EOI
    if not framed:
        return None
    frame = _read_frame(buffer)
    if frame is None:
        return None
    marker, precision, height, width, channels, scan_start = frame
    if (
        precision != 8
        or channels not in (1, 3)
        or height == 0  # the height comes later (DNL): Pillow's business
        or width == 0
        or (marker != _PROGRESSIVE and not _scan_is_clean(buffer, nbytes, scan_start))
    ):
        return None
    try:
        stream = nv.CodeStream(buffer)
    except Exception:  # nvImageCodec raises RuntimeError on what it cannot parse
        return None
    return JpegHeader(stream, buffer, (width, height), channels, nbytes)


# Frame types the partial path takes: baseline, extended sequential, progressive (Huffman).
_PROGRESSIVE = 0xC2
_FRAMES = frozenset({0xC0, 0xC1, 0xC2})
# Luma sampling factors (h << 4 | v) of 4:4:4, 4:2:2 and 4:2:0 with chroma at 1x1: the
# layouts whose region pixels are checked equal to Pillow's (tests/image).
_LUMA_SAMPLING = frozenset({0x11, 0x21, 0x22})
# Segments at most this many lie before the first scan of a sane file (APPn, DQT, DHT,
# SOF, DRI, COM, ...); more, and the Pillow path judges the file.
_MAX_SEGMENTS = 64


def _read_frame(buffer: Any) -> tuple[int, int, int, int, int, int] | None:
    """(SOF marker, precision, height, width, components, first scan's data offset).

    None where the segments before the first scan do not chain up, there is no SOF
    before it, the frame is not one of :data:`_FRAMES` (lossless, arithmetic, ...), or
    a colour frame's sampling is not 4:4:4, 4:2:2 or 4:2:0.
    """
    data = buffer if isinstance(buffer, bytes) else memoryview(buffer)
    size = len(data)
    pos, sof = 2, None
    for _ in range(_MAX_SEGMENTS):
        if pos + 4 > size or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        length = (data[pos + 2] << 8) | data[pos + 3]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            channels = data[pos + 9] if pos + 10 <= size else 0
            if marker not in _FRAMES or pos + 10 + 3 * channels > size:
                return None
            if channels == 3 and (
                data[pos + 11] not in _LUMA_SAMPLING
                or data[pos + 14] != 0x11
                or data[pos + 17] != 0x11
            ):
                return None  # 4:4:0, 4:1:1, subsampled chroma planes...: Pillow's path
            sof = (
                marker,
                data[pos + 4],
                (data[pos + 5] << 8) | data[pos + 6],
                (data[pos + 7] << 8) | data[pos + 8],
                channels,
            )
        if marker == 0xDA:
            if sof is None:
                return None
            return (*sof, pos + 2 + length)
        pos += 2 + length
    return None


def _scan_is_clean(buffer: Any, nbytes: int, scan_start: int) -> bool:
    """Whether sequential JPEG scan data from ``scan_start`` holds no stray marker.

    Why: a region decode stops after the region's last row and never reads the rest, so
    a marker where pixels should be (corruption that makes Pillow raise "broken data
    stream" when it finishes the file) would go unnoticed: the sample would decode to
    grey instead of failing. In valid scan data every 0xFF is followed by 0x00 (a
    stuffed byte) or RST0-7, with the file's final EOI after it. A few numpy passes
    that release the GIL (~10 us for 90 KB). Progressive files need no check: their
    scans are all read before the first row comes out.
    """
    if scan_start >= nbytes - 2:
        return False
    scan = np.frombuffer(buffer, np.uint8, count=nbytes - 2 - scan_start, offset=scan_start)
    # Two compares, an AND and an any(): 10 us for 90 KB, where counting the 0xFF bytes
    # and the 0xFF00 pairs separately took 12 (five passes).
    marker = scan[:-1] == 0xFF
    np.logical_and(marker, scan[1:] != 0, out=marker)
    if not marker.any():
        return True
    after = scan[1:][marker]  # restart markers, or a stray marker
    return bool(np.all((after & 0xF8) == 0xD0))


def decode_region(
    header: JpegHeader, box: tuple[int, int, int, int], mode: str, *, scratch: bool = False
) -> np.ndarray | None:
    """Decode only ``box`` = (x0, y0, x1, y1) of the image, the GIL released meanwhile.

    Args:
        header: From :func:`open_jpeg`.
        box: Region in pixels, inside the image, non-empty.
        mode: ``"RGB"`` or ``"L"``.
        scratch: Decode into this thread's scratch image (regions up to
            ``_SCRATCH_LIMIT_BYTES``): no allocation, but the array is valid only until
            the thread's next scratch decode. For callers that copy the pixels out at once.

    Returns:
        A (y1 - y0, x1 - x0, C) uint8 array (C = 3 or 1) equal to the same box of a full
        decode, or None when the decode failed (the caller falls back to Pillow).
    """
    nv = _module
    local = _local
    decoder = getattr(local, "decoder", None) or _decoder()
    x0, y0, x1, y1 = box
    width, height = header.size
    if x0 == 0 and y0 == 0 and x1 == width and y1 == height:
        stream = header._stream
    else:
        stream = header._stream.get_sub_code_stream(region=nv.Region(y0, x0, y1, x1))
    channels = 3 if mode == "RGB" else 1
    if scratch and (x1 - x0) * (y1 - y0) * channels <= _SCRATCH_LIMIT_BYTES:
        # A reused image: nvImageCodec grows its buffer only for a larger region, so
        # the thread's decodes stop allocating (and page-faulting) after warm-up.
        image = decoder.decode(stream, params=local.params[mode], image=local.scratch)
        if image is not None:
            local.scratch = image
    else:
        image = decoder.decode(stream, params=local.params[mode])
    if image is None:
        return None
    pixels = np.asarray(image)  # a CPU image exposes __array_interface__ itself
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.shape != (y1 - y0, x1 - x0, channels) or pixels.dtype != np.uint8:
        return None
    return pixels


class PartialJpeg:
    """A JPEG opened for partial decode; behaves as an :class:`EncodedImage` otherwise.

    :meth:`execute` decodes only the plan's source region and writes the result; every
    other request (a full or DCT-reduced decode for the generic path, or a fallback after
    :meth:`execute` declines) goes to an :class:`EncodedImage` made on first use, so
    errors and pixels there are exactly the Pillow path's.

    Args:
        data: The encoded bytes.
        header: Their :func:`open_jpeg` header.
        mode: ``"RGB"`` or ``"L"``.
        max_pixels: Decompression-bomb limit, as :class:`EncodedImage` takes it.
    """

    __slots__ = ("_data", "_encoded", "_max_pixels", "header", "mode", "nbytes", "size")

    def __init__(self, data: Any, header: JpegHeader, mode: str, max_pixels: int | None) -> None:
        self._data = data
        self.header = header
        self.mode = mode
        self._max_pixels = max_pixels
        self._encoded: EncodedImage | None = None
        self.size = header.size
        self.nbytes = header.nbytes

    def encoded(self) -> EncodedImage:
        """The Pillow-backed :class:`EncodedImage` of the same bytes (opened once)."""
        if self._encoded is None:
            self._encoded = EncodedImage(self._data, self.mode, max_pixels=self._max_pixels)
        return self._encoded

    def decode(self, reduce: int = 1) -> tuple[Image.Image, float]:
        """:meth:`EncodedImage.decode` (Pillow)."""
        return self.encoded().decode(reduce)

    def decode_scratch(self, reduce: int = 1) -> tuple[Image.Image, float, np.ndarray | None]:
        """:meth:`EncodedImage.decode_scratch` (Pillow)."""
        return self.encoded().decode_scratch(reduce)

    def execute(self, plan: Plan, out: torch.Tensor, layout: str) -> torch.Tensor | None:
        """Decode only ``plan``'s source region and write the plan's result into ``out``.

        Returns:
            ``out``, or None where the Pillow path should run instead: the crop is large
            enough for a DCT-reduced full decode (1/2..1/8 of the pixels, cheaper than a
            full-resolution region), or the region decode failed.
        """
        if draft_factor(plan) > 1:
            return None
        box = region_box(plan, self.size)
        region = decode_region(self.header, box, self.mode, scratch=True)
        if region is None:
            return None
        return execute_region_into(region, box[:2], plan, out, layout)


def open_partial(
    data: Any, mode: str, *, exif_transpose: bool, max_pixels: int | None
) -> PartialJpeg | None:
    """A :class:`PartialJpeg` for ``data``, or None where the Pillow path must open it.

    None also for an EXIF-oriented request and for a decompression bomb (the Pillow path
    then raises the :class:`~fastfeed.errors.DecodeError` with the usual message).
    """
    if exif_transpose:
        return None
    header = open_jpeg(data)
    if header is None:
        return None
    width, height = header.size
    limit = _pixel_limit(max_pixels)
    if limit is not None and width * height > limit:
        return None
    return PartialJpeg(data, header, mode, max_pixels)
