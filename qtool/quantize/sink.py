"""The safetensors shard writers (the staging transaction they write into is qtool.quantize.staging).

`LayoutWriter` writes each shard once, straight into its final file. Shard membership is decided
up front exactly like huggingface_hub's split_torch_state_dict_into_shards (greedy in state-dict
order; a tensor larger than the limit gets its own shard), and each file's layout is safetensors'
own: dtype rank descending, then name. Every size is known from shapes except the quant-state JSON
blobs (U8, a data-dependent float inside), and U8 sorts last: tensors before the first blob still to
come have known offsets and are pwritten where they go; the caller sends tensors in name order so
the U8 region fills front to back (anything that arrives early waits until its offset is known: in
memory up to a budget, then in a spill file, qtool.quantize.spill). The header goes first but its length is known only at the end: room for the worst case
(every blob at its longest) is reserved and the final JSON is padded to it with spaces (safetensors
accepts trailing whitespace; the length stays a multiple of 8). Files thus differ from
save_pretrained's only in header whitespace; names, dtypes, shapes and bytes are identical.

When a shard boundary would depend on the unknown blob lengths (a cumulative size within a few
bytes of the limit), `split_shards` says so and the caller falls back to `ShardWriter`, which takes
tensors in state-dict order, appends them to a per-shard data file and assembles each final file
by copying byte ranges at the end (the output is written twice, but the split is always exact).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol
from pathlib import Path

from qtool.core import dtypes
from qtool.core.errors import WeightsError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_COPY_CHUNK = 64 * 2**20
_WRITE_CHUNK = 1 << 30  # pwrite writes at most ~2 GiB per call
@contextlib.contextmanager
def naming_file(path: Path) -> Iterator[None]:
    """Attach the file name to an OSError from a write (file.write and os.pwrite leave it empty)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


@dataclass
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # in the shard's data file (arrival order)
    nbytes: int


@dataclass
class _Shard:
    data_path: Path
    entries: list[_Entry] = field(default_factory=list)
    size: int = 0
    file: object = None


