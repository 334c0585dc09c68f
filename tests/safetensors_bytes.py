"""The tests' one way to read and write safetensors bytes by hand: an 8-byte little-endian header length, the
JSON header, then the data. For files safetensors itself would refuse to write (corrupt, hostile, truncated)
and for comparing what two writers put in a file. Tests get it as the `safetensors_bytes` fixture
(tests/conftest.py); property tests, which cannot take function-scoped fixtures, import it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path


def write(path: Path, header: dict | bytes, data: bytes = b"", *, length: int | None = None) -> Path:
    """A file of `header` (a dict, or raw bytes as they are) and `data`; `length` overrides the length field."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(hb) if length is None else length) + hb + data)
    return Path(path)


def split(path: Path) -> tuple[int, dict, bytes]:
    """(header length as the file says it, the parsed header, the data bytes after it)."""
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8:8 + n]), raw[8 + n:]


def header_length(path: Path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def set_header_length(path: Path, length: int) -> None:
    """Overwrite only the 8-byte length field."""
    raw = bytearray(Path(path).read_bytes())
    raw[:8] = struct.pack("<Q", length)
    Path(path).write_bytes(bytes(raw))


def rewrite_header(path: Path, change: Callable[[dict], None]) -> None:
    """Parse the header, let `change` edit it in place, write it back compact; the data bytes stay as they are."""
    _, header, data = split(path)
    change(header)
    write(path, header, data)
