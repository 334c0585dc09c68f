"""Bytes per storage format, exactly as bitsandbytes allocates them and a saved checkpoint holds them.

Pure Python (no torch), so `qtool estimate` stays instant. Every quantized weight expands into the
tensors bitsandbytes writes for it (see `quantized_parts`); every kept tensor is stored as is. The same
part list gives the checkpoint bytes (sum of nbytes + safetensors header) and the GPU bytes (each
tensor rounded up to the CUDA caching allocator's 512-byte block; the JSON blob never goes to the GPU).

Format keys (used in `--json` as `weights_bytes.<key>`):
  fp32     every tensor 4 bytes
  fp16     every tensor 2 bytes (bf16 is the same size)
  int8     LLM.int8 (load_in_8bit): int8 weight + fp32 row scales (SCB) + a 1-byte weight_format
  fp4      4-bit FP4, fp32 absmax per block            (load_in_4bit, bnb_4bit_quant_type="fp4")
  fp4_dq   FP4 with double quantization
  nf4      4-bit NormalFloat, fp32 absmax per block
  nf4_dq   NF4 with double quantization (the QLoRA recipe)
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from qtool.core.dtypes import BY_NAME, itemsize

# bitsandbytes constants (bitsandbytes/functional.py, 0.50):
CODE_4BIT_ENTRIES = 16  # get_4bit_type(): the 16-value fp32 code ("quant_map")
NESTED_BLOCKSIZE = 256  # quantize_4bit(compress_statistics=True) quantizes absmax in blocks of 256
NESTED_CODE_ENTRIES = 256  # create_dynamic_map(): the 256-value fp32 code ("nested_quant_map")
CUDA_BLOCK = 512  # torch's caching allocator rounds every allocation up to 512 bytes
# json.dumps of `offset.item()` (a float32 mean of the absmax values, printed as a float64 repr):
# typically 17 significant digits, e.g. 0.05252265930175781 -> 19 characters; 0.00x values -> 21.
OFFSET_CHARS = 19



@dataclass(frozen=True)
class Format:
    key: str
    label: str
    bits: int  # nominal bits of a quantized weight (32/16 for the unquantized formats)
    quant_type: str | None = None  # "nf4" | "fp4" for 4-bit, "int8" for LLM.int8, None for plain
    double_quant: bool = False


FORMATS: dict[str, Format] = {
    f.key: f
    for f in (
        Format("fp32", "FP32", 32),
        Format("fp16", "FP16/BF16", 16),
        Format("int8", "INT8", 8, "int8"),
        Format("fp4", "FP4", 4, "fp4"),
        Format("fp4_dq", "FP4+DQ", 4, "fp4", True),
        Format("nf4", "NF4", 4, "nf4"),
        Format("nf4_dq", "NF4+DQ", 4, "nf4", True),
    )
}
TABLE_FORMATS = ("fp32", "fp16", "int8", "fp4", "nf4", "nf4_dq")  # the rows estimate prints first


def format_key(quant_type: str, double_quant: bool) -> str:
    """The format BitsAndBytesConfig(load_in_4bit=True, quant_type, double_quant) produces."""
    return f"{quant_type}_dq" if double_quant else quant_type


@dataclass(frozen=True)
class Part:
    """One tensor written to the checkpoint (suffix appended to the parameter name)."""

    suffix: str
    dtype: str  # torch dtype name
    shape: tuple[int, ...]
    on_gpu: bool = True  # the quant_state JSON blob exists only in the state dict

    @property
    def nbytes(self) -> int:
        n = itemsize(self.dtype)
        for d in self.shape:
            n *= d
        return n


def quant_state_blob(
    shape: Sequence[int], quant_type: str, *, blocksize: int = 64, dtype: str = "bfloat16",
    double_quant: bool = False, offset: float | None = None,
) -> str:
    """The JSON that QuantState.as_dict(packed=True) stores as `weight.quant_state.bitsandbytes__<type>`.

    Same keys, order and json.dumps spacing as bitsandbytes; `offset` (the double-quant mean) is
    data-dependent, so without it a number of typical length (OFFSET_CHARS) stands in.
    """
    d: dict = {"quant_type": quant_type, "blocksize": blocksize, "dtype": dtype, "shape": list(shape)}
    if double_quant:
        d.update({"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32", "nested_offset": 0})
    text = json.dumps(d)
    if double_quant:
        digits = json.dumps(offset) if offset is not None else "0" * OFFSET_CHARS
        text = text[: -len("0}")] + digits + "}"
    return text


def quantized_parts(
    shape: Sequence[int], fmt: Format, *, blocksize: int = 64, dtype: str = "bfloat16",
    quant_storage: str = "uint8", offset: float | None = None,
) -> list[Part]:
    """The tensors bitsandbytes keeps for one quantized Linear weight of `shape` (out, in)."""
    n = math.prod(shape)
    if fmt.quant_type == "int8":
        # Int8Params: CB (int8, same shape) + SCB (fp32, one scale per output row); the state dict
        # adds a 0-d uint8 `weight_format` (Linear8bitLt._save_to_state_dict). SCB/weight_format
        # are saved beside the weight, not under it: suffixes relative to the module prefix.
        return [Part(".weight", "int8", tuple(shape)), Part(".SCB", "float32", (shape[0],)),
                Part(".weight_format", "uint8", (), on_gpu=False)]
    if fmt.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"{fmt.key} is not a quantized format")
    item = itemsize(quant_storage)
    blocks = -(-n // blocksize)
    # _ops.quantize_4bit: out = empty(((n + 1) // (itemsize * 2), 1), dtype=quant_storage)
    parts = [Part(".weight", quant_storage, ((n + 1) // (item * 2), 1))]
    if fmt.double_quant:
        nested_blocks = -(-blocks // NESTED_BLOCKSIZE)
        parts += [
            Part(".weight.absmax", "uint8", (blocks,)),  # absmax quantized to 8 bits
            Part(".weight.nested_absmax", "float32", (nested_blocks,)),  # fp32 absmax of the absmax
            Part(".weight.nested_quant_map", "float32", (NESTED_CODE_ENTRIES,)),
            Part(".weight.quant_map", "float32", (CODE_4BIT_ENTRIES,)),
            Part(".weight.nested_offset", "float32", (), on_gpu=True),  # QuantState.offset, GPU only
        ]
    else:
        parts += [
            Part(".weight.absmax", "float32", (blocks,)),
            Part(".weight.quant_map", "float32", (CODE_4BIT_ENTRIES,)),
        ]
    blob = quant_state_blob(shape, fmt.quant_type, blocksize=blocksize, dtype=dtype,
                            double_quant=fmt.double_quant, offset=offset)
    parts.append(Part(f".weight.quant_state.bitsandbytes__{fmt.quant_type}", "uint8",
                      (len(blob.encode()),), on_gpu=False))
    return parts


def saved_parts(parts: Iterable[Part]) -> list[Part]:
    """Parts present in the saved state dict (the double-quant offset lives inside the JSON blob)."""
    return [p for p in parts if not p.suffix.endswith("nested_offset")]


def gpu_bytes(parts: Iterable[Part]) -> int:
    """What torch.cuda.memory_allocated() counts for these tensors."""
    return sum(-(-p.nbytes // CUDA_BLOCK) * CUDA_BLOCK for p in parts if p.on_gpu and p.nbytes)


def checkpoint_bytes(parts: Iterable[Part]) -> int:
    return sum(p.nbytes for p in saved_parts(parts))


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\-]*\Z")  # what json.dumps writes unchanged between its quotes


def _quoted_len(name: str) -> int:
    """Bytes of a JSON string as safetensors (serde_json) writes it: UTF-8, only quotes, backslashes and
    control characters escaped."""
    return len(json.dumps(name, ensure_ascii=False).encode("utf-8"))


def _digits(first: int, step: int, count: int) -> int:
    """len(str(first + k * step)) summed over k < count, one run of equal length at a time."""
    if step == 0:
        return count * len(str(first))
    total = k = 0
    while k < count:
        d = len(str(first + k * step))
        upto = min(count, -(-(10 ** d - first) // step))  # first k whose value has more digits
        total += (upto - k) * d
        k = upto
    return total


def safetensors_header_bytes(entries: Iterable[tuple]) -> int:
    """Size of a safetensors header (8-byte length + JSON, space-padded to 8) for (name, dtype, shape) or
    (name, dtype, shape, count) entries (count equal entries in a row, as a plan's groups give them).

    safetensors lays tensors out sorted by dtype (widest first) then name and writes each one's byte
    range, so with exact names this is exact. A group is summed at once (its offsets are an arithmetic
    series): this runs over every tensor of a 70B model for 7 formats.
    """
    dt = BY_NAME
    order = sorted(entries, key=lambda e: (-(dt[e[1]].rank or 0), e[0]))
    size = len('{"__metadata__":{"format":"pt"}}')
    fixed = 1 + len(':{"dtype":"","shape":[],"data_offsets":[,]}')
    offset = 0
    for name, dtype, shape, *rest in order:
        count = rest[0] if rest else 1
        d = dt[dtype]
        nbytes = math.prod(shape) * d.itemsize
        # ,"name":{"dtype":"F32","shape":[a,b],"data_offsets":[s,e]}
        quoted = len(name) + 2 if _PLAIN_NAME.match(name) else _quoted_len(name)
        size += count * (fixed + quoted + len(d.code) + len(",".join(map(str, shape))))
        size += _digits(offset, nbytes, count) + _digits(offset + nbytes, nbytes, count)
        offset += count * nbytes
    return 8 + -(-size // 8) * 8


@dataclass(frozen=True)
class WeightBytes:
    """A model's weights in one format."""

    format: str
    checkpoint: int  # bytes of the saved safetensors file(s): tensor data + header
    gpu: int  # bytes torch.cuda.memory_allocated() holds after loading (512-byte rounding)
    data: int  # tensor data only (checkpoint - header)
    quantized: int  # data bytes of the quantized weights and their quant state
    kept: int  # data bytes of tensors stored as they are (embeddings, norms, lm_head, biases)
    header: int

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("checkpoint", "gpu", "data", "quantized", "kept", "header")}


