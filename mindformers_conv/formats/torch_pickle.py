"""torch `.bin/.pt/.pth`: read with `weights_only=True` over mmap; write the torch zip format streaming.

The writer builds `data.pkl` from names, dtypes and shapes alone, then streams each tensor's bytes
as a stored (uncompressed, 64-byte aligned) zip record, so no state dict is ever held in memory.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zlib
from pathlib import Path

import torch

from .. import dtypes
from ..errors import BadInput
from ..outfile import OutputFile
from ..tensor_ref import ByteSource, Shape, TensorRef

ALIGN = 64
_STORAGE_CLASS = {
    torch.float64: "DoubleStorage", torch.float32: "FloatStorage", torch.float16: "HalfStorage",
    torch.bfloat16: "BFloat16Storage", torch.int64: "LongStorage", torch.int32: "IntStorage",
    torch.int16: "ShortStorage", torch.int8: "CharStorage", torch.uint8: "ByteStorage", torch.bool: "BoolStorage",
}


def read(path: Path) -> dict[str, TensorRef]:
    """Tensors of a torch pickle, loaded lazily (mmap) and without running code from the file."""
    path = Path(path)
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy non-zip format
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unpickling failed"
        raise BadInput(f"{path}: refused to load a pickle that is not plain weights ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise BadInput(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from None
    state = _unwrap(state, path)
    refs = {}
    for name, tensor in state.items():
        refs[name] = TensorRef(name, dtypes.from_torch(tensor.dtype), tuple(tensor.shape),
                               loader=lambda t=tensor: t)
    return refs


def _unwrap(state, path: Path) -> dict[str, torch.Tensor]:
    """A flat state dict, or one wrapped as {'model': …} / {'state_dict': …} as some tools save it."""
    for key in ("model", "state_dict", "module"):
        if isinstance(state, dict) and len(state) == 1 and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInput(f"{path}: not a flat state dict of tensors")
    return state


class _Storage:
    def __init__(self, key: str, dtype: torch.dtype, count: int):
        self.key, self.dtype, self.count = key, dtype, count


class _Tensor:
    def __init__(self, storage: _Storage, shape: Shape):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.append(acc)
            acc *= d
        args = (self.storage, 0, tuple(self.shape), tuple(reversed(stride)), False, collections.OrderedDict())
        return torch._utils._rebuild_tensor_v2, args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", getattr(torch, _STORAGE_CLASS[obj.dtype]), obj.key, "cpu", obj.count)
        return None


def _data_pkl(entries: list[tuple[str, dtypes.DType, Shape]], wrap: str | None) -> bytes:
    state = {}
    for key, (name, dtype, shape) in enumerate(entries):
        if dtype.torch not in _STORAGE_CLASS:
            raise BadInput(f"tensor {name!r}: dtype {dtype.code} cannot be written to a torch pickle")
        count = 1
        for d in shape:
            count *= d
        state[name] = _Tensor(_Storage(str(key), dtype.torch, count), shape)
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump({wrap: state} if wrap else state)
    return buf.getvalue()


class PickleWriter:
    """torch.save-compatible zip (all records zip64, stored, data 64-byte aligned), written streaming."""

    def __init__(self, out: OutputFile, entries: list[tuple[str, dtypes.DType, Shape]], wrap: str | None = None):
        self.out = out
        self.prefix = out.final.stem or "archive"
        self.central: list[bytes] = []
        self._names = [name for name, _, _ in entries]
        self._next = 0
        self._record("data.pkl", memoryview(_data_pkl(entries, wrap)))
        self._record(".format_version", memoryview(b"1"))
        self._record(".storage_alignment", memoryview(str(ALIGN).encode()))
        self._record("byteorder", memoryview(b"little"))

    def add(self, name: str, dtype: dtypes.DType, shape: Shape, data: ByteSource) -> None:
        if name != self._names[self._next]:
            raise AssertionError(f"pickle writer expected {self._names[self._next]}, got {name}")
        self._record(f"data/{self._next}", data)
        self._next += 1

    def close(self) -> None:
        self._record("version", memoryview(b"3\n"))
        self._record(".data/serialization_id", memoryview(b"0" * 40))
        self._end_of_central_directory()

    def _record(self, name: str, data) -> None:
        fname = f"{self.prefix}/{name}".encode()
        size = data.nbytes
        offset = self.out.position
        zip64 = struct.pack("<HHQQ", 1, 16, size, size)
        pad = -(offset + 30 + len(fname) + len(zip64) + 4) % ALIGN
        extra = zip64 + struct.pack("<HH", 0x4246, pad) + b"\0" * pad
        self.out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 0, 0, 0x21, 0, 0xFFFFFFFF, 0xFFFFFFFF,
                                   len(fname), len(extra)) + fname + extra)
        crc = _write_with_crc(self.out, data)
        os.pwrite(self.out.fd, struct.pack("<I", crc), offset + 14)
        cextra = struct.pack("<HHQQQ", 1, 24, size, size, offset)
        self.central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0, 0, 0x21, crc, 0xFFFFFFFF,
                                        0xFFFFFFFF, len(fname), len(cextra), 0, 0, 0, 0, 0xFFFFFFFF)
                            + fname + cextra)

    def _end_of_central_directory(self) -> None:
        start = self.out.position
        for entry in self.central:
            self.out.write(entry)
        size, count, end = self.out.position - start, len(self.central), self.out.position
        self.out.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, size, start))
        self.out.write(struct.pack("<IIQI", 0x07064B50, 0, end, 1))
        self.out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))


def _write_with_crc(out: OutputFile, data) -> int:
    """Write a record's bytes in bounded pieces, returning their CRC-32 (zip needs it)."""
    if isinstance(data, memoryview):
        out.write(data)
        return zlib.crc32(data)
    crc = 0
    for piece in data.pieces():
        crc = zlib.crc32(piece, crc)
        out.write(piece)
    return crc
