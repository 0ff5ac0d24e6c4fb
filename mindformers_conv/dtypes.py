"""The one dtype table: safetensors codes are our canonical names; torch and MindSpore names map to them.

Casts go through torch (bf16 included); nothing here touches numpy's bf16.
"""

from __future__ import annotations

import functools
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
    """Cast floating tensors to `target` (None = keep); integer and bool tensors are never cast.

    NaNs keep their sign and payload (torch's casts write one canonical NaN), so bf16 → fp32 → bf16 is the
    identity on every bit pattern.
    """
    if target is None or tensor.dtype == target.torch or not tensor.dtype.is_floating_point:
        return tensor
    out = tensor.to(target.torch)
    _keep_nans(tensor, out)
    return out


def shift_widens(source: DType, target: DType) -> bool:
    """bf16 → fp32 is a 16-bit shift of the bits (NaN payloads included, as `cast` keeps them)."""
    return source.code == "BF16" and target.code == "F32"


def cast_into(tensor: torch.Tensor, out: torch.Tensor) -> None:
    """`cast` into a preallocated `out` of the same shape (the streaming casts reuse their buffers)."""
    out.copy_(tensor)
    _keep_nans(tensor, out)


def _keep_nans(tensor: torch.Tensor, out: torch.Tensor) -> None:
    """Write the NaNs of `tensor` into its cast `out` with their signs and payloads (see `cast`)."""
    source, target = from_torch(tensor.dtype), from_torch(out.dtype)
    if source.code in _FLOAT_BITS and target.code in _FLOAT_BITS and not _torch_keeps_nans(source, target) \
            and _has_nan(tensor):
        nan = torch.isnan(tensor)
        out.view(_int_view(target))[nan] = _nan_bits(tensor[nan], source, target)


def _has_nan(tensor: torch.Tensor) -> bool:
    """max() propagates NaN: one reduction, several times faster than isnan().any() on 16-bit floats."""
    return tensor.numel() > 0 and bool(tensor.max().isnan())


@functools.cache
def _torch_keeps_nans(source: DType, target: DType) -> bool:
    """Whether torch's own cast already writes what `_nan_bits` would, tried once on every 16-bit pattern
    (bf16 → fp32 is a shift in torch, so the default llama forward skips the NaN pass)."""
    if source.itemsize != 2:
        return False
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(source.torch)
    nan = torch.isnan(every)
    return bool(every.to(target.torch).view(_int_view(target))[nan].equal(_nan_bits(every[nan], source, target)))


# IEEE layouts: (total bits, mantissa bits) of the floats whose NaNs `cast` carries over.
_FLOAT_BITS = {"F64": (64, 52), "F32": (32, 23), "BF16": (16, 7), "F16": (16, 10)}


def _int_view(d: DType) -> torch.dtype:
    return {8: torch.int64, 4: torch.int32, 2: torch.int16}[d.itemsize]


def _nan_bits(values: torch.Tensor, source: DType, target: DType) -> torch.Tensor:
    """Target-format NaNs with the sources' signs and the top (or, widening, all) of their payloads."""
    (src_total, src_mant), (dst_total, dst_mant) = _FLOAT_BITS[source.code], _FLOAT_BITS[target.code]
    bits = values.view(_int_view(source)).to(torch.int64)
    sign = (bits >> (src_total - 1)) & 1
    payload = bits & ((1 << src_mant) - 1)
    payload = payload >> (src_mant - dst_mant) if src_mant > dst_mant else payload << (dst_mant - src_mant)
    payload = torch.where(payload == 0, 1 << (dst_mant - 1), payload)  # a NaN, not an infinity
    exponent = ((1 << (dst_total - 1 - dst_mant)) - 1) << dst_mant
    return ((sign << (dst_total - 1)) | exponent | payload).to(_int_view(target))
