"""The fused geometry of a transform chain and its execution into a tensor row.

A run of crops, resizes and flips collapses into one :class:`Plan`::

    view = flip?( crop of resize( source[src_box] -> resize_to ) )

so the decoder can be told the smallest resolution that still covers the output (JPEG
DCT-domain reduction), the pixels are resampled once, and the flip and the HWC→CHW
transpose ride along in the single strided copy into the caller's tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fastfeed.errors import ConfigError
from fastfeed.image._decode import hwc_array, pixel_view, write_hwc

__all__ = [
    "DRAFT_GAP",
    "Plan",
    "draft_factor",
    "execute_into",
    "execute_pil",
    "execute_region_into",
    "region_box",
    "resampling",
]

# Decode a JPEG reduced by f only while the reduced source box keeps DRAFT_GAP x the
# resized resolution: the antialiasing resize then still does a true downscale, and
# the scaled-IDCT result stays within ~1-2 grey levels of a full decode + resize.
DRAFT_GAP = 1.0

_PIL_RESAMPLING: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# torch's antialiased uint8 kernels (AVX2) are ~3x faster than Pillow's resampler and
# within 1 grey level of it (a=-0.5 cubic, like Pillow); other filters use Pillow.
_TORCH_MODES = frozenset({"bilinear", "bicubic"})
# What F.interpolate(..., antialias=True, align_corners=False, size=...) calls for 4-D
# input, minus its ~10 us of Python argument checks; F.interpolate when torch lacks them.
_AA_KERNELS = {
    name: kernel
    for name, kernel in (
        ("bilinear", getattr(torch._C._nn, "_upsample_bilinear2d_aa", None)),
        ("bicubic", getattr(torch._C._nn, "_upsample_bicubic2d_aa", None)),
    )
    if kernel is not None
}


def resampling(value: object) -> str:
    """Normalize an interpolation: a name, a ``PIL.Image.Resampling`` or torchvision's
    ``InterpolationMode`` (its ``.value`` is the name).

    Raises:
        ConfigError: Unknown interpolation.
    """
    if isinstance(value, str):
        name = value.lower()
    elif isinstance(value, int):
        try:
            name = Image.Resampling(value).name.lower()
        except ValueError:
            name = repr(value)
    elif isinstance(getattr(value, "value", None), str):
        name = value.value.lower()  # type: ignore[attr-defined]
    else:
        name = repr(value)
    if name not in _PIL_RESAMPLING:
        raise ConfigError(
            f"interpolation must be one of {sorted(_PIL_RESAMPLING)} (or a PIL Resampling / "
            f"torchvision InterpolationMode), got {value!r}"
        )
    return name


Box = tuple[int, int, int, int]


@dataclass
class Plan:
    """Fused geometry: integer boxes ``(x0, y0, x1, y1)`` and sizes ``(width, height)``.

    Attributes:
        src_box: Region of the (oriented, full resolution) source image.
        resize_to: Size that region is resampled to.
        crop: Region of the resampled image that is kept.
        flip: Mirror the kept region left-right.
        interpolation: Filter name of the resampling.
    """

    src_box: Box
    resize_to: tuple[int, int]
    crop: Box
    flip: bool = False
    interpolation: str = "bilinear"

    @classmethod
    def start(cls, size: tuple[int, int]) -> Plan:
        """The identity plan of an image of ``size`` (width, height)."""
        width, height = size
        return cls((0, 0, width, height), (width, height), (0, 0, width, height))

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the image the next transform sees."""
        x0, y0, x1, y1 = self.crop
        return x1 - x0, y1 - y0

    @property
    def scaled(self) -> bool:
        """Whether the plan resamples (resize_to differs from the source box size)."""
        x0, y0, x1, y1 = self.src_box
        return self.resize_to != (x1 - x0, y1 - y0)

    def crop_view(self, left: int, top: int, width: int, height: int) -> None:
        """Keep the region (left, top, width, height) of the current view."""
        view_w, view_h = self.size
        if not (left >= 0 and top >= 0 and left + width <= view_w and top + height <= view_h):
            raise ValueError(f"crop {(left, top, width, height)} outside view {view_w}x{view_h}")
        if self.flip:  # the view is mirrored: the same pixels sit mirrored in the unflipped one
            left = view_w - left - width
        x0, y0 = self.crop[0], self.crop[1]
        self.crop = (x0 + left, y0 + top, x0 + left + width, y0 + top + height)

    def resize_view(self, width: int, height: int, interpolation: str) -> None:
        """Resample the current view to (width, height); only valid while not :attr:`scaled`."""
        if self.scaled:
            raise ValueError("a plan resamples once; materialize it before another resize")
        # Unscaled, the crop is in source coordinates: fold it into the source box.
        sx0, sy0 = self.src_box[0], self.src_box[1]
        cx0, cy0, cx1, cy1 = self.crop
        self.src_box = (sx0 + cx0, sy0 + cy0, sx0 + cx1, sy0 + cy1)
        self.resize_to = (width, height)
        self.crop = (0, 0, width, height)
        self.interpolation = interpolation


