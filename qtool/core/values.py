"""Parsers of setting values: each takes (value, key name) and returns the canonical value or raises
ConfigError naming the key. Pure Python; the config layer's KEYS rows name them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from qtool.core import presets
from qtool.core.errors import ConfigError
from qtool.core.sizes import parse_size


def boolean(v: Any, key: str) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"invalid {key} {v!r}: expected true or false")


def integer(lo: int, hi: int) -> Callable[[Any, str], int]:
    def parse(v: Any, key: str) -> int:
        if isinstance(v, bool):
            raise ConfigError(f"invalid {key} {v!r}: expected an integer")
        try:
            n = int(str(v).strip()) if not isinstance(v, int) else v
        except ValueError:
            raise ConfigError(f"invalid {key} {v!r}: expected an integer") from None
        if not lo <= n <= hi:
            raise ConfigError(f"invalid {key} {n}: must be between {lo} and {hi}")
        return n
    return parse


def choice(choices: tuple, aliases: Mapping[str, str] | None = None) -> Callable[[Any, str], Any]:
    def parse(v: Any, key: str):
        s = str(v).strip().lower()
        s = (aliases or {}).get(s, s)
        if isinstance(choices[0], int):
            try:
                s = int(s)
            except ValueError:
                pass
        if s not in choices:
            raise ConfigError(f"invalid {key} {v!r}: expected one of {', '.join(map(str, choices))}")
        return s
    parse.choices = choices
    return parse


def items(v: Any, key: str) -> tuple[str, ...]:
    if isinstance(v, (list, tuple)):
        items = [str(x).strip() for x in v]
    else:
        items = [x.strip() for x in str(v).split(",")]
    return tuple(x for x in items if x)


def size(v: Any, key: str) -> int | None:
    if v is None or (isinstance(v, str) and v.strip().lower() in ("none", "")):
        if isinstance(v, str) and v.strip() == "":
            raise ConfigError(f"invalid {key} '': expected a size such as 24GB")
        return None
    n = parse_size(v, what=key)
    if n < 2**20:  # '--vram 24' is 24 bytes: surely 24GB was meant
        raise ConfigError(f"invalid {key} {v!r}: {n} bytes is not a memory budget (give a unit: 24GB, 24GiB)")
    return n


def budget(v: Any, key: str) -> int | str | None:
    """A size (bytes), or the name of a catalogue GPU whose memory is the budget."""
    text = v.strip() if isinstance(v, str) else v
    if isinstance(text, str) and text[:1].isalpha():
        gpu = presets.find_gpu(text)
        if gpu is None:
            known = ", ".join(sorted({g["key"] for g in presets.gpus().values()}))
            raise ConfigError(f"invalid {key} {v!r}: neither a size (24GB, 24GiB) nor a GPU from the catalogue "
                              f"(known: {known})")
        return gpu["key"]
    return size(v, key)


def gpu(v: Any, key: str) -> str:
    gpu = presets.find_gpu(str(v))
    if gpu is None:
        known = sorted({g["key"] for g in presets.gpus().values()})
        raise ConfigError(f"unknown GPU {v!r} (known: {', '.join(known)})")
    return gpu["key"]


MAX_GPUS = 64


def gpus(v: Any, key: str) -> int | tuple[str, ...]:
    """How many GPUs: a count (2), or the catalogue names of the cards, one per card (rtx-4090,rtx-3090 for
    mixed cards; each card's memory is then its budget)."""
    if isinstance(v, bool):
        raise ConfigError(f"invalid {key} {v!r}: expected a count (2) or GPU names (rtx-4090,rtx-3090)")
    if isinstance(v, int) or (isinstance(v, str) and v.strip().isdigit()):
        return integer(1, MAX_GPUS)(v, key)
    names = items(v, key)
    if len(names) == 1 and names[0].isdigit():  # "2," is a count with a stray comma
        return integer(1, MAX_GPUS)(names[0], key)
    if not names or any(n.isdigit() for n in names):
        raise ConfigError(f"invalid {key} {v!r}: expected a count (2) or GPU names (rtx-4090,rtx-3090)")
    if len(names) > MAX_GPUS:
        raise ConfigError(f"invalid {key}: {len(names)} cards, at most {MAX_GPUS}")
    return tuple(gpu(n, key) for n in names)
