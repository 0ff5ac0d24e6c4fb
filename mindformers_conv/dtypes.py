"""The one dtype table: safetensors codes are our canonical names; torch and MindSpore names map to them.

Casts go through torch (bf16 included); nothing here touches numpy's bf16.
"""

from __future__ import annotations

from dataclasses import dataclass


from .errors import BadInput, UsageError
from .lazy import torch


@dataclass(frozen=True)
class DType:
    code: str  # safetensors code, e.g. "BF16"
    torch_name: str  # torch.<name>, resolved only when torch is needed
    ms: str | None  # MindSpore TensorProto.tensor_type, e.g. "BFloat16"
    itemsize: int
    is_float: bool = False

    @property
    def torch(self) -> torch.dtype:
        return getattr(torch, self.torch_name)


_TABLE = [
    DType("F64", "float64", "Float64", 8, True),
    DType("F32", "float32", "Float32", 4, True),
    DType("F16", "float16", "Float16", 2, True),
    DType("BF16", "bfloat16", "BFloat16", 2, True),
    DType("I64", "int64", "Int64", 8),
    DType("I32", "int32", "Int32", 4),
    DType("I16", "int16", "Int16", 2),
    DType("I8", "int8", "Int8", 1),
    DType("U8", "uint8", "UInt8", 1),
    DType("U16", "uint16", "UInt16", 2),
    DType("U32", "uint32", "UInt32", 4),
    DType("U64", "uint64", "UInt64", 8),
    DType("BOOL", "bool", "Bool", 1),
    DType("F8_E4M3", "float8_e4m3fn", None, 1, True),
    DType("F8_E5M2", "float8_e5m2", None, 1, True),
]
BY_CODE = {d.code: d for d in _TABLE}
BY_TORCH_NAME = {d.torch_name: d for d in _TABLE}
BY_MS = {d.ms: d for d in _TABLE if d.ms}

# The names MindFormers' --dtype accepts, plus the spellings its Python callers pass
# (mindspore.bfloat16 prints as "BFloat16", torch.bfloat16 as "torch.bfloat16").
_ALIASES = {
    "fp32": "F32", "float32": "F32", "float": "F32",
    "fp16": "F16", "float16": "F16", "half": "F16",
    "bf16": "BF16", "bfloat16": "BF16",
}


def from_code(code: str) -> DType:
    try:
        return BY_CODE[code]
    except KeyError:
        raise BadInput(f"unsupported tensor dtype {code!r}") from None


def from_ms(tensor_type: str) -> DType:
    try:
        return BY_MS[tensor_type]
    except KeyError:
        raise BadInput(f"unsupported MindSpore tensor_type {tensor_type!r}") from None


def from_torch(dtype: torch.dtype) -> DType:
    try:
        return BY_TORCH_NAME[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise BadInput(f"unsupported torch dtype {dtype}") from None


def parse_user_dtype(value: object) -> DType | None:
    """--dtype / dtype= argument (fp32|fp16|bf16, a torch or MindSpore dtype) → DType; None stays None."""
    if value is None:
        return None
    text = str(value).lower().removeprefix("torch.").removeprefix("mindspore.")
    code = _ALIASES.get(text)
    if code is None:
        raise UsageError(f"unknown dtype {value!r}; use fp32, fp16 or bf16")
    return BY_CODE[code]


def cast(tensor: torch.Tensor, target: DType | None) -> torch.Tensor:
    """Cast floating tensors to `target` (None = keep); integer and bool tensors are never cast."""
    if target is None or tensor.dtype == target.torch or not tensor.dtype.is_floating_point:
        return tensor
    return tensor.to(target.torch)
