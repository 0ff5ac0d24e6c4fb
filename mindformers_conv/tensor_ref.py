"""Lazy handles to tensors on disk, and the byte sources writers consume."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable


from . import dtypes
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

    def view(self, start: int, length: int, scratch: memoryview) -> memoryview:
        """Bytes [start, start+length) as one memoryview, read into `scratch` unless already in memory."""
        pos = 0
        for piece in self.window(start, length).pieces():
            scratch[pos:pos + len(piece)] = piece
            pos += len(piece)
        return scratch[:length]


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

    def view(self, start: int, length: int, scratch: memoryview) -> memoryview:
        return self.data[start:start + length]


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

    def view(self, start: int, length: int, scratch: memoryview) -> memoryview:
        pos = 0
        for path, offset, size in sub_ranges(self.ranges, start, length):
            with open(path, "rb", buffering=0) as f:
                got = os.preadv(f.fileno(), [scratch[pos:pos + size]], offset)
            if got != size:
                from .errors import BadInput
                raise BadInput(f"{path}: unexpected end of file at byte {offset + got}")
            pos += size
        return scratch[:length]


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


CAST_CHUNK = 1 << 20  # elements per step of a streaming cast: its buffers stay small and in cache


def cast_source(source: ByteSource, from_dtype: DType, dtype: DType) -> ByteSource:
    """`source`'s elements as `dtype`: the source itself when nothing changes, else a streaming cast."""
    if from_dtype == dtype or not (from_dtype.is_float and dtype.is_float):
        return source
    return CastBytes(source, from_dtype, dtype)


@dataclass
class CastBytes(ByteSource):
    """Another source's elements cast (NaN payloads kept) a chunk at a time, through buffers every cast of
    the process reuses: no tensor-sized allocation. A piece it yields is valid until the next one."""

    source: ByteSource
    from_dtype: DType
    dtype: DType

    @property
    def nbytes(self) -> int:
        return self.source.nbytes // self.from_dtype.itemsize * self.dtype.itemsize

    def write_to(self, out, start: int = 0, length: int | None = None) -> None:
        for chunk in self._cast(start, self.nbytes - start if length is None else length):
            out.write(chunk)

    def pieces(self):
        return self._cast(0, self.nbytes)

    def window(self, start: int, length: int) -> "CastBytes":
        first, count = self._elements(start, length)
        size = self.from_dtype.itemsize
        return CastBytes(self.source.window(first * size, count * size), self.from_dtype, self.dtype)

    def _elements(self, start: int, length: int) -> tuple[int, int]:
        size = self.dtype.itemsize
        if start % size or length % size:
            raise ValueError(f"byte window [{start}, +{length}) splits a {self.dtype.code} element")
        return start // size, length // size

    def _cast(self, start: int, length: int):
        first, count = self._elements(start, length)
        size = self.from_dtype.itemsize
        step = max(1, min(CAST_CHUNK, count))
        inp, out = _reused("in", self.from_dtype, step), _reused("out", self.dtype, step)
        scratch = memoryview(inp.view(torch.uint8).numpy()).cast("B")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # chunks are too small to share: a busy second core makes every op wait for it
        try:
            for at in range(first, first + count, step):
                n = min(step, first + count - at)
                raw = self.source.view(at * size, n * size, scratch)
                if raw.readonly:  # torch.frombuffer wants a writable buffer
                    scratch[:len(raw)] = raw
                    raw = scratch[:len(raw)]
                dtypes.cast_into(torch.frombuffer(raw, dtype=torch.uint8).view(self.from_dtype.torch), out[:n])
                yield memoryview(out[:n].view(torch.uint8).numpy()).cast("B")
        finally:
            torch.set_num_threads(threads)


_REUSED: dict[tuple[str, str], torch.Tensor] = {}


def _reused(role: str, dtype: DType, count: int) -> torch.Tensor:
    """The process's one buffer per role and dtype, of at least `count` elements (casts run one at a time)."""
    key = (role, dtype.code)
    if key not in _REUSED or _REUSED[key].numel() < count:
        _REUSED[key] = torch.empty(count, dtype=dtype.torch)
    return _REUSED[key]


def from_chunks(name: str, dtype: DType, shape: Shape, chunks: list[tuple[Shape, TensorRef]], where) -> TensorRef:
    """One tensor from its (offsets, chunk) pieces: the chunk itself, rows stacked as byte ranges, else a
    loader filling one buffer (peak: the tensor plus one chunk). `where` names the checkpoint in errors."""
    chunks.sort(key=lambda c: c[0])
    if sum(numel(r.shape) for _, r in chunks) != numel(shape):
        from .errors import BadInput
        raise BadInput(f"{where}: the chunks of {name!r} do not cover its shape {list(shape)}")
    if len(chunks) == 1:
        return chunks[0][1].renamed(name)
    rows = all(o[1:] == (0,) * (len(shape) - 1) and r.shape[1:] == shape[1:] for o, r in chunks)
    if rows and all(r.ranges for _, r in chunks) and [o[0] for o, _ in chunks] == \
            [sum(r.shape[0] for _, r in chunks[:i]) for i in range(len(chunks))]:
        return TensorRef(name, dtype, shape, tuple(x for _, r in chunks for x in r.ranges))

    def load():
        full = torch.empty(shape, dtype=dtype.torch)
        for offsets, ref in chunks:
            view = full
            for d, (o, n) in enumerate(zip(offsets, ref.shape)):
                view = view.narrow(d, o, n)
            view.copy_(ref.read())
        return full

    return TensorRef(name, dtype, shape, loader=load)
