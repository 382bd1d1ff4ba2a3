"""Fast image path: decode + crop + resize + flip fused, written straight into a batch row.

``Compose([RandomResizedCrop(224), RandomHorizontalFlip()])`` applied to JPEG bytes reads
the header, draws the crop, and decodes only the crop window (partial decode: rows below
it are never read, rows above only entropy-decoded, columns cut to iMCU boundaries; the
GIL released throughout) when nvImageCodec is installed (``pip install fastfeed[jpeg]``,
see :mod:`fastfeed.image._jpeg`), or else asks libjpeg-turbo through Pillow for the
smallest DCT-scaled decode (1/2, 1/4, 1/8) that still covers the crop at the output
resolution (also used for crops 2x the output or larger, where decoding fewer pixels in
total is cheaper). It resamples only the crop box once (torch's antialiased uint8 kernel
for bilinear/bicubic, Pillow otherwise) and copies it, flipped and transposed to CHW,
into the loader's (pinned) batch row. The partial decode's pixels equal the full
decode's; ``FASTFEED_PARTIAL_JPEG=0`` turns it off. Fixed-shape pipelines implement
:class:`SlotWriter` (``sample_spec()`` plus ``__call__(data, out=None)``).

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
