"""The records :func:`fastfeed.pack` writes: read in batches, decode-checked, re-encoded.

* :func:`_read_batch`: a batch by ``read_many``, record by record when one fails.
* :func:`_reencode` / :func:`_shrink`: the ``verify`` decode check and the ``max_side``
  re-encode, on the pack's worker threads.
* :func:`_origin`: the origin written to the paths key for error messages.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

from PIL import Image

from fastfeed.errors import DecodeError, SourceError
from fastfeed.sources.base import Record, Source
from fastfeed.sources.files import FileSource, _WorkerPool
from fastfeed.sources.lmdb import LMDBSource

if TYPE_CHECKING:
    from fastfeed.packing import PackReport


def _origin(src: Source, index: int) -> str:
    if isinstance(src, FileSource):
        return src.relpath(index)
    if isinstance(src, LMDBSource) and src.origins is not None:
        return src.origins[index]
    return src.describe(index)


def _shrink(data: bytes, max_side: int | None, quality: int) -> bytes | None:
    """Decode-check an image and re-encode it to ``max_side``; ``None`` = keep the bytes.

    Images that need no resizing (or every image when ``max_side`` is ``None``: the
    ``verify`` check) are still decoded, at 1/8 scale where JPEG allows (which is cheap,
    and still reads every coded byte), so a corrupt file is caught at pack time rather
    than in the middle of training.

    Pillow's decompression-bomb guard is applied here without changing warning filters
    (``warnings.catch_warnings`` is process-global and not thread-safe): an image over
    ``Image.MAX_IMAGE_PIXELS`` is refused with :class:`DecodeError`.
    """
    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and w * h > limit:
            raise DecodeError(
                f"image of {w}x{h} = {w * h} pixels exceeds PIL.Image.MAX_IMAGE_PIXELS "
                f"({limit}): a possible decompression bomb"
            )
        if max_side is None or max(w, h) <= max_side:
            img.draft(img.mode, (max(1, w // 8), max(1, h // 8)))
            img.load()
            return None
        scale = max_side / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        if w >= h:
            size = (max_side, size[1])
        else:
            size = (size[0], max_side)
        img.draft("RGB", size)  # JPEG DCT scaling: decode at >= size, much faster
        out = img if img.mode in ("RGB", "L") else img.convert("RGB")
        out = out.resize(size, Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        out.save(buf, format="JPEG", quality=quality)
        return buf.getvalue()


def _read_batch(
    src: Source, indices: Sequence[int], skip: bool
) -> list[tuple[int, Record | BaseException]]:
    try:
        return list(zip(indices, src.read_many(indices), strict=True))
    except SourceError:
        if not skip:
            raise
    out: list[tuple[int, Record | BaseException]] = []
    for i in indices:  # find which record failed; keep the others
        try:
            out.append((i, src.read(i)))
        except SourceError as exc:
            out.append((i, exc))
    return out


def _record_in_bytes(rec: Record) -> int:
    # _reencode stashes the input size on re-encoded records (see there).
    return getattr(rec, "_in_bytes", len(rec.data))


class _Reencoded(Record):
    """A record whose data was re-encoded; remembers the input size for the report."""

    _in_bytes: int


def _reencode(
    batch: list[tuple[int, Record | BaseException]],
    pool: _WorkerPool | None,
    max_side: int | None,
    quality: int,
    report: PackReport,
) -> list[tuple[int, Record | BaseException]]:
    def work(k: int) -> Record | BaseException:
        rec = batch[k][1]
        if isinstance(rec, BaseException):
            return rec
        try:
            new = _shrink(rec.data, max_side, quality)
        except Exception as exc:  # any decoder error: reported with the file's name
            return exc
        if new is None:
            return rec
        out = _Reencoded(new, rec.label)
        out._in_bytes = len(rec.data)
        return out

    results = (
        pool.map(work, len(batch)) if pool is not None else [work(k) for k in range(len(batch))]
    )
    report.reencoded += sum(isinstance(r, _Reencoded) for r in results)
    report.verified += sum(not isinstance(r, BaseException) for r in results)
    return [(i, r) for (i, _), r in zip(batch, results, strict=True)]
