"""A safe, lazy reader for checkpoint directories (config.json + *.safetensors [+ index]).

Everything a file claims is checked before it is trusted: safetensors headers are parsed here in
pure Python (length, JSON, dtypes, shapes, offsets, truncation, overlap), index shard names must be
plain file names inside the directory, and pickle checkpoints (.bin/.pt/.pth/.ckpt) are refused
unless the user opts in, and then only loaded with torch.load(weights_only=True).
Tensors are read one at a time through a memory map; no shard is ever loaded whole.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtool.core.dtypes import BY_CODE, MODEL_DTYPES, code_of, is_float_dtype, torch_dtype
from qtool.core.errors import ConfigError, WeightsError

INDEX_NAME = "model.safetensors.index.json"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
MAX_HEADER_BYTES = 100 * 1000 * 1000  # safetensors' own limit

# Tensor-name endings that only a bitsandbytes-quantized checkpoint has.
_BNB_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB", ".weight_format",
                 ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype string: "F32", "F16", "BF16", "U8", "I64", ...
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset of the data in the file (-1 for pickle checkpoints)
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * BY_CODE[self.dtype].itemsize


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    file_size: int
    data_start: int  # 8 + header length
    tensors: dict[str, TensorInfo]  # in header order
    metadata: dict[str, Any]


def weights_dtype(root: Path) -> str | None:
    """The dtype `from_pretrained(dtype="auto")` falls back to when config.json names none: the first
    float tensor (by name) of the first weight file, as a torch dtype name; None when unknown. Pure Python
    (headers only), so `qtool estimate` can use it without importing torch."""
    root = Path(root)
    files = [root / "model.safetensors"] if (root / "model.safetensors").is_file() else sorted(root.glob("*.safetensors"))
    if not files:
        return None
    try:
        header = read_safetensors_header(files[0])
    except WeightsError:
        return None
    for _, info in sorted(header.tensors.items()):
        if is_float_dtype(info.dtype):
            name = BY_CODE[info.dtype].name
            return name if name in MODEL_DTYPES else None
    return None


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse and validate a safetensors header without trusting any of it. Raises WeightsError."""
    return parse_safetensors_header(Path(path), *_read_header_bytes(Path(path)))


def parse_safetensors_header(path: Path, size: int, n: int, raw: bytes) -> SafetensorsHeader:
    """The same checks on header bytes read elsewhere (a hub stream reads them by HTTP range): `size` is the
    file's length, `n` the header length its first 8 bytes give, `raw` the n header bytes; `path` is where the
    file is, or will be."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise WeightsError("corrupt safetensors header: not valid UTF-8", path=path) from None
    except (ValueError, RecursionError) as exc:
        raise WeightsError(f"corrupt safetensors header: invalid JSON ({_short(exc)})", path=path) from None
    if not isinstance(header, dict):
        raise WeightsError("corrupt safetensors header: expected a JSON object", path=path)
    data_start = 8 + n
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WeightsError("corrupt safetensors header: __metadata__ must map strings to strings", path=path)
    tensors = {name: _tensor_entry(path, name, entry, data_start, size) for name, entry in header.items()}
    _check_tiling(path, tensors, data_start, size)
    return SafetensorsHeader(path, size, data_start, tensors, metadata)


def _read_header_bytes(path: Path) -> tuple[int, int, bytes]:
    """-> (file size, header length, header bytes), refusing lengths the file cannot hold."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise WeightsError(f"truncated safetensors file: {size} bytes, too short for a header", path=path)
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8:
                raise WeightsError(f"corrupt safetensors header: header length {n} exceeds the file ({size} bytes); "
                                   "truncated or not a safetensors file", path=path)
            if n > MAX_HEADER_BYTES:
                raise WeightsError(f"corrupt safetensors header: header length {n} is over the {MAX_HEADER_BYTES} "
                                   "byte limit", path=path)
            raw = f.read(n)
    except OSError as exc:
        raise WeightsError(f"cannot read: {exc.strerror or exc}", path=path) from None
    if len(raw) != n:
        raise WeightsError("truncated safetensors file: header cut short", path=path)
    return size, n, raw


