"""Build the API reference (HTML) from fastfeed's docstrings with pdoc.

Usage::

    python docs/build_api.py            # writes docs/api/
    python docs/build_api.py --out DIR

Documents what users are told to import: the package face ``fastfeed`` (everything in its
``__all__``) and its public subpackages. Any warning raised while rendering (a docstring
pdoc cannot parse, a module that fails to import, a broken reference) fails the build:
warnings are errors. Warnings raised while *importing* third-party libraries (torch,
numpy) are not fastfeed's and are left alone: fastfeed is imported before recording
starts. Needs the ``dev`` extra (``pip install -e ".[dev]"``).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: The modules whose pages are built (their public submodules follow).
MODULES = ["fastfeed"]


def build(out: Path) -> list[str]:
    """Render the reference into ``out``; return the warnings raised (empty = success)."""
    import pdoc
    import pdoc.render

    import fastfeed  # noqa: F401 - imported first: third-party import warnings do not count

    pdoc.render.configure(docformat="google", show_source=False, search=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*MODULES, output_directory=out)
    return [f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in caught]


def main(argv: list[str] | None = None) -> int:
    """Build the reference; exit 1 on any warning."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "api", help="output folder")
    args = parser.parse_args(argv)
    problems = build(args.out)
    for line in problems:
        print(f"docs: {line}", file=sys.stderr)
    if problems:
        print(f"docs: {len(problems)} warning(s): the build fails", file=sys.stderr)
        return 1
    print(f"docs: wrote {args.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
