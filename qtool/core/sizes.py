"""Parse and format byte sizes. Pure Python: used on the fast `estimate` path."""

from __future__ import annotations

import re
from fractions import Fraction

from qtool.core.errors import ConfigError

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[a-zA-Z]*)\s*$")


def parse_size(text: str | int, *, what: str = "size") -> int:
    """'24GB' -> 24_000_000_000, '24 GiB' -> 25_769_803_776, '24000MB', '1.5e9' is not accepted.

    Decimal units (KB, MB, GB, TB) are powers of 1000, binary ones (KiB ... TiB) powers of 1024,
    as GPU vendors and `nvidia-smi` use them respectively. A bare number is bytes.
    """
    if isinstance(text, bool):
        raise ConfigError(f"invalid {what} {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"invalid {what} {text!r}: must not be negative")
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ConfigError(f"invalid {what} {text!r}: expected a number and a unit such as 24GB, 24 GiB or 24000MB")
    unit = m["unit"].lower()
    if unit not in _UNITS:
        raise ConfigError(f"invalid {what} {text!r}: unknown unit {m['unit']!r} (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)")
    if len(m["num"]) > 64:  # also keeps Fraction clear of int()'s 4300-digit limit
        raise ConfigError(f"invalid {what} {text[:40]!r}...: too many digits")
    value = Fraction(m["num"]) * _UNITS[unit]  # exact: float loses bytes above 2**53
    if value > 2**62:
        raise ConfigError(f"invalid {what} {text!r}: too large")
    return round(value)


def format_bytes(n: float, *, binary: bool = True) -> str:
    """1.41e11 -> '131.4 GiB' (powers of 1024, as nvidia-smi and torch report memory); binary=False -> '141.1 GB'.

    GiB is qtool's one convention for memory; the CLI's --units gb switches its own output to powers of 1000."""
    base, units = (1024.0, ["B", "KiB", "MiB", "GiB", "TiB"]) if binary else (1000.0, ["B", "KB", "MB", "GB", "TB"])
    value = float(n)
    for unit in units:
        if abs(value) < base or unit == units[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= base
    raise AssertionError("unreachable")