def _tensor_entry(path: Path, name: str, entry: Any, data_start: int, size: int) -> TensorInfo:
    """One header entry, checked: a known dtype, a shape of naturals, data_offsets that match them and fit."""
    where = f"tensor {name!r}"
    if not isinstance(entry, dict):
        raise WeightsError(f"corrupt safetensors header: {where} is not an object", path=path)
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in BY_CODE:
        raise WeightsError(f"corrupt safetensors header: {where} has unknown dtype {dtype!r}", path=path)
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise WeightsError(f"corrupt safetensors header: {where} has invalid shape {_short(shape)}", path=path)
    offsets = entry.get("data_offsets")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise WeightsError(f"corrupt safetensors header: {where} has invalid data_offsets {_short(offsets)}", path=path)
    begin, end = offsets
    expected = math.prod(shape) * BY_CODE[dtype].itemsize
    if end - begin != expected:
        raise WeightsError(
            f"corrupt safetensors header: {where} ({dtype}, shape {_short(shape)}) needs {expected} bytes "
            f"but its data_offsets span {end - begin}", path=path)
    if data_start + end > size:
        raise WeightsError(
            f"truncated safetensors file: {where} ends at byte {data_start + end} but the file has {size} bytes",
            path=path)
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, data_start + end)


def _check_tiling(path: Path, tensors: dict[str, TensorInfo], data_start: int, size: int) -> None:
    """Like safetensors itself: the tensors must tile the data region exactly, no overlap, no gap, no tail."""
    covered, last = 0, None
    for begin, end, name in sorted((t.start - data_start, t.end - data_start, n) for n, t in tensors.items()):
        if begin < covered:
            raise WeightsError(f"corrupt safetensors header: tensors {last!r} and {name!r} overlap", path=path)
        if begin > covered:
            raise WeightsError(f"corrupt safetensors header: bytes {covered}..{begin} of the data are not part of "
                               "any tensor", path=path)
        covered, last = end, name
    if covered != size - data_start:
        raise WeightsError(f"corrupt safetensors header: {size - data_start - covered} bytes after the last tensor",
                           path=path)


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _short(v, limit: int = 80) -> str:
    text = str(v) if isinstance(v, Exception) else repr(v)
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_shard_name(name, index_path: Path, root: Path, allowed: list[Path]) -> Path:
    """A weight_map value must be a plain file name in the checkpoint directory. Nothing is opened."""
    if not isinstance(name, str) or not name:
        raise WeightsError(f"invalid shard name {_short(name)} in weight_map", path=index_path)
    if ("/" in name or "\\" in name or name in (".", "..") or "\x00" in name or os.path.isabs(name)
            or (len(name) >= 2 and name[1] == ":")):
        raise WeightsError(f"refusing shard name {name!r}: shard files must be plain file names inside the checkpoint directory",
                           path=index_path)
    candidate = root / name
    if candidate.is_symlink():
        _check_inside(candidate, allowed, index_path)
    return candidate


def _allowed_roots(root: Path) -> list[Path]:
    """Where a weight file (or the target of its symlink) may live.

    The directory itself; and for a Hugging Face cache snapshot (.../snapshots/<rev>/), the cache's
    blobs/ folder, because huggingface_hub stores every snapshot file as a symlink into it.
    """
    real = root.resolve()
    allowed = [real]
    if real.parent.name == "snapshots":
        allowed.append(real.parent.parent / "blobs")
    return allowed


def _check_inside(path: Path, allowed: list[Path], source: Path) -> None:
    target = path.resolve()
    if not any(target == a or a in target.parents for a in allowed):
        raise WeightsError(f"refusing {path.name!r}: it is a symlink to {target}, outside the checkpoint directory",
                           path=source)


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_bytes().decode("utf-8")
        return json.loads(text)
    except OSError as exc:
        raise WeightsError(f"cannot read: {exc.strerror or exc}", path=path) from None
    except UnicodeDecodeError:
        raise WeightsError(f"invalid {what}: not valid UTF-8", path=path) from None
    except (ValueError, RecursionError) as exc:
        raise WeightsError(f"invalid {what}: invalid JSON ({_short(exc)})", path=path) from None


