"""Transforms with torchvision's names and semantics, fused when they start from bytes."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from fastfeed.errors import ConfigError
from fastfeed.image._decode import (
    EncodedImage,
    check_mode_layout,
    check_out,
    convert_mode,
    to_tensor_uint8,
)
from fastfeed.image._jpeg import PartialJpeg, open_partial
from fastfeed.image._plan import Plan, draft_factor, execute_into, execute_pil, pil_resample
from fastfeed.image._plan import resampling as _resampling
from fastfeed.rng import sample_rng

# Not yet decoded, and either kind of image a fused plan starts from.
_ENCODED = (EncodedImage, PartialJpeg)
_IMAGES = (EncodedImage, PartialJpeg, Image.Image)

__all__ = [
    "CenterCrop",
    "Compose",
    "ImagePipeline",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "Resize",
    "SlotWriter",
    "ToFloat",
]


@runtime_checkable
class SlotWriter(Protocol):
    """A transform with a fixed output shape that can write into a preallocated row.

    The loader checks ``isinstance(transform, SlotWriter)``, allocates (pinned) batches of
    ``(batch_size, *shape)`` once, and passes each sample's row as ``out``.
    """

    def sample_spec(self) -> tuple[tuple[int, ...], torch.dtype]:
        """The (shape, dtype) of every output, e.g. ``((3, 224, 224), torch.uint8)``."""
        ...

    def __call__(self, data: Any, out: torch.Tensor | None = None) -> torch.Tensor:
        """Transform ``data``; write into ``out`` and return it, or return a new tensor."""
        ...


def _size_pair(size: int | Sequence[int], what: str = "size") -> tuple[int, int]:
    """torchvision's size argument as (height, width): an int or a 1- or 2-sequence."""
    if isinstance(size, int):
        pair = (size, size)
    elif isinstance(size, Sequence) and len(size) in (1, 2):
        pair = (int(size[0]), int(size[-1]))
    else:
        raise ConfigError(f"{what} must be an int or a sequence of 1 or 2 ints, got {size!r}")
    if min(pair) <= 0:
        raise ConfigError(f"{what} must be positive, got {size!r}")
    return pair


class _Geometric:
    """A crop, resize or flip that can join a fused :class:`Plan`.

    On a PIL image it returns a PIL image (torchvision's PIL semantics); on encoded bytes
    it runs as ``Compose([self])`` and returns a uint8 CHW tensor.
    """

    _pipeline_cache: Compose | None = None

    def fuse(self, plan: Plan) -> bool:
        """Draw this sample's parameters and fold the transform into ``plan``.

        Returns False, having drawn nothing, when the plan cannot absorb it.
        """
        raise NotImplementedError

    def apply_pil(self, img: Image.Image) -> Image.Image:
        """Apply to a PIL image, drawing parameters from :func:`fastfeed.rng.sample_rng`."""
        raise NotImplementedError

    def output_hw(self, hw: tuple[int, int] | None) -> tuple[int, int] | None:
        """Output (height, width) given the input's, when known without seeing the image."""
        raise NotImplementedError

    def _pipeline(self) -> Compose:
        if self._pipeline_cache is None:
            self._pipeline_cache = Compose([self])
        return self._pipeline_cache

    def __call__(self, data: Any) -> Any:
        if isinstance(data, Image.Image):
            return self.apply_pil(data)
        return self._pipeline()(data)


class _FixedShape(_Geometric):
    """A geometric transform whose output size is fixed: a :class:`SlotWriter` on bytes."""

    def sample_spec(self) -> tuple[tuple[int, ...], torch.dtype]:
        """((3, H, W), torch.uint8): the spec of ``Compose([self])`` on bytes."""
        return self._pipeline().sample_spec()  # type: ignore[attr-defined]

    def __call__(self, data: Any, out: torch.Tensor | None = None) -> Any:
        if isinstance(data, Image.Image):
            if out is not None:
                raise ConfigError("out= is for encoded bytes; a PIL image input returns PIL")
            return self.apply_pil(data)
        return self._pipeline()(data, out)  # type: ignore[call-arg]


# RandomResizedCrop draws: 10 attempts x (area, log-ratio), then (top, left).
_RRC_DRAWS = 22


