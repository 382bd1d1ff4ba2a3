"""Fast image path: decode + crop + resize + flip fused, written straight into a batch row.

``Compose([RandomResizedCrop(224), RandomHorizontalFlip()])`` applied to JPEG bytes reads
the header, draws the crop, asks libjpeg-turbo for the smallest DCT-scaled decode (1/2,
1/4, 1/8) that still covers the crop at the output resolution, resamples only the crop box
once (torch's antialiased uint8 kernel for bilinear/bicubic, Pillow otherwise) and copies
it, flipped and transposed to CHW in the same strided copy, into the loader's (pinned)
batch row. Fixed-shape pipelines implement :class:`SlotWriter` (``sample_spec()`` plus
``__call__(data, out=None)``).

Semantics follow torchvision: same parameter names, the same RandomResizedCrop sampling
algorithm (drawn from :func:`fastfeed.rng.sample_rng`, so deterministic in (seed, epoch,
index)), shorter-side Resize, CenterCrop with zero padding. Differences, all documented:

- EXIF orientation is ignored by default (as torchvision's loaders do);
  ``exif_transpose=True`` applies it.
- Alpha is dropped without compositing (as ``PIL.Image.convert("RGB")``); 16-bit images
  keep their high byte instead of clipping at 255.
- On the fused path, a JPEG may be decoded at 1/2..1/8 scale when the crop is at least
  that many times larger than the output; pixels differ from a full decode by ~1 grey level
  on average. Bilinear/bicubic resampling uses torch's kernel (the one torchvision uses on
  tensors), within 1 grey level of Pillow's.

Generic path: any callable works on a PIL image from :func:`decode_image`, e.g.
``lambda b: tv_transform(decode_image(b))``; :func:`to_tensor_uint8` converts the result.
Errors: undecodable bytes raise :class:`fastfeed.errors.DecodeError` (truncated, zero bytes,
not an image, decompression bomb), with the original exception chained.
"""

from __future__ import annotations

from fastfeed.image._decode import EncodedImage, convert_mode, decode_image, to_tensor_uint8
from fastfeed.image._transforms import (
    CenterCrop,
    Compose,
    ImagePipeline,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    SlotWriter,
    ToFloat,
)

__all__ = [
    "CenterCrop",
    "Compose",
    "EncodedImage",
    "ImagePipeline",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "Resize",
    "SlotWriter",
    "ToFloat",
    "convert_mode",
    "decode_image",
    "to_tensor_uint8",
]
