"""Bytes → PIL image: header checks, lazy (draftable) decode, mode conversion, tensor export."""

from __future__ import annotations

import ctypes
import io
import threading
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from fastfeed.errors import ConfigError, DecodeError

__all__ = ["EncodedImage", "convert_mode", "decode_image", "to_tensor_uint8"]

OUTPUT_MODES = ("RGB", "L")
LAYOUTS = ("CHW", "HWC")
_EXIF_ORIENTATION_TAG = 0x0112
# Orientations 5..8 rotate by 90 degrees, so the displayed width and height swap.
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def check_mode_layout(mode: str, layout: str) -> None:
    """Raise :class:`ConfigError` unless ``mode`` and ``layout`` are supported output options."""
    if mode not in OUTPUT_MODES:
        raise ConfigError(f"mode must be one of {OUTPUT_MODES}, got {mode!r}")
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _pixel_limit(max_pixels: int | None) -> int | None:
    # Read Pillow's global at call time, so a user who raises PIL.Image.MAX_IMAGE_PIXELS
    # sees it honoured here too.
    return Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels


def _describe_head(view: memoryview) -> str:
    return repr(bytes(view[:16]))


class EncodedImage:
    """An image whose header is parsed and checked but whose pixels are not decoded yet.

    Opening reads only the header, so the caller can plan a crop from :attr:`size` and
    then ask :meth:`decode` (once) for a reduced (JPEG DCT-domain) decode that still
    covers it.

    Args:
        data: Encoded image bytes (``bytes`` or any bytes-like object).
        mode: Output mode, ``"RGB"`` or ``"L"``.
        exif_transpose: Apply the EXIF orientation tag (rotate/mirror as a viewer would).
        max_pixels: Refuse images with more than this many pixels (width x height) as
            decompression bombs; ``None`` means Pillow's ``PIL.Image.MAX_IMAGE_PIXELS``.

    Raises:
        DecodeError: Zero bytes, not an image, an unreadable header, or a decompression bomb.
        TypeError: ``data`` is not bytes-like.
    """

    def __init__(
        self,
        data: Any,
        mode: str = "RGB",
        *,
        exif_transpose: bool = False,
        max_pixels: int | None = None,
    ) -> None:
        try:
            view = memoryview(data)
        except TypeError:
            raise TypeError(
                f"expected encoded image bytes (bytes-like), got {type(data).__name__}"
            ) from None
        if view.nbytes == 0:
            raise DecodeError("cannot decode an image from zero bytes")
        self.mode = mode
        self.nbytes = view.nbytes
        # BytesIO shares a bytes object's buffer; other bytes-likes are copied once here.
        buffer = io.BytesIO(data if isinstance(data, bytes) else view.cast("B"))
        try:
            img = Image.open(buffer)
        except Image.DecompressionBombError as exc:
            raise DecodeError(f"decompression bomb rejected by Pillow: {exc}") from exc
        except Image.UnidentifiedImageError as exc:
            raise DecodeError(
                f"not an image, or its header is truncated: {view.nbytes} bytes starting "
                f"{_describe_head(view)} match no format Pillow can read"
            ) from exc
        except MemoryError:
            raise
        except Exception as exc:  # Pillow plugins raise many types on corrupt headers
            raise DecodeError(
                f"truncated or corrupt image header ({view.nbytes} bytes): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        width, height = img.size
        limit = _pixel_limit(max_pixels)
        if limit is not None and width * height > limit:
            raise DecodeError(
                f"decompression bomb: {img.format} image of {width}x{height} = "
                f"{width * height} pixels > limit {limit} pixels"
            )
        self._img = img
        self.format = img.format
        self.orientation = _orientation(img) if exif_transpose else 1
        swap = self.orientation in _SWAPPING_ORIENTATIONS
        self.size: tuple[int, int] = (height, width) if swap else (width, height)
        """(width, height) as displayed, i.e. after the EXIF orientation when applied."""

    def decode(self, reduce: int = 1) -> tuple[Image.Image, float]:
        """Decode the pixels, optionally reduced in the JPEG DCT domain.

        Args:
            reduce: Largest integer factor (1, 2, 4 or 8) the caller can accept; JPEG
                decodes at 1/reduce resolution (libjpeg-turbo scaled IDCT), other
                formats ignore it.

        Returns:
            The decoded image in :attr:`mode` and orientation, and the factor it was
            actually reduced by (image coordinate = original coordinate / factor).

        Raises:
            DecodeError: Truncated or corrupt pixel data, or a mode that cannot convert.
        """
        img, factor, _ = self._decode(reduce, scratch=False)
        return img, factor

    def decode_scratch(self, reduce: int = 1) -> tuple[Image.Image, float, np.ndarray | None]:
        """:meth:`decode`, but a JPEG decodes into this thread's reusable pixel buffer.

        Why: Pillow allocates and zeroes (calloc) fresh memory for every decode while
        holding the GIL, and the pixels then need exporting to numpy. Here libjpeg writes
        straight into a numpy buffer that the thread reuses. Only for a caller that is
        done with the image before this thread decodes again (the fused path, which
        copies the result into its output row): the next scratch decode overwrites it.

        Returns:
            The image, the reduction factor, and a writable-but-never-write uint8 view of
            its pixels, ``(H, W, 4)`` for RGB (channel 3 is padding) or ``(H, W, 1)`` for
            L, as :func:`pixel_view` gives; None where the image decoded into its own
            memory instead (not a JPEG, EXIF-rotated, another mode, larger than
            ``_SCRATCH_LIMIT_BYTES``, or ``ImageFile.LOAD_TRUNCATED_IMAGES`` set).

        Raises:
            DecodeError: As :meth:`decode`.
        """
        return self._decode(reduce, scratch=True)

    def _decode(
        self, reduce: int, *, scratch: bool
    ) -> tuple[Image.Image, float, np.ndarray | None]:
        img = self._img
        factor = 1.0
        if self.format == "JPEG" and (reduce > 1 or self.mode == "L"):
            width, height = img.size
            # Requesting (W // r, H // r) makes Pillow pick exactly the factor r (or the
            # next power of two below it), never a larger one.
            request = (width // reduce, height // reduce) if reduce > 1 else None
            drafted = img.draft(self.mode, request)
            if drafted is not None and request is not None:
                factor = width / drafted[1][2]
        if self.format == "JPEG":
            # One read and one libjpeg call for the whole stream, instead of a Python
            # read/concatenate/decode round per 64 KiB block, each holding the GIL.
            img.decodermaxblock = max(getattr(img, "decodermaxblock", 0), self.nbytes)
        pixels = core = None
        if (
            scratch
            and self.format == "JPEG"
            and img.mode == self.mode
            and self.orientation == 1
            # A truncated file would leave the previous image's pixels in the buffer.
            and not ImageFile.LOAD_TRUNCATED_IMAGES
        ):
            pixels = _scratch_pixels(img.size, self.mode)
            if pixels is not None:
                # Pillow's own decoder target, mapped on our memory (what frombuffer does);
                # ImageFile.load() only allocates when the image has none yet.
                try:
                    core = Image.core.map_buffer(pixels, img.size, "raw", 0, (self.mode, 0, 1))
                    img.im = core
                except (AttributeError, TypeError, ValueError):  # a Pillow without them
                    pixels = core = None
        try:
            # Never with ImageFile.LOAD_TRUNCATED_IMAGES: a cut file must fail here.
            img.load()
        except MemoryError:
            raise
        except Exception as exc:  # decoders raise OSError, SyntaxError, struct.error, ...
            raise DecodeError(
                f"truncated or corrupt image data ({self.format} {self._img.size[0]}x"
                f"{self._img.size[1]}, {self.nbytes} bytes): {type(exc).__name__}: {exc}"
            ) from exc
        if core is not None and img.im is not core:
            pixels = None  # a Pillow that ignores a preset target: the image has its own
        if self.orientation > 1:
            img = ImageOps.exif_transpose(img)  # type: ignore[assignment]  # an Image now
        return convert_mode(img, self.mode), factor, pixels


# A decode larger than this gets its own memory instead of the thread's scratch buffer,
# which lives as long as the thread.
_SCRATCH_LIMIT_BYTES = 16 << 20
_scratch = threading.local()


def _scratch_pixels(size: tuple[int, int], mode: str) -> np.ndarray | None:
    """This thread's scratch buffer as an (H, W, 4) RGB / (H, W, 1) L array, or None if too big."""
    width, height = size
    channels = 4 if mode == "RGB" else 1  # Pillow stores RGB as 4 bytes per pixel
    nbytes = width * height * channels
    if nbytes > _SCRATCH_LIMIT_BYTES or nbytes == 0:
        return None
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.nbytes < nbytes:
        # Whole MiB, so images of similar sizes share one allocation.
        buffer = _scratch.buffer = np.empty(-(-nbytes // (1 << 20)) << 20, dtype=np.uint8)
    return buffer[:nbytes].reshape(height, width, channels)


def _orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # a corrupt EXIF block must not fail an otherwise good image
        return 1
    return value if 1 <= value <= 8 else 1


def convert_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert a decoded image to ``mode`` (``"RGB"`` or ``"L"``).

    Alpha is dropped without compositing (as torchvision's ``pil_loader`` does), palette
    transparency included; 16-bit and 32-bit integer images keep their high byte
    (``value >> 8``) instead of Pillow's clip at 255, which would turn most of a 16-bit
    image white.

    Raises:
        DecodeError: Pillow cannot convert this mode.
    """
    if img.mode == mode:
        return img
    try:
        if img.mode in _SIXTEEN_BIT_MODES:
            wide = np.asarray(img).astype(np.int64)
            narrow = (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
            img = Image.fromarray(narrow)
            return img if mode == "L" else img.convert(mode)
        if img.mode == "P" and "transparency" in img.info:
            # Through RGBA: Pillow warns when palette transparency meets a direct convert.
            img = img.convert("RGBA")
        try:
            return img.convert(mode)
        except ValueError:
            if mode == "RGB":
                raise
            return img.convert("RGB").convert(mode)  # e.g. LAB has no direct path to L
    except (ValueError, OSError) as exc:
        raise DecodeError(f"cannot convert {img.mode} image to {mode}: {exc}") from exc


def decode_image(
    data: Any,
    mode: str = "RGB",
    *,
    exif_transpose: bool = False,
    max_pixels: int | None = None,
) -> Image.Image:
    """Decode encoded image bytes into a fully loaded PIL image of ``mode``.

    The building block for the generic path:
    ``transform=lambda b: tv_transform(fastfeed.image.decode_image(b))``.

    Args:
        data: Encoded bytes (JPEG, PNG, WebP, ... anything Pillow reads).
        mode: ``"RGB"`` (default) or ``"L"``.
        exif_transpose: Apply the EXIF orientation (off by default, like torchvision).
        max_pixels: Decompression-bomb limit in pixels; ``None`` = ``PIL.Image.MAX_IMAGE_PIXELS``.

    Returns:
        The decoded image.

    Raises:
        DecodeError: Zero bytes, not an image, truncated data, or a decompression bomb.
    """
    check_mode_layout(mode, "CHW")
    encoded = EncodedImage(data, mode, exif_transpose=exif_transpose, max_pixels=max_pixels)
    return encoded.decode()[0]


class _ArrowSchema(ctypes.Structure):
    """``struct ArrowSchema`` of the Arrow C data interface (a stable ABI)."""


_ArrowSchema._fields_ = [
    ("format", ctypes.c_char_p),
    ("name", ctypes.c_char_p),
    ("metadata", ctypes.c_char_p),
    ("flags", ctypes.c_int64),
    ("n_children", ctypes.c_int64),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowSchema))),
    ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p),
    ("private_data", ctypes.c_void_p),
]


class _ArrowArray(ctypes.Structure):
    """``struct ArrowArray`` of the Arrow C data interface (a stable ABI)."""


_ArrowArray._fields_ = [
    ("length", ctypes.c_int64),
    ("null_count", ctypes.c_int64),
    ("offset", ctypes.c_int64),
    ("n_buffers", ctypes.c_int64),
    ("n_children", ctypes.c_int64),
    ("buffers", ctypes.POINTER(ctypes.c_void_p)),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))),
    ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p),
    ("private_data", ctypes.c_void_p),
]

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]

# Arrow formats of Pillow's exports: RGB is a fixed-size list of 4 uint8 per pixel (Pillow
# stores RGB as RGBX), L is plain uint8.
_ARROW_LAYOUTS = {"RGB": (b"+w:4", 4), "L": (b"C", 1)}


class _PillowPixels:
    """The numpy base of a :func:`pixel_view`: holds the Arrow capsules, whose release
    callback (run when this object dies) lets Pillow free its memory."""

    __slots__ = ("__array_interface__", "_capsules")

    def __init__(self, interface: dict[str, Any], capsules: tuple[object, object]) -> None:
        self.__array_interface__ = interface
        self._capsules = capsules


def pixel_view(img: Image.Image) -> np.ndarray | None:
    """A zero-copy uint8 view of an RGB or L image's own pixel memory, or None.

    Why: ``np.asarray(img)`` runs ``Image.tobytes()``, a Python loop over Pillow's raw
    encoder that copies every pixel while holding the GIL. The Arrow C data interface
    (``Image.__arrow_c_array__``, Pillow >= 11.2) exports the memory instead, in ~5 us.

    Returns:
        ``(H, W, 4)`` for RGB (Pillow's RGBX storage; channel 3 is padding) or
        ``(H, W, 1)`` for L. The array keeps the memory alive on its own, even after the
        image is gone. It is writable only so torch can wrap it without a warning: never
        write to it (the image sees every write). None for other modes, an older Pillow,
        or an image whose rows Pillow did not allocate as one block (very large images).
    """
    layout = _ARROW_LAYOUTS.get(img.mode)
    export = getattr(img, "__arrow_c_array__", None)
    if layout is None or export is None:
        return None
    try:
        capsules = export()
    except ValueError:  # "Image rows are not contiguous in memory"
        return None
    schema = _ArrowSchema.from_address(_capsule_pointer(capsules[0], b"arrow_schema"))
    array = _ArrowArray.from_address(_capsule_pointer(capsules[1], b"arrow_array"))
    width, height = img.size
    fmt, channels = layout
    if schema.format != fmt or array.length != width * height:
        return None
    if channels > 1:  # the pixels live in the list's single uint8 child
        array = array.children[0].contents
    address = array.buffers[1]
    if not address:
        return None
    interface = {
        "version": 3,
        "shape": (height, width, channels),
        "typestr": "|u1",
        "data": (address + array.offset, False),
    }
    return np.asarray(_PillowPixels(interface, capsules))


def hwc_array(img: Image.Image) -> np.ndarray:
    """The image's pixels as a read-only uint8 array of shape (H, W, C).

    RGB and L images give a zero-copy view of Pillow's memory (:func:`pixel_view`), so
    use it before the image changes; other modes are copied.

    Raises:
        ConfigError: The mode does not have 8 bits per channel (convert it first).
    """
    view = pixel_view(img)
    if view is not None:
        view = view[:, :, :3] if img.mode == "RGB" else view
        view.flags.writeable = False
        return view
    if img.mode == "1":
        img = img.convert("L")
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise ConfigError(
            f"cannot make a uint8 tensor from a {img.mode} image; convert it first "
            f"(decode_image(..., mode='RGB') or img.convert('RGB'))"
        )
    return arr[:, :, None] if arr.ndim == 2 else arr


def check_out(out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Raise :class:`ConfigError` unless ``out`` is a CPU tensor of ``shape`` and ``dtype``."""
    # torch.Size equals a tuple; is_cpu is the cheapest device test (no device object).
    if out.shape != tuple(shape) or out.dtype != dtype or not out.is_cpu:
        raise ConfigError(
            f"out must be a CPU tensor of shape {tuple(shape)} and dtype {dtype}, got "
            f"shape {tuple(out.shape)}, dtype {out.dtype} on {out.device}"
        )


def write_hwc(src: np.ndarray, out: torch.Tensor, layout: str) -> torch.Tensor:
    """Copy an (H, W, C) uint8 array view (any strides) into ``out`` in one strided copy."""
    dst = out.numpy()
    if layout == "CHW":
        dst = dst.transpose(1, 2, 0)
    np.copyto(dst, src)
    return out


def to_tensor_uint8(
    img: Image.Image, out: torch.Tensor | None = None, *, layout: str = "CHW"
) -> torch.Tensor:
    """A PIL image as a uint8 tensor, (C, H, W) by default or (H, W, C) with ``layout="HWC"``.

    Args:
        img: An image with 8 bits per channel (L, LA, RGB, RGBA, CMYK, P, 1).
        out: Optional CPU uint8 tensor of exactly the result's shape to write into.
        layout: ``"CHW"`` (torchvision's layout) or ``"HWC"``.

    Returns:
        ``out`` when given, else a new tensor.

    Raises:
        ConfigError: Unsupported layout or mode, or ``out`` of the wrong shape/dtype.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    arr = hwc_array(img)
    height, width, channels = arr.shape
    shape = (channels, height, width) if layout == "CHW" else (height, width, channels)
    if out is None:
        out = torch.empty(shape, dtype=torch.uint8)
    else:
        check_out(out, shape, torch.uint8)
    return write_hwc(arr, out, layout)