def _read_index(index_path: Path, root: Path, allowed: list[Path], *,
                present: bool = True) -> tuple[dict, list[Path], dict[str, str]]:
    index = _read_json(index_path, "index file")
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise WeightsError("invalid index file: expected a JSON object with a 'weight_map' object", path=index_path)
    weight_map = index["weight_map"]
    if not weight_map:
        raise WeightsError("invalid index file: its weight_map lists no tensors", path=index_path)
    # Every shard name is checked before any shard is touched.
    shards: dict[str, Path] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise WeightsError(f"invalid shard name {_short(shard)} for tensor {tensor!r} in weight_map", path=index_path)
        if shard not in shards:
            shards[shard] = _check_shard_name(shard, index_path, root, allowed)
    files = []
    for shard in sorted(shards):
        path = shards[shard]
        if present and not path.is_file():
            raise WeightsError(f"shard {shard!r} named in the index is missing", path=index_path)
        files.append(path)
    return index, files, weight_map


@dataclass
class Checkpoint:
    root: Path
    files: list[Path]
    tensors: dict[str, TensorInfo]  # file order, then header order
    config: dict | None = None
    index: dict | None = None
    format: str = "safetensors"  # or "pickle"
    _handles: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _pickled: dict = field(default_factory=dict, repr=False)

    MAX_OPEN_HANDLES = 4

    @classmethod
    def open(cls, root: Path, *, allow_pickle: bool = False, require_config: bool = True,
             headers: dict[str, SafetensorsHeader] | None = None) -> "Checkpoint":
        """Open a checkpoint directory: validate every header and the index; read no tensor data. `headers`
        (file name -> header read elsewhere): the weight files are not on disk yet (qtool.quantize.fetch)."""
        root = Path(root).expanduser()
        if not root.exists():
            raise WeightsError("no such file or directory", path=root)
        if not root.is_dir():
            raise WeightsError("not a directory: expected a checkpoint directory with config.json and *.safetensors", path=root)
        config = None
        cfg_path = root / "config.json"
        if cfg_path.is_file():
            from qtool.core.models import read_config_json

            config = read_config_json(cfg_path)
        elif require_config:
            raise ConfigError("no config.json in directory", path=root)
        allowed = _allowed_roots(root)

        index = None
        weight_map: dict[str, str] | None = None
        index_path = root / INDEX_NAME
        single = root / "model.safetensors"
        if headers is not None:  # a hub stream: the index, else model.safetensors (as transformers loads it)
            index, files, weight_map = (_read_index(index_path, root, allowed, present=False)
                                        if index_path.is_file() else (None, [single], None))
        elif index_path.is_file() and not single.is_file():
            index, files, weight_map = _read_index(index_path, root, allowed)
        else:
            # As transformers (modeling_utils._get_resolved_checkpoint_files): model.safetensors when present,
            # even beside an index (repos also ship e.g. consolidated.safetensors in another layout); otherwise
            # every *.safetensors, for hand-made sharded folders without an index.
            files = [single] if single.is_file() else sorted(p for p in root.glob("*.safetensors") if p.is_file())
            for p in files:
                if p.is_symlink():
                    _check_inside(p, allowed, root)
        if not files:
            pickles = sorted(p for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
            if pickles:
                if not allow_pickle:
                    raise WeightsError(
                        f"refusing pickle checkpoint ({pickles[0].name}): loading pickle can run arbitrary code",
                        path=root, hint="convert it to safetensors, or pass --allow-pickle if you trust it")
                return cls._open_pickle(root, pickles, config, allowed)
            raise WeightsError("no weight files (*.safetensors) in directory", path=root)

        tensors: dict[str, TensorInfo] = {}
        for path in files:
            header = headers[path.name] if headers is not None else read_safetensors_header(path)
            for name, info in header.tensors.items():
                if name in tensors:
                    raise WeightsError(f"tensor {name!r} appears in both {tensors[name].file.name} and {path.name}", path=root)
                tensors[name] = info
        if weight_map is not None:
            for name, shard in weight_map.items():
                info = tensors.get(name)
                if info is None or info.file.name != shard:
                    raise WeightsError(f"tensor {name!r} is listed in the index but missing from shard {shard!r}",
                                       path=index_path)
        return cls(root, files, tensors, config, index)

    @classmethod
    def _open_pickle(cls, root: Path, pickles: list[Path], config: dict | None, allowed: list[Path]) -> "Checkpoint":
        import pickle

        import torch

        index = None
        files = pickles
        pidx = root / PICKLE_INDEX_NAME
        if pidx.is_file():
            index, files, _ = _read_index(pidx, root, allowed)
        else:
            for p in files:
                if p.is_symlink():
                    _check_inside(p, allowed, root)
        tensors: dict[str, TensorInfo] = {}
        pickled: dict[str, Any] = {}
        for path in files:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as exc:
                raise WeightsError(f"cannot load with weights_only=True: {_short(exc, 160)}", path=path) from None
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            if not isinstance(state, dict):
                raise WeightsError("not a state dict (expected a mapping of names to tensors)", path=path)
            for name, t in state.items():
                if not isinstance(t, torch.Tensor):
                    raise WeightsError(f"entry {name!r} is not a tensor", path=path)
                if name in tensors:
                    raise WeightsError(f"tensor {name!r} appears in both {tensors[name].file.name} and {path.name}", path=root)
                tensors[name] = TensorInfo(str(name), code_of(t.dtype), tuple(t.shape), path, -1, -1)
                pickled[name] = t
        ckpt = cls(root, list(files), tensors, config, index, format="pickle")
        ckpt._pickled = pickled
        return ckpt

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read(self, name: str, device: str = "cpu"):
        """One tensor as a torch.Tensor, read through a memory map (never the whole shard)."""
        info = self.tensors.get(name)
        if info is None:
            raise WeightsError(f"no tensor named {name!r} in checkpoint", path=self.root)
        if self.format == "pickle":
            return self._pickled[name].to(device)
        handle = self._handle(info.file, str(device))
        try:
            tensor = handle.get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types
            raise WeightsError(f"cannot read tensor {name!r}: {_short(exc, 160)}", path=info.file) from None
        if tuple(tensor.shape) != info.shape or tensor.dtype != torch_dtype(info.dtype):
            raise WeightsError(f"tensor {name!r} changed since the checkpoint was opened", path=info.file)
        return tensor

    def _handle(self, path: Path, device: str):
        key = (path, device)
        if key in self._handles:
            self._handles.move_to_end(key)
            return self._handles[key]
        from safetensors import safe_open

        try:
            handle = safe_open(str(path), framework="pt", device=device)
        except Exception as exc:
            raise WeightsError(f"cannot open: {_short(exc, 160)}", path=path) from None
        self._handles[key] = handle
        while len(self._handles) > self.MAX_OPEN_HANDLES:
            self._handles.popitem(last=False)
        return handle

    def close(self) -> None:
        self._handles.clear()
        self._pickled.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def prequantized_method(self) -> str | None:
        """'bitsandbytes', another quant_method name from config.json, or None if not quantized."""
        qc = (self.config or {}).get("quantization_config")
        if isinstance(qc, dict) and qc:
            return str(qc.get("quant_method") or "an unknown method")
        if qc:
            return "an unknown method"
        if any(name.endswith(_BNB_SUFFIXES) for name in self.tensors):
            return "bitsandbytes"
        if any(name.endswith((".qweight", ".qzeros")) for name in self.tensors):
            return "GPTQ/AWQ"
        return None

    def is_prequantized(self) -> bool:
        return self.prequantized_method() is not None

    def check_shapes(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Raise WeightsError on the first tensor whose shape differs from `expected` (e.g. from the plan)."""
        for name, shape in expected.items():
            info = self.tensors.get(name)
            if info is None:
                raise WeightsError(f"tensor {name!r} expected by config.json is missing from the checkpoint", path=self.root)
            if tuple(info.shape) != tuple(shape):
                raise WeightsError(
                    f"tensor {name!r} has shape {list(info.shape)} but config.json implies {list(shape)}",
                    path=info.file)
