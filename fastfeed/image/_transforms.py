"""Transforms with torchvision's names and semantics, fused when they start from bytes.

This module holds the chain (:class:`Compose`, :class:`ImagePipeline`), the
:class:`SlotWriter` protocol and :class:`ToFloat`; the geometric transforms that a chain
fuses live in :mod:`fastfeed.image._geometric` and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

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
from fastfeed.image._geometric import (
    CenterCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    _Geometric,
)
from fastfeed.image._jpeg import PartialJpeg, open_partial
from fastfeed.image._plan import Plan, draft_factor, execute_into, execute_pil

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

    def check_channels(self, channels: int) -> None:
        """Raise :class:`ConfigError` unless mean and std fit ``channels`` (1 value or one each)."""
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and len(values) not in (1, channels):
                raise ConfigError(f"{name} has {len(values)} values for {channels} channels")

    def write(self, u8: torch.Tensor, out: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """Write the normalized float32 version of ``u8`` into ``out`` and return it."""
        self.check_channels(u8.shape[channel_dim])
        mean = torch.tensor(self.mean or (0.0,), dtype=torch.float64)
        std = torch.tensor(self.std or (1.0,), dtype=torch.float64)
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
        if self._to_float is not None:  # caught here, not as a failure of every sample
            self._to_float.check_channels(3 if mode == "RGB" else 1)

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
