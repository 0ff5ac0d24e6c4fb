"""The safetensors container (shared by HF and MindSpore flavours): validated header reader, streaming writer."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from .. import dtypes
from ..errors import BadInput
from ..outfile import OutputFile
from ..tensor_ref import ByteSource, Shape, TensorRef, numel

MAX_HEADER = 100 << 20  # the safetensors library's own limit


def read_header(path: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Tensors (in file order) and `__metadata__` of one safetensors file; validates every offset."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BadInput(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise BadInput(f"{path}: safetensors header length {n} is past the end of the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # also a number past int_max_str_digits, nesting past the limit
        raise BadInput(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise BadInput(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise BadInput(f"{path}: safetensors __metadata__ is not an object")
    base = 8 + n
    refs, spans = {}, []
    for name, info in header.items():
        ref = _tensor_entry(path, name, info, base, size)
        refs[name] = ref
        spans.append((ref.ranges[0][1] if ref.ranges else base, ref.nbytes, name))
    spans.sort()
    end = base
    for start, length, name in spans:
        if length and start < end:
            raise BadInput(f"{path}: tensor {name!r} overlaps the previous tensor's bytes")
        end = max(end, start + length)
    return refs, {str(k): str(v) for k, v in metadata.items()}


def _tensor_entry(path: Path, name: str, info, base: int, size: int) -> TensorRef:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise BadInput(f"{path}: tensor {name!r} has a malformed header entry")
    shape, offsets = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise BadInput(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise BadInput(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    dtype = dtypes.BY_CODE.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise BadInput(f"{path}: tensor {name!r} has an invalid dtype {info['dtype']!r}")
    start, stop = base + offsets[0], base + offsets[1]
    if stop > size:
        raise BadInput(f"{path}: tensor {name!r} ends at byte {stop}, past the end of the file ({size} bytes)")
    if stop - start != numel(tuple(shape)) * dtype.itemsize:
        raise BadInput(f"{path}: tensor {name!r} has {stop - start} bytes but {info['dtype']}{shape} needs "
                       f"{numel(tuple(shape)) * dtype.itemsize}")
    ranges = ((str(path), start, stop - start),) if stop > start else ()
    return TensorRef(name, dtype, tuple(shape), ranges)


class SafetensorsWriter:
    """Writes the header (computed up front from names, dtypes, shapes), then each tensor in order."""

    def __init__(self, out: OutputFile, entries: list[tuple[str, dtypes.DType, Shape]], metadata: dict[str, str]):
        self.out = out
        header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        self._order = []
        for name, dtype, shape in entries:
            nbytes = numel(shape) * dtype.itemsize
            header[name] = {"dtype": dtype.code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            self._order.append((name, nbytes))
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        out.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def add(self, name: str, dtype: dtypes.DType, shape: Shape, data: ByteSource) -> None:
        expected, nbytes = self._order[self._next]
        if name != expected or data.nbytes != nbytes:
            raise AssertionError(f"safetensors writer expected {expected} ({nbytes} B), got {name} ({data.nbytes} B)")
        data.write_to(self.out)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise AssertionError("safetensors writer closed before every tensor was written")