def draft_factor(plan: Plan) -> int:
    """Largest JPEG reduction (1, 2, 4, 8) that keeps the source box >= DRAFT_GAP x resize_to."""
    if not plan.scaled:
        return 1
    x0, y0, x1, y1 = plan.src_box
    room = min((x1 - x0) / plan.resize_to[0], (y1 - y0) / plan.resize_to[1]) / DRAFT_GAP
    for factor in (8, 4, 2):
        if room >= factor:
            return factor
    return 1


def _crop_source_box(plan: Plan, factor: float) -> tuple[float, float, float, float]:
    """The float box of an image decoded at 1/factor that resamples exactly to ``plan.crop``."""
    x0, y0, x1, y1 = (v / factor for v in plan.src_box)
    sx = (x1 - x0) / plan.resize_to[0]
    sy = (y1 - y0) / plan.resize_to[1]
    cx0, cy0, cx1, cy1 = plan.crop
    return x0 + cx0 * sx, y0 + cy0 * sy, x0 + cx1 * sx, y0 + cy1 * sy


def _channels_last(hwc: np.ndarray) -> torch.Tensor:
    """A (1, C, H, W) uint8 tensor over (H, W, C) pixels: zero-copy, channels-last strides.

    ``reshape``, not ``hwc[None]``: numpy gives a new axis stride 0, which torch's
    ``suggest_memory_format`` does not take for channels-last, so its uint8 kernel then
    repacks the input to planar and writes planar output (275x275 -> 224x224 RGB: 113 us,
    against 71 us channels-last plus 38 us for the transposing copy into a CHW row).
    Adding a size-1 axis never makes numpy copy, whatever the strides.
    """
    return torch.from_numpy(hwc.reshape(1, *hwc.shape).transpose(0, 3, 1, 2))


def _torch_resize(img: Image.Image, plan: Plan, pixels: np.ndarray | None) -> torch.Tensor:
    """``plan.src_box`` of ``img`` resampled to ``plan.resize_to`` by torch's uint8 kernel.

    Returns:
        A (1, C, H, W) channels-last uint8 tensor; for RGB, C is 4 (channel 3 is padding).
    """
    x0, y0, x1, y1 = plan.src_box
    if pixels is None:
        pixels = pixel_view(img)
    if pixels is not None:
        # Pillow's memory, zero-copy. All 4 bytes of its RGBX pixels go in: a 4-channel
        # channels-last input is what torch's AVX2 uint8 kernel works on natively, where 3
        # channels are repacked to 4 and back (measured ~25% slower in total).
        region = pixels[y0:y1, x0:x1]
    else:
        # Only the box is converted to numpy (Pillow crops without the GIL); np.array makes
        # the writable copy torch.from_numpy wants.
        region = np.array(hwc_array(img.crop(plan.src_box)))
    # Shaped in numpy: a numpy view costs a fraction of a torch op's Python overhead,
    # which is paid with the GIL held.
    nchw = _channels_last(region)
    size = [plan.resize_to[1], plan.resize_to[0]]
    kernel = _AA_KERNELS.get(plan.interpolation)
    if kernel is not None:
        return kernel(nchw, size, False, None)
    return F.interpolate(
        nchw, size=size, mode=plan.interpolation, align_corners=False, antialias=True
    )