def safetensors_header(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict | None) -> tuple[bytes, list]:
    """(header bytes incl. the 8-byte length, entries in data order) exactly as safetensors serializes."""
    ordered = sorted(entries, key=lambda e: dtypes.layout_key(e[1], e[0]))
    head: dict = {}
    if metadata is not None:
        head["__metadata__"] = metadata
    pos = 0
    for name, dtype, shape, nbytes in ordered:
        head[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, ordered


class Sink(Protocol):
    """What the stream writes into. Both writers implement it; the stream has one loop for either."""

    def add(self, name: str, tensor) -> None: ...

    def can_copy(self, name: str) -> bool:
        """Whether `name`'s bytes may go file to file (`copy`) instead of through memory."""

    def copy(self, name: str, src_path, src_offset: int, nbytes: int) -> None: ...

    def finish(self) -> dict:
        """-> {"files": [...], "weight_map": {...}, "total_size": int}"""

    def abort(self) -> None: ...


class ShardWriter:
    """Append tensors in order; `finish()` writes the shards (and the index when there are several)."""

    def can_copy(self, name: str) -> bool:
        return False  # a shard's layout is known only at the end: every tensor passes through memory

    def copy(self, name: str, src_path, src_offset: int, nbytes: int) -> None:
        raise NotImplementedError("ShardWriter takes tensors, not byte ranges")

    def __init__(self, directory: Path, *, max_shard_size: int, metadata: dict | None = None):
        self.dir = Path(directory)
        self.max_shard_size = max_shard_size
        self.metadata = metadata if metadata is not None else {"format": "pt"}
        self.shards: list[_Shard] = []  # in huggingface_hub's shard_list order
        self._current: _Shard | None = None
        self.total_size = 0
        self.bytes_written = 0

    def _new_shard(self) -> _Shard:
        path = self.dir / f".shard-{len(self.shards) + (self._current is not None):05d}-{os.getpid()}.data"
        shard = _Shard(path)
        shard.file = open(path, "wb")
        return shard

    def _close(self, shard: _Shard) -> None:
        shard.file.close()
        self.shards.append(shard)

    def add(self, name: str, tensor) -> None:
        """Write one CPU tensor's bytes now; the tensor can be freed when this returns."""
        t = tensor.detach().contiguous()
        nbytes = t.numel() * t.element_size()
        if nbytes > self.max_shard_size:
            shard = self._new_shard()
            self._write(shard, name, t, nbytes)
            self._close(shard)
        else:
            if self._current is not None and self._current.size + nbytes > self.max_shard_size:
                self._close(self._current)
                self._current = None
            if self._current is None:
                self._current = self._new_shard()
            self._write(self._current, name, t, nbytes)
        self.total_size += nbytes

    def _write(self, shard: _Shard, name: str, t, nbytes: int) -> None:
        offset = shard.file.tell()
        if nbytes:
            with naming_file(self.dir / "model*.safetensors"):  # the final name is known only at finish
                shard.file.write(t.reshape(-1).view(__import__("torch").uint8).numpy().data)
        shard.entries.append(_Entry(name, dtypes.code_of(t.dtype), tuple(t.shape), offset, nbytes))
        shard.size += nbytes
        self.bytes_written += nbytes

    def finish(self) -> dict:
        """Assemble the final files. Returns {"files": [...], "weight_map": {...}, "total_size": n}."""
        if self._current is not None and self._current.entries:
            self._close(self._current)
        elif self._current is not None:
            self._current.file.close()
            self._current.data_path.unlink(missing_ok=True)
        self._current = None
        if not self.shards:  # an empty model: one empty file, like safetensors would write
            self.shards.append(_Shard(self.dir / ".empty.data"))
            self.shards[0].data_path.write_bytes(b"")
        names = shard_names(len(self.shards))
        weight_map = {}
        for shard, fname in zip(self.shards, names):
            self._assemble(shard, self.dir / fname)
            for e in shard.entries:
                weight_map[e.name] = fname
        return {"files": names, "weight_map": weight_map, "total_size": self.total_size}

    def _assemble(self, shard: _Shard, final: Path) -> None:
        header, ordered = safetensors_header([(e.name, e.dtype, e.shape, e.nbytes) for e in shard.entries], self.metadata)
        by_name = {e.name: e for e in shard.entries}
        if len(by_name) != len(shard.entries):
            raise WeightsError("duplicate tensor name in one shard", path=final)
        with naming_file(final), open(shard.data_path, "rb") as src, open(final, "wb") as dst:
            dst.write(header)
            for name, *_ in ordered:
                e = by_name[name]
                _copy_range(src, dst, e.offset, e.nbytes)
        shard.data_path.unlink()

    def abort(self) -> None:
        for shard in self.shards + ([self._current] if self._current else []):
            with contextlib.suppress(Exception):
                shard.file.close()


def _copy_range(src, dst, offset: int, nbytes: int) -> None:
    src_fd, dst_fd = src.fileno(), dst.fileno()
    dst.flush()
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < nbytes:
                n = os.copy_file_range(src_fd, dst_fd, nbytes - done, offset + done)
                if n == 0:
                    break
                done += n
        except OSError:
            pass
        dst.seek(0, os.SEEK_END)
    while done < nbytes:
        chunk = os.pread(src_fd, min(_COPY_CHUNK, nbytes - done), offset + done)
        if not chunk:
            raise WeightsError("short read while assembling a shard", path=src.name)
        dst.write(chunk)
        done += len(chunk)
    if done != nbytes:
        raise WeightsError("short copy while assembling a shard", path=src.name)


@dataclass(frozen=True)
class EntrySpec:
    """One tensor of the output as planned: its byte size is exact (lo == hi) or a range (a JSON blob)."""

    name: str
    dtype: str  # safetensors dtype, e.g. "BF16"
    shape: tuple[int, ...] | None  # None: a 1-D blob whose length is known once it is written
    lo: int
    hi: int


def split_shards(specs: list[EntrySpec], max_shard_size: int) -> list[list[int]] | None:
    """huggingface_hub's greedy split over `specs` (state-dict order) -> shards as lists of indices, or
    None when a decision depends on sizes still unknown (a running total within a few bytes of the limit)."""
    shards: list[list[int]] = []
    cur: list[int] = []
    lo = hi = 0
    for i, e in enumerate(specs):
        if e.lo > max_shard_size:
            shards.append([i])
            continue
        if e.hi > max_shard_size:
            return None
        if cur and lo + e.lo > max_shard_size:
            shards.append(cur)
            cur, lo, hi = [], 0, 0
        elif cur and hi + e.hi > max_shard_size:
            return None
        cur.append(i)
        lo, hi = lo + e.lo, hi + e.hi
    if cur:
        shards.append(cur)
    return shards


def shard_names(n: int) -> list[str]:
    return [WEIGHTS_NAME] if n <= 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _tensor_bytes(t) -> memoryview:
    import torch

    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()).cast("B")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done: done + _WRITE_CHUNK], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        done += n


