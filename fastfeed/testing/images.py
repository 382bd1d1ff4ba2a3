"""Synthetic images and data files: colour-coded JPEGs, photo-like JPEGs, ImageFolders, LMDBs.

:func:`color_jpeg` makes JPEGs whose decoded pixels name their index
(:func:`decode_color_index` reads it back); :func:`random_image` / :func:`encode_jpeg` /
:func:`make_image_folder` write deterministic photo-like ImageFolder datasets;
:func:`write_lmdb` writes LMDBs in fastfeed's format with arbitrary values (zero-byte
and corrupt values included).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

__all__ = [
    "color_jpeg",
    "decode_color_index",
    "encode_jpeg",
    "make_image_folder",
    "random_image",
    "write_lmdb",
]

_COLOR_STEP = 6
_COLOR_BASE = 16


def _index_color(index: int) -> tuple[int, int, int]:
    if not 0 <= index < 36:
        raise ValueError(f"colour-coded images hold indices 0..35, got {index}")
    red = _COLOR_BASE + _COLOR_STEP * index
    return red, 255 - red, 128


def color_jpeg(index: int, size: tuple[int, int] = (64, 48), noise: float = 6.0) -> bytes:
    """A JPEG whose mean red level encodes ``index`` (0..35), with noise so it is photo-like.

    Args:
        index: The index to encode.
        size: (width, height) in pixels.
        noise: Standard deviation of the added noise, grey levels.
    """
    width, height = size
    rng = np.random.default_rng(index)
    pixels = np.empty((height, width, 3), dtype=np.float32)
    pixels[:] = _index_color(index)
    pixels += rng.normal(0.0, noise, size=pixels.shape).astype(np.float32)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def decode_color_index(row: torch.Tensor) -> int:
    """The index a decoded CHW (or HWC) uint8 row of :func:`color_jpeg` encodes."""
    channels_first = row.shape[0] == 3
    red = row[0] if channels_first else row[..., 0]
    return round((float(red.float().mean()) - _COLOR_BASE) / _COLOR_STEP)


def write_lmdb(
    path: str | os.PathLike[str],
    payloads: Sequence[bytes],
    labels: Sequence[int] | None = None,
) -> str:
    """Write an LMDB in fastfeed's format (``fastfeed.packing``'s keys) holding ``payloads``.

    Unlike ``pack``, any value is accepted (zero-byte, corrupt), so tests can plant bad
    records. Returns the directory path.
    """
    import lmdb  # fastfeed dependency; imported where needed

    from fastfeed.sources.lmdb import FORMAT_VERSION, LABELS_KEY, META_KEY, record_key

    path = os.fspath(path)
    total = sum(len(p) for p in payloads)
    env = lmdb.open(path, subdir=True, map_size=max(1 << 20, 4 * total + (1 << 20)), lock=False)
    try:
        with env.begin(write=True) as txn:
            for i, p in enumerate(payloads):
                txn.put(record_key(i), bytes(p))
            meta = {
                "format_version": FORMAT_VERSION,
                "count": len(payloads),
                "classes": None,
                "has_labels": labels is not None,
                "has_paths": False,
            }
            txn.put(META_KEY, json.dumps(meta).encode())
            if labels is not None:
                txn.put(LABELS_KEY, np.asarray(labels, dtype="<i8").tobytes())
        env.sync(True)
    finally:
        env.close()
    return path


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
