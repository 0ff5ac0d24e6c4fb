"""MindSpore `.ckpt`: concatenated protobuf `Checkpoint{repeated Value value=1}` messages.

`Value{string tag=1; TensorProto tensor=2}`, `TensorProto{repeated int64 dims=1; string tensor_type=2;
bytes tensor_content=3}`. The reader indexes content offsets without loading them; the writer emits
each Value's framing then streams its bytes. Tensors over `SLICE_BYTES` are written as several
consecutive same-tag Values of `SLICE_BYTES` each (the last one shorter), as MindSpore 2.10's
`save_checkpoint` writes a Tensor (its `_write_parameter_bytes_data`), so our files are byte-identical to its.
"""

from __future__ import annotations

from pathlib import Path

from .. import dtypes
from ..errors import BadInput
from ..outfile import OutputFile
from ..tensor_ref import ByteSource, Shape, TensorRef

SLICE_BYTES = 512 * 1024 * 1024  # MindSpore serialization.SLICE_SIZE (KiB) × 1024
_CRC_TRAILER = b"crc_num"  # save_checkpoint(crc_check=True) appends 'crc_num' + 10 bytes


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _value_framing(name: str, dtype: dtypes.DType, shape: Shape, content_len: int) -> bytes:
    """Everything of one outer Value entry up to (not including) its tensor_content bytes."""
    dims = b"".join(_varint(1 << 3) + _varint(d) for d in shape)
    tensor_head = dims + _field(2, dtype.ms.encode()) + _varint(3 << 3 | 2) + _varint(content_len)
    tensor_len = len(tensor_head) + content_len
    value_head = _field(1, name.encode()) + _varint(2 << 3 | 2) + _varint(tensor_len) + tensor_head
    value_len = len(value_head) + content_len
    return _varint(1 << 3 | 2) + _varint(value_len) + value_head


def slice_lengths(nbytes: int, slice_bytes: int) -> list[int]:
    """Byte length of each Value for one tensor: chunks of `slice_bytes`, the last one shorter."""
    if nbytes <= slice_bytes:
        return [nbytes]
    return [min(slice_bytes, nbytes - start) for start in range(0, nbytes, slice_bytes)]


class CkptWriter:
    """Streams tensors into a `.ckpt`, one (or, when large, several same-tag) Value at a time."""

    def __init__(self, out: OutputFile, slice_bytes: int = SLICE_BYTES):
        self.out = out
        self.slice_bytes = slice_bytes

    def add(self, name: str, dtype: dtypes.DType, shape: Shape, data: ByteSource) -> None:
        if dtype.ms is None:
            raise BadInput(f"tensor {name!r}: dtype {dtype.code} has no MindSpore checkpoint type")
        start = 0
        for length in slice_lengths(data.nbytes, self.slice_bytes):
            self.out.write(_value_framing(name, dtype, shape, length))
            data.write_to(self.out, start, length)
            start += length

    def close(self) -> None:
        pass


class _Cursor:
    """Reads protobuf framing from a file; content bytes are skipped, never read."""

    def __init__(self, path: Path, f, end: int):
        self.path, self.f, self.end = path, f, end

    def tell(self) -> int:
        return self.f.tell()

    def varint(self) -> int:
        result = shift = 0
        for _ in range(10):
            b = self.f.read(1)
            if not b:
                raise BadInput(f"{self.path}: truncated checkpoint (varint runs past the end at byte {self.tell()})")
            result |= (b[0] & 0x7F) << shift
            if not b[0] & 0x80:
                return result
            shift += 7
        raise BadInput(f"{self.path}: corrupt checkpoint (bad varint at byte {self.tell()})")

    def length(self, limit: int) -> int:
        """A length prefix, checked against `limit`."""
        n = self.varint()
        if self.tell() + n > limit:
            raise BadInput(f"{self.path}: corrupt checkpoint (field length {n} at byte {self.tell()} runs past its end)")
        return n

    def end_of_field(self, limit: int) -> int:
        """Read a length prefix and return where the field it starts ends."""
        n = self.length(limit)
        return self.tell() + n

    def key(self) -> tuple[int, int]:
        k = self.varint()
        return k >> 3, k & 7

    def skip(self, wire: int, limit: int) -> None:
        if wire == 0:
            self.varint()
        elif wire == 2:
            self.f.seek(self.length(limit), 1)
        elif wire in (1, 5):
            self.f.seek(8 if wire == 1 else 4, 1)
        else:
            raise BadInput(f"{self.path}: corrupt checkpoint (wire type {wire} at byte {self.tell()})")


