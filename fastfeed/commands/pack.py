"""``fastfeed pack SRC OUT.lmdb``: pack an image folder, file list or LMDB into one LMDB."""

from __future__ import annotations

import argparse

HELP = "pack an image folder, file list or LMDB into one LMDB"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``pack``'s arguments to ``parser``."""
    parser.add_argument("src", help="ImageFolder root, file list (path[<TAB>label]) or LMDB")
    parser.add_argument("out", help="output LMDB directory (e.g. train.lmdb)")
    parser.add_argument(
        "--max-side",
        type=int,
        default=None,
        metavar="N",
        help="re-encode images whose longer side exceeds N pixels (keeps aspect)",
    )
    parser.add_argument(
        "--quality", type=int, default=90, metavar="Q", help="JPEG quality of re-encoded images"
    )
    parser.add_argument(
        "--workers", type=int, default=None, metavar="K", help="re-encoding threads (default: CPUs)"
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="decode every image once (at 1/8 scale where JPEG allows) and treat one that "
        "fails as a bad record; --max-side implies it",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing OUT (never allowed when SRC and OUT overlap)",
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out unreadable records, and images that fail to decode (implies "
        "--verify), and list them",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")


def run(args: argparse.Namespace) -> int:
    """Pack ``args.src`` into ``args.out`` (bar and summary on stderr); return the exit code."""
    import warnings

    from PIL import Image

    from fastfeed.packing import pack

    # pack() refuses decompression bombs itself (naming the file); the CLI owns this
    # process, so it may silence Pillow's duplicate warning (the library never does).
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    pack(
        args.src,
        args.out,
        max_side=args.max_side,
        quality=args.quality,
        verify=args.verify or args.skip_bad,
        workers=args.workers,
        overwrite=args.overwrite,
        on_error="skip" if args.skip_bad else "raise",
        progress=not args.quiet,
    )
    return 0