def execute_into(
    img: Image.Image,
    factor: float,
    plan: Plan,
    out: torch.Tensor,
    layout: str,
    pixels: np.ndarray | None = None,
) -> torch.Tensor:
    """Run ``plan`` on ``img`` (decoded at 1/factor) and write the result into ``out``.

    Args:
        img: Decoded image in the output mode (RGB or L).
        factor: Reduction the decoder applied (plan coordinates / factor = image ones).
        plan: The fused geometry.
        out: uint8 tensor of the plan's output shape in ``layout``.
        layout: ``"CHW"`` or ``"HWC"``.
        pixels: ``img``'s pixel memory as :func:`~fastfeed.image._decode.pixel_view`
            gives it, when the caller already has it (a scratch decode).

    Returns:
        ``out``.
    """
    if not plan.scaled:  # never drafted: draft_factor() is 1 without a resize
        x0, y0 = plan.src_box[0], plan.src_box[1]
        cx0, cy0, cx1, cy1 = plan.crop
        if pixels is not None:
            pixels = pixels[:, :, :3] if img.mode == "RGB" else pixels
        else:
            pixels = hwc_array(img)
        hwc = pixels[y0 + cy0 : y0 + cy1, x0 + cx0 : x0 + cx1]
    elif plan.interpolation in _TORCH_MODES and factor == 1.0:
        resized = _torch_resize(img, plan, pixels)
        cx0, cy0, cx1, cy1 = plan.crop
        channels = 1 if img.mode == "L" else 3
        hwc = resized.numpy()[0].transpose(1, 2, 0)[cy0:cy1, cx0:cx1, :channels]
    else:
        # Pillow resamples only the crop, from a float source box: exactly the pixels
        # of resize-then-crop, without computing the discarded ones. A drafted image
        # needs it too: its box is fractional, and rounding it to whole reduced pixels
        # shifts the output by up to 0.5 of them (a MAD of ~4 grey levels on texture).
        resized_img = img.resize(
            plan.size, _PIL_RESAMPLING[plan.interpolation], box=_crop_source_box(plan, factor)
        )
        hwc = hwc_array(resized_img)
    if plan.flip:
        hwc = hwc[:, ::-1]
    return write_hwc(hwc, out, layout)


# Reach of each filter's kernel in source pixels at scale 1 (Pillow's supports);
# downscaling by s widens it s times.
# torch's antialiased kernels: the same reach, widened by the downscale factor.
_TORCH_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}
_FILTER_SUPPORT = {
    "nearest": 0.5,
    "box": 0.5,
    "bilinear": 1.0,
    "hamming": 1.0,
    "bicubic": 2.0,
    "lanczos": 3.0,
}


def _torch_region(plan: Plan) -> Box | None:
    """The part of the source box that torch's kernel needs for the kept crop, or None.

    Only for a downscale in both directions whose crop leaves rows or columns out (the
    eval transform: Resize then CenterCrop): the box's top-left part, down to the last
    kept output row's kernel reach. Resampled with the full box's scale (passed to the
    kernel explicitly), its output rows and columns equal the full resize's; measured
    identical on 800 random sizes. Upscales are left alone: torch's uint8 kernel orders
    its passes by the sizes, which differ for the part.
    """
    x0, y0, x1, y1 = plan.src_box
    width, height = plan.resize_to
    cx1, cy1 = plan.crop[2], plan.crop[3]
    scale_x, scale_y = (x1 - x0) / width, (y1 - y0) / height
    if (
        scale_x <= 1.0
        or scale_y <= 1.0
        or (cx1 == width and cy1 == height)
        or plan.interpolation not in _AA_KERNELS  # F.interpolate takes no scale with a size
    ):
        return None
    reach = _TORCH_SUPPORT[plan.interpolation]
    part_w = min(x1 - x0, math.ceil(scale_x * cx1 + reach * scale_x) + 1)
    part_h = min(y1 - y0, math.ceil(scale_y * cy1 + reach * scale_y) + 1)
    if (part_w, part_h) == (x1 - x0, y1 - y0):
        return None
    return x0, y0, x0 + part_w, y0 + part_h


