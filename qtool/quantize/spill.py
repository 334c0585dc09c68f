"""Where a tensor waits when it reaches the sink before its offset is known (qtool.quantize.sink.LayoutWriter).

An offset in a shard's U8 region is known once every quant-state blob before it (in name order) has been
written. In name order that wait is short; a hub stream (qtool.quantize.fetch) takes tensors shard by shard,
and then `layers.2` waits for `layers.10`-`layers.19`: up to ~8 layers for a model of 10-99 layers, most of
the model beyond 99. Waiting tensors stay in memory up to `budget` bytes, the rest go to one file beside the
shards, and are copied into place (copy_file_range) when their offset is known. The file goes at the end.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import NamedTuple


class Spilled(NamedTuple):
    offset: int  # in the spill file
    nbytes: int


class Spill:
    def __init__(self, directory: Path, budget: int):
        self.path = Path(directory) / f".spill-{os.getpid()}.data"
        self.budget, self.held, self.end, self.fd = budget, 0, 0, -1

    def keep(self, t):
        """`t` itself while the memory budget allows, else its bytes written to the spill file (a Spilled)."""
        from qtool.quantize.sink import _pwrite_all, _tensor_bytes, naming_file

        n = t.numel() * t.element_size()
        if self.held + n <= self.budget:
            self.held += n
            return t
        if self.fd < 0:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        with naming_file(self.path):
            _pwrite_all(self.fd, _tensor_bytes(t), self.end)
        self.end += n
        return Spilled(self.end - n, n)

    def released(self, item) -> None:
        """A kept item has been written where it belongs."""
        if not isinstance(item, Spilled):
            self.held -= item.numel() * item.element_size()

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        self.path.unlink(missing_ok=True)
