"""The geometric transforms: crops, resizes and flips that fold into one fused :class:`Plan`.

:class:`RandomResizedCrop`, :class:`Resize`, :class:`CenterCrop` and
:class:`RandomHorizontalFlip` keep torchvision's names and semantics. Each draws its
parameters from :func:`fastfeed.rng.sample_rng`, applies itself to a PIL image, or folds
into a :class:`~fastfeed.image._plan.Plan` that :class:`~fastfeed.image._transforms.Compose`
runs as one decode + one resample + one copy. On encoded bytes a transform alone runs as
``Compose([self])``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from fastfeed.errors import ConfigError
from fastfeed.image._plan import Plan, pil_resample
from fastfeed.image._plan import resampling as _resampling
from fastfeed.rng import sample_rng

if TYPE_CHECKING:
    from fastfeed.image._transforms import Compose

__all__ = [
    "CenterCrop",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "Resize",
]


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
        from fastfeed.image._transforms import Compose  # the chain runner imports this module

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
