"""Lazy handles to tensors on disk, and the byte sources writers consume."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable


from .dtypes import DType
from .lazy import torch

Shape = tuple[int, ...]
# (path, offset, length) pieces whose concatenation is a tensor's raw C-order bytes.
Ranges = tuple[tuple[str, int, int], ...]


def numel(shape: Shape) -> int:
    return math.prod(shape)


def raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 tensor (bit-exact comparisons, NaN payloads included)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


@dataclass(frozen=True)
class TensorRef:
    """One source tensor: metadata now, bytes on demand (file ranges, or a torch loader for pickles)."""

    name: str
    dtype: DType
    shape: Shape
    ranges: Ranges = ()
    loader: Callable[[], torch.Tensor] | None = field(default=None, compare=False)

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * self.dtype.itemsize

    def renamed(self, name: str) -> "TensorRef":
        return TensorRef(name, self.dtype, self.shape, self.ranges, self.loader)

    def read(self) -> torch.Tensor:
        """Materialise this tensor (and only this one) as a contiguous CPU tensor."""
        if self.loader is not None:
            return self.loader().contiguous()
        buf = bytearray(self.nbytes)
        view = memoryview(buf)
        pos = 0
        for path, offset, length in self.ranges:
            with open(path, "rb", buffering=0) as f:
                f.seek(offset)
                got = f.readinto(view[pos:pos + length])
            if got != length:
                from .errors import BadInput
                raise BadInput(f"{path}: tensor {self.name!r} is truncated ({got} of {length} bytes)")
            pos += length
        if not buf:
            return torch.empty(self.shape, dtype=self.dtype.torch)
        return torch.frombuffer(buf, dtype=torch.uint8).view(self.dtype.torch).reshape(self.shape)

    def source(self) -> "ByteSource":
        """Bytes as writers take them: file ranges when on disk (zero-copy), else in memory."""
        if self.ranges:
            return FileRanges(self.ranges)
        return MemoryBytes.of(self.read())


class ByteSource:
    """Raw bytes a writer copies into its output, in pieces [start, start+length)."""

    nbytes: int
    PIECE = 64 << 20

    def write_to(self, out, start: int = 0, length: int | None = None) -> None:
        raise NotImplementedError

    def pieces(self):
        """The bytes as memoryviews of at most PIECE bytes each (for writers that must see them)."""
        raise NotImplementedError

    def window(self, start: int, length: int) -> "ByteSource":
        """Bytes [start, start+length) of this source, without reading them."""
        raise NotImplementedError


def concat_sources(parts: list[ByteSource]) -> ByteSource:
    """Several byte sources one after another (file ranges stay file ranges)."""
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, FileRanges) for p in parts):
        return FileRanges(tuple(r for p in parts for r in p.ranges))
    return Chain(parts)


def sub_ranges(ranges: Ranges, start: int, length: int) -> Ranges:
    """The file ranges holding bytes [start, start+length) of the concatenation of `ranges`."""
    out = []
    for path, offset, size in ranges:
        if length <= 0:
            break
        if start >= size:
            start -= size
            continue
        take = min(size - start, length)
        out.append((path, offset + start, take))
        length -= take
        start = 0
    return tuple(out)


@dataclass
class MemoryBytes(ByteSource):
    data: memoryview

    @staticmethod
    def of(tensor: torch.Tensor) -> "MemoryBytes":
        flat = tensor.contiguous().reshape(-1)
        if flat.numel() == 0:
            return MemoryBytes(memoryview(b""))
        return MemoryBytes(memoryview(flat.view(torch.uint8).numpy()).cast("B"))

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def write_to(self, out, start: int = 0, length: int | None = None) -> None:
        end = self.nbytes if length is None else start + length
        out.write(self.data[start:end])

    def pieces(self):
        for start in range(0, self.nbytes, self.PIECE):
            yield self.data[start:start + self.PIECE]

    def window(self, start: int, length: int) -> "MemoryBytes":
        return MemoryBytes(self.data[start:start + length])


@dataclass
class FileRanges(ByteSource):
    ranges: Ranges

    @property
    def nbytes(self) -> int:
        return sum(r[2] for r in self.ranges)

    def write_to(self, out, start: int = 0, length: int | None = None) -> None:
        for path, offset, size in sub_ranges(self.ranges, start, self.nbytes - start if length is None else length):
            out.copy_from(path, offset, size)

    def window(self, start: int, length: int) -> "FileRanges":
        return FileRanges(sub_ranges(self.ranges, start, length))

    def pieces(self):
        for path, offset, size in self.ranges:
            with open(path, "rb", buffering=0) as f:
                for start in range(0, size, self.PIECE):
                    yield memoryview(os.pread(f.fileno(), min(self.PIECE, size - start), offset + start))


@dataclass
class Chain(ByteSource):
    """Byte sources one after another."""

    parts: list[ByteSource]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def write_to(self, out, start: int = 0, length: int | None = None) -> None:
        remaining = self.nbytes - start if length is None else length
        for part in self.parts:
            if start >= part.nbytes:
                start -= part.nbytes
                continue
            take = min(part.nbytes - start, remaining)
            part.write_to(out, start, take)
            remaining -= take
            start = 0
            if remaining == 0:
                break

    def pieces(self):
        for part in self.parts:
            yield from part.pieces()

    def window(self, start: int, length: int) -> ByteSource:
        parts, pos = [], 0
        for part in self.parts:
            lo, hi = max(start, pos), min(start + length, pos + part.nbytes)
            if lo < hi:
                parts.append(part.window(lo - pos, hi - lo))
            pos += part.nbytes
        return concat_sources(parts) if parts else MemoryBytes(memoryview(b""))