class _Layout:
    """One output file: its entries in data order, their offsets as they become known."""

    def __init__(self, path: Path, specs: list[EntrySpec], metadata: dict | None, spill=None):
        self.path, self.spill = path, spill  # qtool.quantize.spill: where early arrivals wait
        self.specs = sorted(specs, key=lambda e: dtypes.layout_key(e.dtype, e.name))
        self.index = {e.name: k for k, e in enumerate(self.specs)}
        if len(self.index) != len(self.specs):
            raise WeightsError("duplicate tensor name in one shard", path=path)
        self.metadata = metadata
        self.sizes: list[int | None] = [e.lo if e.lo == e.hi else None for e in self.specs]
        self.shapes: list[tuple | None] = [e.shape for e in self.specs]
        self.offsets: list[int | None] = [None] * len(self.specs)
        self.written = [False] * len(self.specs)
        self.pending: dict[int, object] = {}  # arrived before its offset was known
        self.resolved = 0  # offsets[:resolved] are known
        self.end = 0  # data bytes in offsets[:resolved]
        worst = [(e.name, e.dtype, e.shape if e.shape is not None else (e.hi,), e.hi) for e in self.specs]
        self.header_room = len(safetensors_header(worst, metadata)[0]) - 8  # a multiple of 8
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._resolve()

    def _resolve(self) -> None:
        while self.resolved < len(self.specs) and self.sizes[self.resolved] is not None:
            k = self.resolved
            self.offsets[k] = self.end
            self.end += self.sizes[k]
            self.resolved += 1
            if k in self.pending:
                item = self.pending.pop(k)
                self._write(k, item)
                self.spill.released(item)

    def _write(self, k: int, t) -> None:
        if self.sizes[k]:
            with naming_file(self.path):
                if isinstance(t, tuple):  # qtool.quantize.spill.Spilled: its bytes wait in the spill file
                    _copy_between(self.spill.path, t[0], self.fd, 8 + self.header_room + self.offsets[k], t[1])
                else:
                    _pwrite_all(self.fd, _tensor_bytes(t), 8 + self.header_room + self.offsets[k])
        self.written[k] = True

    def add(self, name: str, t) -> None:
        k = self.index[name]
        e = self.specs[k]
        nbytes = t.numel() * t.element_size()
        if self.written[k] or k in self.pending:
            raise WeightsError(f"tensor {name} written twice", path=self.path)
        if e.shape is None:
            if not e.lo <= nbytes <= e.hi:  # the reserved header would not fit: a planning bug
                raise RuntimeError(f"{name}: {nbytes} bytes, planned {e.lo}..{e.hi}")
            self.sizes[k], self.shapes[k] = nbytes, (nbytes,)
            self._resolve()  # the blob itself, when next, is written in place rather than kept waiting
        elif nbytes != self.sizes[k] or tuple(t.shape) != tuple(e.shape) or dtypes.code_of(t.dtype) != e.dtype:
            raise RuntimeError(f"{name}: got {t.dtype} {tuple(t.shape)}, planned {e.dtype} {e.shape}")
        if k < self.resolved:
            self._write(k, t)
        else:
            self.pending[k] = self.spill.keep(t)
            self._resolve()

    def copy(self, name: str, src_path, src_offset: int, nbytes: int) -> None:
        """Put a tensor's bytes straight from a source file (a kept tensor whose dtype does not change)."""
        k = self.index[name]
        if k >= self.resolved or self.sizes[k] != nbytes or self.written[k]:
            raise RuntimeError(f"{name}: cannot copy {nbytes} bytes to an unplanned or unresolved entry")
        with naming_file(self.path):
            _copy_between(src_path, src_offset, self.fd, 8 + self.header_room + self.offsets[k], nbytes)
        self.written[k] = True

    def finish(self) -> int:
        missing = [e.name for e, w in zip(self.specs, self.written) if not w]
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensors never written, e.g. {missing[0]}")
        head: dict = {} if self.metadata is None else {"__metadata__": self.metadata}
        for e, shape, off, n in zip(self.specs, self.shapes, self.offsets, self.sizes):
            head[e.name] = {"dtype": e.dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > self.header_room:
            raise RuntimeError(f"header of {self.path.name} outgrew its reserved {self.header_room} bytes")
        text += b" " * (self.header_room - len(text))
        with naming_file(self.path):
            _pwrite_all(self.fd, memoryview(struct.pack("<Q", len(text)) + text), 0)
            os.ftruncate(self.fd, 8 + self.header_room + self.end)
            os.close(self.fd)
        self.fd = -1
        return self.end

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def _copy_between(src_path, src_offset: int, dst_fd: int, dst_offset: int, nbytes: int) -> None:
    """copy_file_range (no trip through user space; a reflink on some filesystems), else pread + pwrite."""
    fd = os.open(src_path, os.O_RDONLY)
    try:
        done = 0
        if hasattr(os, "copy_file_range"):
            with contextlib.suppress(OSError):
                while done < nbytes:
                    n = os.copy_file_range(fd, dst_fd, min(nbytes - done, _WRITE_CHUNK), src_offset + done,
                                           dst_offset + done)
                    if n <= 0:
                        break
                    done += n
        while done < nbytes:
            chunk = os.pread(fd, min(_COPY_CHUNK, nbytes - done), src_offset + done)
            if not chunk:
                raise WeightsError("unexpected end of file copying a tensor", path=src_path)
            _pwrite_all(dst_fd, memoryview(chunk), dst_offset + done)
            done += len(chunk)
    finally:
        os.close(fd)


class LayoutWriter:
    """Writes planned shards once, in place. `add` in any order (name order keeps memory flat), then `finish`."""

    def __init__(self, directory: Path, specs: list[EntrySpec], shards: list[list[int]], *,
                 metadata: dict | None = None, spill_budget: int = 1 << 30):
        from qtool.quantize.spill import Spill

        self.dir = Path(directory)
        self.spill = Spill(self.dir, spill_budget)  # early arrivals: in memory up to the budget, then on disk
        self.metadata = metadata if metadata is not None else {"format": "pt"}
        shards = shards or [[]]  # an empty model: one file with an empty header, like safetensors
        self.names = shard_names(len(shards))
        self.layouts: list[_Layout] = []
        self.where: dict[str, _Layout] = {}
        self.weight_map: dict[str, str] = {}
        try:
            for fname, members in zip(self.names, shards):
                layout = _Layout(self.dir / fname, [specs[i] for i in members], self.metadata, self.spill)
                self.layouts.append(layout)
                for i in members:
                    self.where[specs[i].name] = layout
                    self.weight_map[specs[i].name] = fname
        except BaseException:
            self.abort()
            raise
        self.total_size = 0

    def add(self, name: str, tensor) -> None:
        self.where[name].add(name, tensor)

    def can_copy(self, name: str) -> bool:
        """True when `name`'s offset is known now (it stays known): `copy` may put it in place."""
        layout = self.where[name]
        return layout.index[name] < layout.resolved

    def copy(self, name: str, src_path, src_offset: int, nbytes: int) -> None:
        self.where[name].copy(name, src_path, src_offset, nbytes)

    def finish(self) -> dict:
        self.total_size = sum(layout.finish() for layout in self.layouts)
        self.spill.close()
        return {"files": list(self.names), "weight_map": dict(self.weight_map), "total_size": self.total_size}

    def abort(self) -> None:
        for layout in self.layouts:
            layout.close()
        self.spill.close()


def write_index(directory: Path, weight_map: dict[str, str], metadata: dict) -> None:
    """model.safetensors.index.json exactly as save_pretrained writes it."""
    index = {"metadata": metadata, "weight_map": weight_map}
    (Path(directory) / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
