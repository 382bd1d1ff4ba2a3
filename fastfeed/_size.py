"""Byte sizes from text: ``parse_size("8GiB")`` and back with ``format_size``."""

from __future__ import annotations

import re

from fastfeed.errors import ConfigError

__all__ = ["format_size", "parse_size"]

# Decimal units (KB, MB) are powers of 1000, binary ones (KiB, MiB) and bare letters (K, M,
# as in ``ulimit`` or ``docker -m 8g``) powers of 1024.
_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str) -> int:
    """Return a byte count from an int or a string like ``"8GiB"``, ``"512MB"``, ``"1.5G"``.

    Args:
        value: Bytes as a number, or a number with a unit (case-insensitive): B, K/KiB,
            KB, M/MiB, MB, G/GiB, GB, T/TiB, TB.

    Returns:
        The size in bytes (rounded down).

    Raises:
        ConfigError: Negative, not a number, or an unknown unit.
    """
    if isinstance(value, bool):
        raise ConfigError(f"size must be a number of bytes or a string like '8GiB', not {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"size must not be negative: {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise ConfigError(f"size must be a number of bytes or a string like '8GiB', not {value!r}")
    match = _SIZE_RE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"cannot parse size {value!r}: expected e.g. '8GiB', '512MB' or 1048576")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(nbytes: float) -> str:
    """Human-readable binary size, e.g. ``format_size(1536) == "1.5 KiB"``."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