class RandomResizedCrop(_FixedShape):
    """Crop a random area and aspect ratio, resized to ``size`` (torchvision semantics).

    Args:
        size: Output (height, width), or an int for a square.
        scale: Range of the crop's area as a fraction of the image area.
        ratio: Range of the crop's aspect ratio (width / height), sampled log-uniformly.
        interpolation: ``"bilinear"`` (default), ``"bicubic"``, ``"nearest"``, ``"lanczos"``,
            ``"box"``, ``"hamming"``, a ``PIL.Image.Resampling`` or torchvision's
            ``InterpolationMode``.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        interpolation: object = "bilinear",
    ) -> None:
        self.size = _size_pair(size)
        if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
            raise ConfigError(f"scale and ratio must be (min, max) > 0, got {scale}, {ratio}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.interpolation = _resampling(interpolation)

    @staticmethod
    def get_params(
        image_size: tuple[int, int] | Image.Image,
        scale: tuple[float, float],
        ratio: tuple[float, float],
        rng: np.random.Generator | None = None,
    ) -> tuple[int, int, int, int]:
        """torchvision's ``RandomResizedCrop.get_params``, drawing from a numpy generator.

        Ten attempts of area x uniform(scale) and a log-uniform ratio; the first crop that
        fits wins; otherwise the center crop clamped to ``ratio`` (whole image if inside).
        All 22 uniforms (10 x (area, ratio), then top and left) come from one
        ``rng.random(22)`` call, whatever the number of attempts used.

        Args:
            image_size: (width, height), like ``PIL.Image.size``, or the image itself.
            scale: (min, max) area fraction.
            ratio: (min, max) aspect ratio width / height.
            rng: Generator to draw from; default :func:`fastfeed.rng.sample_rng`.

        Returns:
            (top, left, height, width) of the crop, in pixels.
        """
        width, height = image_size.size if isinstance(image_size, Image.Image) else image_size
        gen = sample_rng() if rng is None else rng
        area = height * width
        scale_lo, scale_span = scale[0], scale[1] - scale[0]
        log_lo = math.log(ratio[0])
        log_span = math.log(ratio[1]) - log_lo
        # One numpy call for all draws (each costs ~1 us with the GIL held): the area and
        # log-ratio of the 10 i.i.d. attempts, then the two position draws, taken as
        # floor(u * n) (uniform on 0..n-1 up to 2**-53). Same distribution as drawing in turn.
        u = gen.random(_RRC_DRAWS).tolist()
        for k in range(0, 20, 2):
            target_area = area * (scale_lo + scale_span * u[k])
            aspect_ratio = math.exp(log_lo + log_span * u[k + 1])
            w = round(math.sqrt(target_area * aspect_ratio))
            h = round(math.sqrt(target_area / aspect_ratio))
            if 0 < w <= width and 0 < h <= height:
                top = min(int(u[20] * (height - h + 1)), height - h)
                left = min(int(u[21] * (width - w + 1)), width - w)
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < min(ratio):
            w = width
            h = round(w / min(ratio))
        elif in_ratio > max(ratio):
            h = height
            w = round(h * max(ratio))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def fuse(self, plan: Plan) -> bool:
        if plan.scaled:
            return False
        top, left, h, w = self.get_params(plan.size, self.scale, self.ratio)
        plan.crop_view(left, top, w, h)
        plan.resize_view(self.size[1], self.size[0], self.interpolation)
        return True

    def apply_pil(self, img: Image.Image) -> Image.Image:
        top, left, h, w = self.get_params(img.size, self.scale, self.ratio)
        img = img.crop((left, top, left + w, top + h))
        target = (self.size[1], self.size[0])
        return img if img.size == target else img.resize(target, pil_resample(self.interpolation))

    def output_hw(self, hw: tuple[int, int] | None) -> tuple[int, int]:
        return self.size

    def __repr__(self) -> str:
        return (
            f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"interpolation={self.interpolation!r})"
        )


class Resize(_Geometric):
    """Resize (torchvision semantics): an int matches the shorter side, keeping the aspect.

    Args:
        size: An int (shorter side; longer side = int(size * long / short)), or (height, width).
        interpolation: As for :class:`RandomResizedCrop`.
        max_size: With an int ``size``, cap the longer side at this many pixels.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        interpolation: object = "bilinear",
        max_size: int | None = None,
    ) -> None:
        pair = _size_pair(size)
        self.shorter = pair[0] if isinstance(size, int) or len(size) == 1 else None
        self.size = pair
        if max_size is not None and (self.shorter is None or max_size <= self.shorter):
            raise ConfigError(
                f"max_size needs an int size smaller than it, got size={size!r}, "
                f"max_size={max_size}"
            )
        self.max_size = max_size
        self.interpolation = _resampling(interpolation)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the output for an input of (width, height) pixels."""
        if self.shorter is None:
            return self.size[1], self.size[0]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shorter, int(self.shorter * long / short)
        if self.max_size is not None and new_long > self.max_size:
            new_short, new_long = int(self.max_size * new_short / new_long), self.max_size
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def fuse(self, plan: Plan) -> bool:
        if plan.scaled:
            return False
        plan.resize_view(*self.output_size(*plan.size), self.interpolation)
        return True

    def apply_pil(self, img: Image.Image) -> Image.Image:
        target = self.output_size(*img.size)
        return img if img.size == target else img.resize(target, pil_resample(self.interpolation))

    def output_hw(self, hw: tuple[int, int] | None) -> tuple[int, int] | None:
        if self.shorter is None:
            return self.size
        if hw is None:
            return None
        width, height = self.output_size(hw[1], hw[0])
        return height, width

    def __repr__(self) -> str:
        size = self.shorter if self.shorter is not None else self.size
        return f"Resize(size={size}, interpolation={self.interpolation!r})"


class CenterCrop(_FixedShape):
    """Crop the center (torchvision semantics, zero padding when the image is smaller).

    Args:
        size: Output (height, width), or an int for a square.
    """

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _size_pair(size)

    def _offsets(self, width: int, height: int) -> tuple[int, int]:
        crop_h, crop_w = self.size
        return round((height - crop_h) / 2.0), round((width - crop_w) / 2.0)

    def fuse(self, plan: Plan) -> bool:
        width, height = plan.size
        crop_h, crop_w = self.size
        if crop_w > width or crop_h > height:
            return False  # needs padding: done on the PIL path
        top, left = self._offsets(width, height)
        plan.crop_view(left, top, crop_w, crop_h)
        return True

    def apply_pil(self, img: Image.Image) -> Image.Image:
        width, height = img.size
        crop_h, crop_w = self.size
        if crop_w > width or crop_h > height:
            # torchvision pads floor(d/2) before and ceil(d/2) after, with zeros.
            pad_left = (crop_w - width) // 2 if crop_w > width else 0
            pad_top = (crop_h - height) // 2 if crop_h > height else 0
            padded = Image.new(img.mode, (max(width, crop_w), max(height, crop_h)), 0)
            padded.paste(img, (pad_left, pad_top))
            img, (width, height) = padded, padded.size
        top, left = self._offsets(width, height)
        return img.crop((left, top, left + crop_w, top + crop_h))

    def output_hw(self, hw: tuple[int, int] | None) -> tuple[int, int]:
        return self.size

    def __repr__(self) -> str:
        return f"CenterCrop(size={self.size})"


class RandomHorizontalFlip(_Geometric):
    """Mirror left-right with probability ``p`` (torchvision semantics).

    Args:
        p: Probability of flipping.
    """

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"p must be in [0, 1], got {p}")
        self.p = float(p)

    def fuse(self, plan: Plan) -> bool:
        if sample_rng().random() < self.p:
            plan.flip = not plan.flip
        return True

    def apply_pil(self, img: Image.Image) -> Image.Image:
        if sample_rng().random() < self.p:
            return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img

    def output_hw(self, hw: tuple[int, int] | None) -> tuple[int, int] | None:
        return hw

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class ToFloat:
    """uint8 → float32 in [0, 1], then ``(x - mean) / std`` per channel: explicit CPU normalize.

    Normalizing on the GPU is usually cheaper (4x fewer bytes to copy); use this when the
    model wants float input from the loader. As the last transform of a :class:`Compose`
    it writes straight into the float ``out`` row in the Compose's layout.

    Args:
        mean: Per-channel mean in [0, 1] units (e.g. ImageNet's (0.485, 0.456, 0.406)), or None.
        std: Per-channel standard deviation in [0, 1] units, or None.
    """

    def __init__(
        self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
    ) -> None:
        self.mean = None if mean is None else tuple(float(m) for m in mean)
        self.std = None if std is None else tuple(float(s) for s in std)
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ConfigError(f"std must be positive, got {std}")

    def write(self, u8: torch.Tensor, out: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """Write the normalized float32 version of ``u8`` into ``out`` and return it."""
        channels = u8.shape[channel_dim]
        mean = torch.tensor(self.mean or (0.0,), dtype=torch.float64)
        std = torch.tensor(self.std or (1.0,), dtype=torch.float64)
        for name, values in (("mean", mean), ("std", std)):
            if values.numel() not in (1, channels):
                raise ConfigError(f"{name} has {values.numel()} values for {channels} channels")
        # x / 255 / std - mean / std as one multiply-subtract in float32.
        shape = [1] * u8.dim()
        shape[channel_dim] = -1
        scale = (1.0 / (255.0 * std)).to(torch.float32).reshape(shape)
        shift = (mean / std).to(torch.float32).reshape(shape)
        out.copy_(u8)
        return out.mul_(scale).sub_(shift)

    def __call__(self, data: Image.Image | torch.Tensor) -> torch.Tensor:
        """A PIL image or a uint8 (C, H, W) tensor as a normalized float32 (C, H, W) tensor."""
        u8 = to_tensor_uint8(data) if isinstance(data, Image.Image) else data
        if not isinstance(u8, torch.Tensor) or u8.dtype != torch.uint8 or u8.dim() != 3:
            raise ConfigError("ToFloat takes a PIL image or a uint8 (C, H, W) tensor")
        return self.write(u8, torch.empty(u8.shape, dtype=torch.float32), 0)

    def __repr__(self) -> str:
        return f"ToFloat(mean={self.mean}, std={self.std})"


def _fixed_hw(transforms: Sequence[object]) -> tuple[int, int] | None:
    """The (height, width) every output has, or None when it depends on the image."""
    ops = list(transforms)
    if ops and isinstance(ops[-1], ToFloat):
        ops = ops[:-1]
    hw: tuple[int, int] | None = None
    for op in ops:
        if not isinstance(op, _Geometric):
            return None
        hw = op.output_hw(hw)
    return hw


class Compose:
    """Chain transforms from encoded bytes (or a PIL image) to a tensor, fusing what it can.

    Runs of :class:`RandomResizedCrop`, :class:`Resize`, :class:`CenterCrop` and
    :class:`RandomHorizontalFlip` become one decode (JPEG reduced in the DCT domain when
    the crop allows) + one resample + one strided copy into the output. Any other callable
    gets a PIL image (the fused prefix materialized) and may return anything; a PIL
    result is converted to a uint8 tensor. A trailing :class:`ToFloat` yields float32.

    When the output shape is fixed (the chain ends in a fixed size and contains only the
    transforms above), ``Compose(...)`` returns an :class:`ImagePipeline`, which also
    implements :class:`SlotWriter`, so the loader writes into pinned batch rows.

    Random parameters come from :func:`fastfeed.rng.sample_rng`: in a loader the output
    depends only on (seed, epoch, index).

    Args:
        transforms: The transforms, in order.
        mode: ``"RGB"`` (3 channels, default) or ``"L"`` (1 channel).
        layout: ``"CHW"`` (default, torchvision's) or ``"HWC"``.
        exif_transpose: Apply the EXIF orientation tag. Off by default, like torchvision
            (whose loaders ignore it); turn on for photos straight from cameras/phones.
        max_pixels: Decompression-bomb limit (width x height, from the header, before any
            decoding); ``None`` follows ``PIL.Image.MAX_IMAGE_PIXELS``. Pillow's own check
            at open (2 x ``MAX_IMAGE_PIXELS``) still applies above that.
    """

    def __new__(cls, transforms: Sequence[Callable[..., Any]] = (), *args: Any, **kwargs: Any):
        # Pick the fixed-shape subclass up front so isinstance(c, SlotWriter) tells the
        # truth; a non-Sequence (generator) is left unconsumed for __init__.
        if cls is Compose and isinstance(transforms, Sequence) and _fixed_hw(transforms):
            cls = ImagePipeline
        return super().__new__(cls)

    def __init__(
        self,
        transforms: Sequence[Callable[..., Any]],
        *,
        mode: str = "RGB",
        layout: str = "CHW",
        exif_transpose: bool = False,
        max_pixels: int | None = None,
    ) -> None:
        check_mode_layout(mode, layout)
        self.transforms = list(transforms)
        for op in self.transforms:
            if not callable(op):
                raise ConfigError(f"transforms must be callables, got {op!r}")
        self.mode = mode
        self.layout = layout
        self.exif_transpose = exif_transpose
        self.max_pixels = max_pixels
        last = self.transforms[-1] if self.transforms else None
        self._to_float = last if isinstance(last, ToFloat) else None
        self._ops = self.transforms[:-1] if self._to_float else self.transforms

    def __call__(self, data: Any) -> Any:
        return self._run(data, None)

    def _plan_shape(self, plan: Plan) -> tuple[int, int, int]:
        width, height = plan.size
        channels = 3 if self.mode == "RGB" else 1
        if self.layout == "CHW":
            return channels, height, width
        return height, width, channels

    def _run(self, data: Any, out: torch.Tensor | None, checked: bool = False) -> Any:
        """Transform ``data``; ``checked`` says ``out`` already matches :meth:`sample_spec`."""
        if isinstance(data, Image.Image):
            current: Any = convert_mode(data, self.mode)
        else:
            # A JPEG opens for partial decode (header parsed in C++); anything else, and
            # whatever the partial path declines, goes through Pillow.
            current = open_partial(
                data, self.mode, exif_transpose=self.exif_transpose, max_pixels=self.max_pixels
            ) or EncodedImage(
                data, self.mode, exif_transpose=self.exif_transpose, max_pixels=self.max_pixels
            )
        u8_out = None if self._to_float else out
        ops, i = self._ops, 0
        while i < len(ops):
            op = ops[i]
            if isinstance(op, _Geometric) and isinstance(current, _IMAGES):
                plan = Plan.start(current.size)
                j = i
                while j < len(ops) and isinstance(ops[j], _Geometric) and ops[j].fuse(plan):  # type: ignore[attr-defined]
                    j += 1
                if j == i:  # cannot fuse even alone (CenterCrop that pads): PIL path
                    current, i = op(_decoded(current)), i + 1
                    continue
                if j == len(ops):  # the fast path: one resample, one copy into the row
                    if u8_out is None:
                        u8_out = torch.empty(self._plan_shape(plan), dtype=torch.uint8)
                    elif not checked:
                        check_out(u8_out, self._plan_shape(plan), torch.uint8)
                    if isinstance(current, PartialJpeg):
                        # Decode only the plan's source region, the GIL released.
                        written = current.execute(plan, u8_out, self.layout)
                        if written is not None:
                            return self._finish(written, out)
                    pixels = None
                    if isinstance(current, _ENCODED):
                        # The image never leaves this branch: decode into scratch memory.
                        img, factor, pixels = current.decode_scratch(draft_factor(plan))
                    else:
                        img, factor = current, 1.0
                    written = execute_into(img, factor, plan, u8_out, self.layout, pixels)
                    return self._finish(written, out)
                img, factor = _decoded_for(current, plan)
                current, i = execute_pil(img, factor, plan), j
            else:
                current, i = op(_decoded(current)), i + 1
        current = _decoded(current)
        if isinstance(current, Image.Image):
            return self._finish(to_tensor_uint8(current, u8_out, layout=self.layout), out)
        if self._to_float is not None:
            return self._to_float(current)
        if out is not None:
            check_out(out, tuple(current.shape), current.dtype)
            return out.copy_(current)
        return current

    def _finish(self, u8: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        if self._to_float is None:
            return u8
        if out is None:
            out = torch.empty(u8.shape, dtype=torch.float32)
        else:
            check_out(out, tuple(u8.shape), torch.float32)
        return self._to_float.write(u8, out, 0 if self.layout == "CHW" else u8.dim() - 1)

    def __repr__(self) -> str:
        inner = ", ".join(repr(op) for op in self.transforms)
        return f"{type(self).__name__}([{inner}], mode={self.mode!r}, layout={self.layout!r})"


class ImagePipeline(Compose):
    """A :class:`Compose` with a fixed output shape: a :class:`SlotWriter`.

    ``Compose(...)`` returns one automatically when the shape is fixed; constructing it
    directly raises :class:`ConfigError` when it is not.
    """

    def __init__(self, transforms: Sequence[Callable[..., Any]], **kwargs: Any) -> None:
        super().__init__(transforms, **kwargs)
        hw = _fixed_hw(self.transforms)
        if hw is None:
            raise ConfigError(
                "ImagePipeline needs a fixed output size: only RandomResizedCrop, Resize, "
                "CenterCrop, RandomHorizontalFlip (and a final ToFloat), ending in a fixed size"
            )
        self._hw = hw

    def sample_spec(self) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of every output, e.g. ``((3, 224, 224), torch.uint8)``."""
        height, width = self._hw
        channels = 3 if self.mode == "RGB" else 1
        shape = (channels, height, width) if self.layout == "CHW" else (height, width, channels)
        return shape, torch.float32 if self._to_float else torch.uint8

    def __call__(self, data: Any, out: torch.Tensor | None = None) -> torch.Tensor:
        """Transform encoded bytes (or a PIL image); write into ``out`` when given.

        Raises:
            DecodeError: The bytes are not a decodable image.
            ConfigError: ``out`` does not match :meth:`sample_spec`.
        """
        if out is not None:
            check_out(out, *self.sample_spec())
        return self._run(data, out, checked=True)


def _decoded(current: Any) -> Any:
    return current.decode()[0] if isinstance(current, _ENCODED) else current


def _decoded_for(
    current: EncodedImage | PartialJpeg | Image.Image, plan: Plan
) -> tuple[Image.Image, float]:
    if isinstance(current, _ENCODED):
        return current.decode(draft_factor(plan))
    return current, 1.0
