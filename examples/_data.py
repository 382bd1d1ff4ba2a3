"""Helpers shared by the example scripts: data to train on and a torch Dataset over it.

Not part of fastfeed's API: the examples keep their training loops in plain sight and
put only the data plumbing here.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from typing import Any

import torch
from torch.utils.data import Dataset

from fastfeed.packing import pack
from fastfeed.sources import open_source
from fastfeed.sources.base import Source
from fastfeed.synthetic import make_image_folder

__all__ = ["ImageDataset", "dataset_path", "pick_device", "synthetic_data"]


def synthetic_data(
    n_classes: int, per_class: int, *, lmdb: bool = False, seed: int = 0, keep: str | None = None
) -> str:
    """Generate a small ImageFolder of JPEGs (and pack it to LMDB with ``lmdb=True``).

    Args:
        n_classes: Class folders.
        per_class: Images per class.
        lmdb: Return the path of a packed LMDB instead of the folder.
        seed: Pixels and sizes are a function of the seed.
        keep: Write under this folder and keep it; default a temporary folder removed
            when the script exits.

    Returns:
        The folder (or LMDB) path.
    """
    if keep is None:
        root = tempfile.mkdtemp(prefix="fastfeed-example-")
        atexit.register(shutil.rmtree, root, ignore_errors=True)
    else:
        root = keep
        os.makedirs(root, exist_ok=True)
    t0 = time.perf_counter()
    folder = os.path.join(root, f"images-{seed}")
    make_image_folder(folder, n_classes, per_class, seed=seed)
    path = folder
    if lmdb:
        path = os.path.join(root, f"images-{seed}.lmdb")
        pack(folder, path, overwrite=True, progress=False)
    print(
        f"generated {n_classes * per_class} JPEGs ({n_classes} classes) in "
        f"{time.perf_counter() - t0:.1f} s: {path}",
        flush=True,
    )
    return path


def dataset_path(given: str | None, *, fast: bool, lmdb: bool = False, seed: int = 0) -> str:
    """``given`` when set, else freshly generated synthetic data (tiny with ``fast``)."""
    if given is not None:
        return given
    return synthetic_data(4, 12 if fast else 80, lmdb=lmdb, seed=seed)


def pick_device(requested: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else as given."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


class ImageDataset(Dataset):
    """A map-style torch Dataset over an image folder, file list or fastfeed LMDB.

    ``dataset[i]`` reads record ``i``'s encoded bytes and returns
    ``(transform(bytes), label)``. It works with torch's DataLoader (process workers:
    the source reopens its files in each worker) and with ``fastfeed.DataLoader``
    (threads share one source).

    Args:
        path: ImageFolder root, file list or LMDB (see :func:`fastfeed.sources.open_source`).
        transform: Called on the encoded bytes, e.g. a ``fastfeed.image.Compose``.
    """

    def __init__(self, path: str, transform: Any) -> None:
        self.source: Source = open_source(path)
        self.transform = transform
        self.classes = self.source.classes

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        record = self.source.read(index)
        return self.transform(record.data), -1 if record.label is None else record.label
