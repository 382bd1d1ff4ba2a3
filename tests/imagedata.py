"""Synthetic ImageFolder datasets for tests: small JPEGs, deterministic from a seed."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["encode_jpeg", "make_image_folder", "random_image"]


def random_image(
    rng: np.random.Generator, width: int, height: int, mode: str = "RGB"
) -> Image.Image:
    """A gradient plus noise image: compresses like a photo, not like flat colour."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=3).astype(np.float32)
    slope = rng.uniform(-1.0, 1.0, size=(2, 3)).astype(np.float32)
    img = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    img += rng.normal(0.0, 24.0, size=(height, width, 3)).astype(np.float32)
    arr = np.clip(img, 0, 255).astype(np.uint8)
    out = Image.fromarray(arr, "RGB")
    return out.convert(mode) if mode != "RGB" else out


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes of ``img``."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_image_folder(
    root: str | os.PathLike[str],
    n_classes: int,
    per_class: int,
    size_range: tuple[tuple[int, int], tuple[int, int]] = ((320, 640), (240, 500)),
    seed: int = 0,
    quality: int = 90,
) -> Path:
    """Write an ImageFolder of JPEGs: ``root/class_<c>/img_<cccc>.jpg``.

    Args:
        root: Folder to create (may exist).
        n_classes: Number of class folders (``class_000``, ``class_001``, ...).
        per_class: Images per class.
        size_range: ``((min_w, max_w), (min_h, max_h))`` in pixels, inclusive; pass
            equal bounds for fixed sizes.
        seed: Everything (sizes, pixels) is a function of the seed.
        quality: JPEG quality.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    (wmin, wmax), (hmin, hmax) = size_range
    for c in range(n_classes):
        cdir = root / f"class_{c:03d}"
        cdir.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            w = int(rng.integers(wmin, wmax + 1))
            h = int(rng.integers(hmin, hmax + 1))
            (cdir / f"img_{c * per_class + k:04d}.jpg").write_bytes(
                encode_jpeg(random_image(rng, w, h), quality)
            )
    return root