def _plan_tensors(plan) -> Iterable[tuple[str, tuple[int, ...], bool, bool, int]]:
    """(name, shape, quantize?, keep_fp32, count): the full tensor list when known, else the groups."""
    from qtool.core.plan import QUANTIZE

    if plan.tensors is not None:
        for t in plan.tensors:
            yield t.name, t.shape, t.action == QUANTIZE, t.keep_fp32, 1
    else:
        for g in plan.groups:
            yield g.example, g.shape, g.action == QUANTIZE, g.keep_fp32, g.count


def weights_for_format(
    plan, key: str, *, blocksize: int = 64, dtype: str = "bfloat16", quant_storage: str = "uint8",
) -> WeightBytes:
    """Bytes of `plan`'s weights stored as format `key`.

    `dtype` is the dtype of kept tensors (and the `dtype` written in each 4-bit quant state);
    tensors in `_keep_in_fp32_modules` stay fp32 whatever the format.
    """
    fmt = FORMATS[key]
    plain = fmt.quant_type is None
    plain_dtype = "float32" if fmt.bits == 32 else "bfloat16"
    quantized = kept = gpu = 0
    entries: list[tuple[str, str, tuple[int, ...], int]] = []
    for name, shape, quantize, keep_fp32, count in _plan_tensors(plan):
        if quantize and not plain:
            prefix = name[: -len(".weight")] if name.endswith(".weight") else name
            parts = quantized_parts(shape, fmt, blocksize=blocksize, dtype=dtype, quant_storage=quant_storage)
            quantized += count * checkpoint_bytes(parts)
            gpu += count * gpu_bytes(parts)
            entries += [(prefix + p.suffix, p.dtype, p.shape, count) for p in saved_parts(parts)]
        else:
            t_dtype = "float32" if keep_fp32 else (plain_dtype if plain else dtype)
            part = Part("", t_dtype, tuple(shape))
            kept += count * part.nbytes
            gpu += count * gpu_bytes([part])
            entries.append((name, t_dtype, tuple(shape), count))
    data = quantized + kept
    header = safetensors_header_bytes(entries)
    return WeightBytes(key, data + header, gpu, data, quantized, kept, header)
