"""Lazy handles to tensors on disk, and the byte sources writers consume."""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import mmap
import os
import warnings
from contextlib import contextmanager
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
        buf = memoryview(bytearray(self.nbytes))
        if self.nbytes:
            from .errors import BadInput

            try:
                FileRanges(self.ranges).view(0, self.nbytes, buf)
            except BadInput as e:
                raise BadInput(f"{e}: tensor {self.name!r} is truncated") from None
        return tensor_over(buf, self.dtype, self.shape)

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


# A column block of a row-major matrix on disk: (its file ranges, bytes per row, first byte of the block
# in a row, bytes of the block in a row).
Columns = tuple[Ranges, int, int, int]


def column_ranges(rows: int, blocks: list[Columns]) -> Ranges:
    """Row by row, the column blocks side by side: TP column slices cut from a full matrix, or a full
    matrix put back together from its column-split shards, as file ranges (nothing read)."""
    if any(len(ranges) != 1 for ranges, *_ in blocks):
        return tuple(piece for r in range(rows) for ranges, row_bytes, start, length in blocks
                     for piece in sub_ranges(ranges, r * row_bytes + start, length))
    columns = [[(path, offset + at, length) for at in range(start, start + rows * row_bytes, row_bytes)]
               for ((path, offset, _),), row_bytes, start, length in blocks]  # one file range each: quick
    return tuple(columns[0]) if len(columns) == 1 else tuple(itertools.chain.from_iterable(zip(*columns)))


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

    @functools.cached_property
    def _starts(self) -> list[int]:
        """Where each range starts in the concatenation, and the total at the end."""
        return list(itertools.accumulate((r[2] for r in self.ranges), initial=0))

    @property
    def nbytes(self) -> int:
        return self._starts[-1]

    def write_to(self, out, start: int = 0, length: int | None = None) -> None:
        ranges = self.ranges
        if start or length is not None:
            ranges = self.window(start, self.nbytes - start if length is None else length).ranges
        out.copy_ranges(ranges)

    def window(self, start: int, length: int) -> "FileRanges":
        """Found by bisection: a cast walks a TP column slice (a range per row) a chunk at a time."""
        first = max(0, bisect.bisect_right(self._starts, start) - 1)
        return FileRanges(sub_ranges(self.ranges[first:], start - self._starts[first], length))

    def pieces(self):
        for path, offset, size in self.ranges:
            with open(path, "rb", buffering=0) as f:
                for start in range(0, size, self.PIECE):
                    yield memoryview(os.pread(f.fileno(), min(self.PIECE, size - start), offset + start))

    def view(self, start: int, length: int, scratch: memoryview) -> memoryview:
        """Read into `scratch`: as fast here as a view of a mapping, which would kill the process (SIGBUS)
        where the file shrank meanwhile."""
        ranges = self.window(start, length).ranges
        pos, files = 0, {}
        try:
            for path, offset, size in ranges:  # a column slice: a range per row, of a few files
                if path not in files:
                    files[path] = os.open(path, os.O_RDONLY)
                got = os.preadv(files[path], [scratch[pos:pos + size]], offset)
                if got != size:
                    from .errors import BadInput
                    raise BadInput(f"{path}: unexpected end of file at byte {offset + got}")
                pos += size
        finally:
            for fd in files.values():
                os.close(fd)
        return scratch[:length]


def tensor_over(raw: memoryview, dtype: DType, shape: Shape) -> torch.Tensor:
    """A tensor sharing `raw`'s bytes, read-only ones too (it is only read, never written)."""
    if not raw.nbytes:
        return torch.empty(shape, dtype=dtype.torch)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype.torch).reshape(shape)


def map_pages(fd: int, offset: int, end: int) -> tuple[int, mmap.mmap]:
    """A read-only mapping of a file's bytes [offset, end), from the page boundary below `offset`, its page
    table filled at once (faulting pages in one by one costs as much as copying them); returns (the file
    offset it starts at, the mapping)."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    return start, mmap.mmap(fd, end - start, prot=mmap.PROT_READ, offset=start,
                            flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))


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
        """Casts a chunk while a helper thread writes the one before (the casts and write() release the GIL:
        the two cores share the work); two output buffers take turns. One chunk is written right away."""
        length = self.nbytes - start if length is None else length
        if length <= CAST_CHUNK * self.dtype.itemsize:
            for chunk in self._cast(start, length):
                out.write(chunk)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as writer:
            pending = None
            for chunk in self._cast(start, length, buffers=2):
                if pending is not None:
                    pending.result()
                pending = writer.submit(out.write, chunk)
            if pending is not None:
                pending.result()

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

    def _cast(self, start: int, length: int, buffers: int = 1):
        """The cast bytes a chunk at a time; a chunk stays valid while the next `buffers - 1` are made."""
        first, count = self._elements(start, length)
        size, out_size = self.from_dtype.itemsize, self.dtype.itemsize
        step = max(1, min(CAST_CHUNK, count))
        scratch = _reused("in", step * size)
        outs = [_reused(f"out{b}", step * out_size) for b in range(buffers)]
        with _chunk_cast(self.from_dtype, self.dtype) as cast:
            for k, at in enumerate(range(first, first + count, step)):
                n = min(step, first + count - at)
                out = outs[k % buffers][:n * out_size]
                cast(self.source.view(at * size, n * size, scratch), out)
                yield out


@contextmanager
def _chunk_cast(source: DType, target: DType):
    """A function casting one chunk's bytes into `out`, bit-exact with dtypes.cast (NaN payloads kept): the C
    loops of _floatcast.c where they were built (F32/F16/BF16), else numpy's shift for bf16 → fp32, else
    torch's cast. Only the last imports torch."""
    compiled = _compiled_cast(source, target)
    if compiled is not None:
        yield compiled
        return
    if dtypes.shift_widens(source, target):
        import numpy as np

        yield lambda raw, out: np.left_shift(np.frombuffer(raw, np.uint16), 16, out=np.frombuffer(out, np.uint32),
                                             dtype=np.uint32)
        return

    def cast(raw: memoryview, out: memoryview) -> None:
        count = len(out) // target.itemsize
        dtypes.cast_into(tensor_over(raw, source, (count,)), tensor_over(out, target, (count,)))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # chunks are too small to share: a busy second core makes every op wait for it
    try:
        yield cast
    finally:
        torch.set_num_threads(threads)


def _compiled_cast(source: DType, target: DType) -> Callable[[memoryview, memoryview], None] | None:
    """The compiled cast between two dtypes, or None (no such loop, or the extension was not built)."""
    try:
        from . import _floatcast
    except ImportError:
        return None
    if (source.code, target.code) not in _floatcast.pairs():
        return None
    return lambda raw, out: _floatcast.cast(raw, out, source.code, target.code)


_REUSED: dict[str, bytearray] = {}


def _reused(role: str, nbytes: int) -> memoryview:
    """The process's one buffer per role, of at least `nbytes` (casts run one at a time)."""
    if role not in _REUSED or len(_REUSED[role]) < nbytes:
        _REUSED[role] = bytearray(nbytes)
    return memoryview(_REUSED[role])


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