def read_index(path: Path) -> dict[str, TensorRef]:
    """Every tensor of a `.ckpt` with its content byte ranges; split Values are joined."""
    path = Path(path)
    size = path.stat().st_size
    refs: dict[str, TensorRef] = {}
    last = None
    with open(path, "rb") as f:
        cur = _Cursor(path, f, size)
        while cur.tell() < size:
            if size - cur.tell() == len(_CRC_TRAILER) + 10:
                at = cur.tell()
                if f.read(len(_CRC_TRAILER)) == _CRC_TRAILER:
                    break
                f.seek(at)  # a last Value that happens to be as long as the trailer
            field, wire = cur.key()
            if field != 1 or wire != 2:
                raise BadInput(f"{path}: not a MindSpore checkpoint (unexpected field {field} at byte {cur.tell()})")
            end = cur.end_of_field(size)
            name, dtype, shape, content = _read_value(cur, end)
            if name == last:
                prev = refs[name]
                refs[name] = TensorRef(name, prev.dtype, prev.shape, prev.ranges + content)
            elif name in refs:
                raise BadInput(f"{path}: tensor {name!r} appears twice")
            else:
                refs[name] = TensorRef(name, dtype, shape, content)
            last = name
            f.seek(end)
    for ref in refs.values():
        stored = sum(r[2] for r in ref.ranges)
        if stored != ref.nbytes:
            raise BadInput(f"{path}: tensor {ref.name!r} has {stored} bytes but {ref.dtype.ms}{list(ref.shape)} "
                           f"needs {ref.nbytes}")
    return refs


def _read_value(cur: _Cursor, end: int):
    name, tensor = None, None
    while cur.tell() < end:
        field, wire = cur.key()
        if field == 1 and wire == 2:
            name = cur.f.read(cur.length(end)).decode("utf-8", "replace")
        elif field == 2 and wire == 2:
            tend = cur.end_of_field(end)
            tensor = _read_tensor(cur, tend)
            cur.f.seek(tend)
        elif field == 3:
            raise BadInput(f"{cur.path}: map tensors (MapParameter) are not supported")
        else:
            cur.skip(wire, end)
    if name is None or tensor is None:
        raise BadInput(f"{cur.path}: corrupt checkpoint (a Value without tag or tensor before byte {end})")
    return (name, *tensor)


def _read_tensor(cur: _Cursor, end: int):
    dims, type_name, content = [], None, ()
    while cur.tell() < end:
        field, wire = cur.key()
        if field == 1 and wire == 0:
            dims.append(cur.varint())
        elif field == 1 and wire == 2:  # packed dims
            stop = cur.end_of_field(end)
            while cur.tell() < stop:
                dims.append(cur.varint())
        elif field == 2 and wire == 2:
            type_name = cur.f.read(cur.length(end)).decode("utf-8", "replace")
        elif field == 3 and wire == 2:
            n = cur.length(end)
            content = ((str(cur.path), cur.tell(), n),) if n else ()
            cur.f.seek(n, 1)
        else:
            cur.skip(wire, end)
    if type_name is None:
        raise BadInput(f"{cur.path}: corrupt checkpoint (tensor without tensor_type before byte {end})")
    try:
        dtype = dtypes.from_ms(type_name)
    except BadInput:
        raise BadInput(f"{cur.path}: unknown tensor_type {type_name!r} at byte {cur.tell()}") from None
    if dims == [0] and content:  # MindSpore reads dims == [0] with data as a scalar
        dims = []
    return dtype, tuple(dims), content