def region_box(plan: Plan, size: tuple[int, int]) -> Box:
    """The source pixels a partial decode must deliver for ``plan`` on an image of ``size``.

    Unscaled: the kept crop. Scaled with torch's kernel: the source box (torch resamples
    the whole box, then crops). Scaled with Pillow: full rows from the top down to the
    source pixels under the kept crop plus the filter's reach. Full width and the top
    row keep Pillow's result identical to the full decode's: a box shifted by the
    region's origin rounds differently (NEAREST then picks the neighbouring pixel in ~1%
    of columns), and a narrower image changes Pillow's upscaling results (measured: up
    to 37 grey levels with LANCZOS, 105 -> 160 px), though no kernel reaches the cut.
    """
    x0, y0, _, y1 = plan.src_box
    cx0, cy0, cx1, cy1 = plan.crop
    if not plan.scaled:
        return x0 + cx0, y0 + cy0, x0 + cx1, y0 + cy1
    if plan.interpolation in _TORCH_MODES:
        return _torch_region(plan) or plan.src_box
    fy1 = _crop_source_box(plan, 1.0)[3]
    scale_y = max((y1 - y0) / plan.resize_to[1], 1.0)
    reach = _FILTER_SUPPORT[plan.interpolation]
    width, height = size
    return 0, 0, width, min(height, math.ceil(fy1) + math.ceil(reach * scale_y) + 1)


def execute_region_into(
    region: np.ndarray,
    origin: tuple[int, int],
    plan: Plan,
    out: torch.Tensor,
    layout: str,
) -> torch.Tensor:
    """Run ``plan`` on ``region``, the pixels of :func:`region_box`, and write into ``out``.

    The pixels equal :func:`execute_into` on a full decode (factor 1): the same kernel
    runs on the same source pixels.

    Args:
        region: uint8 (h, w, 3 or 1) pixels of ``region_box(plan, size)``; writable
            memory (torch wraps it) that nothing else writes meanwhile.
        origin: (x, y) of the region's top-left pixel in the image.
        plan: The fused geometry, in full-image coordinates.
        out: uint8 tensor of the plan's output shape in ``layout``.
        layout: ``"CHW"`` or ``"HWC"``.

    Returns:
        ``out``.
    """
    if not plan.scaled:
        hwc = region
    elif plan.interpolation in _TORCH_MODES:
        nchw = _channels_last(region)
        size = [plan.resize_to[1], plan.resize_to[0]]
        kernel = _AA_KERNELS.get(plan.interpolation)
        x0, y0, x1, y1 = plan.src_box
        if kernel is not None and region.shape[:2] != (y1 - y0, x1 - x0):
            # A _torch_region part: the output's top-left up to the crop, at the full
            # box's scale.
            scales = (plan.resize_to[1] / (y1 - y0), plan.resize_to[0] / (x1 - x0))
            resized = kernel(nchw, [plan.crop[3], plan.crop[2]], False, *scales)
        elif kernel is not None:
            resized = kernel(nchw, size, False, None)
        else:
            resized = F.interpolate(
                nchw, size=size, mode=plan.interpolation, align_corners=False, antialias=True
            )
        # The channels-last result as an (H, W, C) numpy view: the crop and the flip are
        # views, and numpy's one strided copy into the row (GIL released) flips and
        # transposes together: 37 us for 224x224x3, where torch's flip + copy_ take 50.
        hwc = resized.numpy()[0].transpose(1, 2, 0)
        cx0, cy0, cx1, cy1 = plan.crop
        if cx0 or cy0 or hwc.shape[:2] != (cy1, cx1):
            hwc = hwc[cy0:cy1, cx0:cx1]
    else:
        img = Image.fromarray(region[:, :, 0] if region.shape[2] == 1 else region)
        fx0, fy0, fx1, fy1 = _crop_source_box(plan, 1.0)
        ox, oy = origin
        box = (fx0 - ox, fy0 - oy, fx1 - ox, fy1 - oy) if origin != (0, 0) else (fx0, fy0, fx1, fy1)
        hwc = hwc_array(img.resize(plan.size, _PIL_RESAMPLING[plan.interpolation], box=box))
    if plan.flip:
        hwc = hwc[:, ::-1]
    return write_hwc(hwc, out, layout)


def execute_pil(img: Image.Image, factor: float, plan: Plan) -> Image.Image:
    """Run ``plan`` on ``img`` (decoded at 1/factor) with Pillow and return the image."""
    if plan.scaled:
        result = img.resize(
            plan.size, _PIL_RESAMPLING[plan.interpolation], box=_crop_source_box(plan, factor)
        )
    else:
        x0, y0 = plan.src_box[0], plan.src_box[1]
        cx0, cy0, cx1, cy1 = plan.crop
        result = img.crop((x0 + cx0, y0 + cy0, x0 + cx1, y0 + cy1))
    if plan.flip:
        result = result.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return result


def pil_resample(name: str) -> Image.Resampling:
    """The Pillow filter of an interpolation name (see :func:`resampling`)."""
    return _PIL_RESAMPLING[name]
