"""The one table of tensor dtypes: torch name, safetensors code, bytes per element, safetensors' order, and
what qtool may do with them. Every module that needs one of these facts reads it here. Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass

from qtool.core.errors import WeightsError


@dataclass(frozen=True)
class DType:
    name: str  # torch's name: getattr(torch, name)
    code: str  # safetensors' dtype string in a header
    itemsize: int  # bytes per element
    rank: int | None  # position in safetensors' Dtype enum: a file's data is laid out by it (descending), then name
    is_float: bool = False
    quantizable: bool = False  # an input bitsandbytes' 4-bit quantizer takes


TABLE: tuple[DType, ...] = (
    DType("bool", "BOOL", 1, 0),
    DType("uint8", "U8", 1, 4),
    DType("int8", "I8", 1, 5),
    DType("float8_e5m2", "F8_E5M2", 1, 6, is_float=True),
    DType("float8_e4m3fn", "F8_E4M3", 1, 7, is_float=True),
    DType("float8_e8m0fnu", "F8_E8M0", 1, 8, is_float=True),
    DType("float8_e4m3fnuz", "F8_E4M3FNUZ", 1, None, is_float=True),
    DType("float8_e5m2fnuz", "F8_E5M2FNUZ", 1, None, is_float=True),
    DType("int16", "I16", 2, 9),
    DType("uint16", "U16", 2, 10),
    DType("float16", "F16", 2, 11, is_float=True, quantizable=True),
    DType("bfloat16", "BF16", 2, 12, is_float=True, quantizable=True),
    DType("int32", "I32", 4, 13),
    DType("uint32", "U32", 4, 14),
    DType("float32", "F32", 4, 15, is_float=True, quantizable=True),
    DType("complex64", "C64", 8, 16),
    DType("float64", "F64", 8, 17, is_float=True),
    DType("int64", "I64", 8, 18),
    DType("uint64", "U64", 8, 19),
)
BY_CODE = {d.code: d for d in TABLE}
BY_NAME = {d.name: d for d in TABLE}
# The dtypes a 16-bit/32-bit model is loaded and kept in (config.json's dtype, --dtype, compute dtypes).
MODEL_DTYPES = ("float16", "bfloat16", "float32")


def itemsize(name: str) -> int:
    """Bytes per element of a torch dtype name ('bfloat16' -> 2)."""
    return BY_NAME[name].itemsize


def code(name: str) -> str:
    """The safetensors code of a torch dtype name ('bfloat16' -> 'BF16')."""
    return BY_NAME[name].code


def is_float_dtype(code: str) -> bool:
    """True for floating-point safetensors dtypes ('F16', 'BF16', 'F32', 'F64', 'F8_*')."""
    d = BY_CODE.get(code)
    return d is not None and d.is_float


def is_quantizable_dtype(code: str) -> bool:
    """True for the safetensors dtypes the 4-bit quantizer accepts as input: F16, BF16, F32."""
    d = BY_CODE.get(code)
    return d is not None and d.quantizable


def name_of(tdtype) -> str:
    """'bfloat16' for torch.bfloat16."""
    return str(tdtype).removeprefix("torch.")


def torch_dtype(code: str):
    """The torch dtype for a safetensors dtype string."""
    import torch

    d = BY_CODE.get(code)
    result = getattr(torch, d.name, None) if d is not None else None
    if result is None:
        raise WeightsError(f"dtype {code!r} is not supported by this torch")
    return result


def code_of(tdtype) -> str:
    """The safetensors dtype string of a torch dtype."""
    d = BY_NAME.get(name_of(tdtype))
    if d is None:
        raise WeightsError(f"unsupported tensor dtype {tdtype}")
    return d.code


def layout_key(code: str, name: str) -> tuple[int, str]:
    """safetensors' order of tensors in a file: wider dtypes first (by its Dtype enum), then by name."""
    return (-(BY_CODE[code].rank or 0), name)
