"""``fastfeed inspect PATH``: count, classes, sizes and sample keys of an LMDB or folder."""

from __future__ import annotations

import argparse
import json
import os
import statistics

HELP = "print count, classes, sizes and sample keys of an LMDB or folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``inspect``'s arguments to ``parser``."""
    parser.add_argument("path", help="LMDB directory, ImageFolder root or file list")
    parser.add_argument(
        "--samples", type=int, default=5, metavar="N", help="sample records to list (default 5)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")


def inspect_path(path: str, samples: int = 5) -> dict:
    """Describe the dataset at ``path`` as a plain dict (what ``inspect`` prints).

    Raises:
        SourceNotFoundError, CorruptSourceError, EmptySourceError: As the sources do.
    """
    from fastfeed import FileSource, LMDBSource
    from fastfeed.sources import open_source

    with open_source(path) as src:
        sizes = src.record_sizes()  # type: ignore[attr-defined]
        valid = [s for s in sizes if s >= 0]
        info: dict = {
            "path": path,
            "kind": type(src).__name__,
            "records": len(src),
            "classes": list(src.classes) if src.classes else None,
            "total_bytes": sum(valid),
            "unreadable": len(sizes) - len(valid),
            "record_bytes": {
                "min": min(valid) if valid else 0,
                "median": statistics.median(valid) if valid else 0,
                "mean": statistics.fmean(valid) if valid else 0.0,
                "max": max(valid) if valid else 0,
            },
            "samples": [],
        }
        labels = getattr(src, "labels", None)
        for i in range(min(samples, len(src))):
            sample = {"index": i, "bytes": sizes[i], "label": labels[i] if labels else None}
            if isinstance(src, LMDBSource):
                sample["key"] = src.key(i).decode("utf-8", "backslashreplace")
                if src.origins is not None:
                    sample["path"] = src.origins[i]
            elif isinstance(src, FileSource):
                sample["path"] = src.relpath(i)
            info["samples"].append(sample)
        if isinstance(src, LMDBSource):
            info["file_bytes"] = os.path.getsize(src.data_path)
            info["meta"] = src.meta
    return info


def run(args: argparse.Namespace) -> int:
    """Print what :func:`inspect_path` found; return the exit code."""
    from fastfeed._size import format_size as _human

    info = inspect_path(args.path, args.samples)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rb = info["record_bytes"]
    classes = info["classes"]
    lines = [
        f"{info['path']} ({info['kind']})",
        f"  records:     {info['records']}",
    ]
    if classes:
        shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
        lines.append(f"  classes:     {len(classes)} ({shown})")
    else:
        lines.append("  classes:     none")
    total = f"  total size:  {_human(info['total_bytes'])} of records"
    if "file_bytes" in info:
        total += f" ({_human(info['file_bytes'])} data.mdb)"
    lines.append(total)
    lines.append(
        f"  record size: min {_human(rb['min'])}, median {_human(rb['median'])}, "
        f"mean {_human(rb['mean'])}, max {_human(rb['max'])}"
    )
    if info["unreadable"]:
        lines.append(f"  unreadable:  {info['unreadable']} files could not be stat'ed")
    lines.append("  samples:")
    for s in info["samples"]:
        parts = [f"    [{s['index']}]"]
        if "key" in s:
            parts.append(f"key {s['key']}")
        if "path" in s:
            parts.append(s["path"])
        parts.append(f"{s['bytes']} B")
        if s["label"] is not None:
            label = s["label"]
            name = classes[label] if classes and 0 <= label < len(classes) else None
            parts.append(f"label {label}" + (f" ({name})" if name else ""))
        lines.append("  ".join(parts))
    print("\n".join(lines))
    return 0
