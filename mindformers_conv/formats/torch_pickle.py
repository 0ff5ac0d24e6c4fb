"""torch `.bin/.pt/.pth`: read with `weights_only=True` over mmap; write the torch zip format streaming.

The writer builds `data.pkl` from names, dtypes and shapes alone, then streams each tensor's bytes
as a stored (uncompressed, 64-byte aligned) zip record, so no state dict is ever held in memory.
"""

from __future__ import annotations

import collections
import functools
import io
import os
import pickle
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import dtypes
from ..errors import BadInput
from ..outfile import OutputFile, mapped_views
from ..tensor_ref import ByteSource, Shape, TensorRef
from ..lazy import torch

try:  # ISA-L's CRC-32 (carry-less multiply): ≈ 5 × zlib's speed, the same values
    from isal.isal_zlib import crc32
except ImportError:
    from zlib import crc32


ALIGN = 64
_STORAGE_CLASS = {  # torch dtype name → the legacy storage class a torch.save pickle names
    "float64": "DoubleStorage", "float32": "FloatStorage", "float16": "HalfStorage",
    "bfloat16": "BFloat16Storage", "int64": "LongStorage", "int32": "IntStorage",
    "int16": "ShortStorage", "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage",
}
_STORAGE_DTYPE = {name: dtype for dtype, name in _STORAGE_CLASS.items()}


def read(path: Path) -> dict[str, TensorRef]:
    """Tensors of a torch pickle, without running code from the file and without reading tensor data.

    A torch zip is indexed directly: `data.pkl` is unpickled with an allow-list that knows only tensors,
    storages and OrderedDict, and each tensor becomes byte ranges of its stored record (zero-copy).
    Anything else (legacy format, unusual pickles) goes through `torch.load(weights_only=True)`.
    """
    path = Path(path)
    try:
        is_zip = zipfile.is_zipfile(path)
    except zipfile.BadZipFile as e:  # is_zipfile itself raises on some damaged end records
        raise BadInput(f"{path}: corrupt torch zip checkpoint ({e})") from None
    if is_zip:
        try:
            return _unwrap(_index_zip(path), path, TensorRef)
        except _NotPlainWeights:
            pass
    return _torch_load(path)


class _NotPlainWeights(Exception):
    """data.pkl holds something besides tensors in (nested) dicts; let torch's safe loader judge it."""


@dataclass
class _StoredTensor:
    key: str
    dtype: str  # torch's name of it, e.g. "bfloat16"
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles `data.pkl` without running anything from it: every global it names must be on the
    allow-list (tensors, storages, OrderedDict, plus `extra` stand-ins a format module allows)."""

    def __init__(self, data: bytes, path: Path, extra: Allow | None = None):
        super().__init__(io.BytesIO(data))
        self.path = path
        self.extra = extra

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *rest: _StoredTensor(
                storage[0], storage[1], offset, tuple(size), tuple(stride))
        if (module, name) in (("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state")):
            return lambda data, *rest: data
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPE:
            return _StorageClass(_STORAGE_DTYPE[name])
        allowed = self.extra(module, name) if self.extra else None
        if allowed is not None:
            return allowed
        if self.extra is None and module.split(".")[0] in ("torch", "collections", "numpy"):
            raise _NotPlainWeights(f"{module}.{name}")  # maybe benign: torch's weights_only loader decides
        raise BadInput(f"{self.path}: refused: the pickle calls {module}.{name}, which is not plain weights "
                       "(nothing in it was run)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageClass)):
            raise _NotPlainWeights(repr(pid)[:80])
        return pid[2], pid[1].dtype


@dataclass(frozen=True)
class _StorageClass:
    """What `torch.BFloat16Storage` & co. stand for in a pickle: the dtype of a storage (torch not imported)."""

    dtype: str


# (module, name) → a harmless stand-in to build instead of the real global, or None to refuse it.
Allow = Callable[[str, str], object]


def read_tree(path: Path, allow: Allow) -> object:
    """The whole object a torch zip pickles, tensors as TensorRefs (named by their dict key), nothing run.

    For files that hold more than a state dict (Megatron's `model_optim_rng.pt`): `allow` supplies
    stand-ins for the extra globals; anything else is refused with BadInput.
    """
    try:
        return _index_zip(Path(path), allow)
    except _NotPlainWeights as e:
        raise BadInput(f"{path}: not a torch zip checkpoint this reader knows ({e})") from None


def _index_zip(path: Path, allow: Allow | None = None):
    try:
        return _index_zip_unchecked(path, allow)
    except (_NotPlainWeights, BadInput):
        raise
    except Exception as e:  # a damaged zip (BadZipFile, bad record headers) or odd values in data.pkl
        reason = (str(e).splitlines() or [""])[0] or type(e).__name__
        raise BadInput(f"{path}: corrupt torch zip checkpoint ({reason})") from None


def _index_zip_unchecked(path: Path, allow: Allow | None):
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise _NotPlainWeights("no data.pkl")
        prefix = pkl[: -len("data.pkl")]
        try:
            state = _IndexUnpickler(zf.read(pkl), path, allow).load()
        except (_NotPlainWeights, BadInput):
            raise
        except Exception as e:
            raise BadInput(f"{path}: corrupt data.pkl ({e})") from None
        records = {}
        with open(path, "rb") as f:
            for key in {t.key for t in _stored(state)}:
                records[key] = _record_span(zf, f, f"{prefix}data/{key}", path)
    return _with_refs(state, path, records)


def _stored(tree):
    """Every _StoredTensor in nested dicts, lists and tuples."""
    if isinstance(tree, _StoredTensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _stored(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _stored(value)


def _with_refs(tree, path: Path, records: dict, name: str = ""):
    if isinstance(tree, _StoredTensor):
        return _ref(path, name, tree, records[tree.key])
    if isinstance(tree, dict):
        return type(tree)((k, _with_refs(v, path, records, str(k))) for k, v in tree.items())
    if isinstance(tree, (list, tuple)):
        return type(tree)(_with_refs(v, path, records, name) for v in tree)
    return tree


def _record_span(zf: zipfile.ZipFile, f, name: str, path: Path) -> tuple[int, int]:
    """(data offset, length) of a stored zip record, from its local header."""
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise BadInput(f"{path}: storage record {name} is missing") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise _NotPlainWeights("compressed record")
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise BadInput(f"{path}: corrupt zip header for {name}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _ref(path: Path, name: str, t: _StoredTensor, span: tuple[int, int]) -> TensorRef:
    dtype = dtypes.BY_TORCH_NAME[t.dtype]  # every storage class names a dtype of the table
    if not (all(type(v) is int and v >= 0 for v in (t.offset, *t.size, *t.stride)) and len(t.size) == len(t.stride)):
        raise BadInput(f"{path}: tensor {name!r} has an invalid storage offset, size or stride "
                       f"({t.offset!r}, {t.size!r}, {t.stride!r})")
    count = 1
    for d in t.size:
        count *= d
    extent = t.offset + 1 + sum((d - 1) * s for d, s in zip(t.size, t.stride)) if count else 0
    start, length = span
    if extent * dtype.itemsize > length:
        raise BadInput(f"{path}: tensor {name!r} reaches past its storage record")
    contiguous = list(t.stride) == _contiguous_strides(t.size)
    if contiguous or count <= 1:
        nbytes = count * dtype.itemsize
        ranges = ((str(path), start + t.offset * dtype.itemsize, nbytes),) if nbytes else ()
        return TensorRef(name, dtype, t.size, ranges)
    storage = TensorRef(name, dtype, (extent,), ((str(path), start, extent * dtype.itemsize),))
    return TensorRef(name, dtype, t.size,
                     loader=lambda: storage.read().as_strided(t.size, t.stride, t.offset).contiguous())


def _contiguous_strides(size: tuple[int, ...]) -> list[int]:
    strides, acc = [], 1
    for d in reversed(size):
        strides.append(acc)
        acc *= d
    return list(reversed(strides))


def _torch_load(path: Path) -> dict[str, TensorRef]:
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 54": the error line says it all
            warnings.simplefilter("ignore")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)  # legacy non-zip format
    except pickle.UnpicklingError:
        raise BadInput(f"{path}: refused: the pickle holds objects that are not plain weights "
                       "(nothing in it was run)") from None
    except Exception as e:  # whatever a damaged file makes torch.load raise (RuntimeError, EOFError, KeyError, …)
        reason = (str(e).splitlines() or [""])[0] or type(e).__name__
        raise BadInput(f"{path}: not a readable torch checkpoint ({reason})") from None
    state = _unwrap(state, path, torch.Tensor)
    refs = {}
    for name, t in state.items():
        try:
            dtype = dtypes.from_torch(t.dtype)
        except BadInput:
            raise BadInput(f"{path}: tensor {name!r} has unsupported dtype {t.dtype}") from None
        refs[name] = TensorRef(name, dtype, tuple(t.shape), loader=lambda t=t: t)
    return refs


def _unwrap(state, path: Path, leaf: type) -> dict:
    """A flat state dict, or one wrapped as {'model': …} / {'state_dict': …} as some tools save it.

    A training checkpoint holds the wrapped dict beside other entries (epoch, optimizer, args): the
    weights are the wrapped dict, as MindFormers' converters read `checkpoint['model']`.
    """
    for key in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict) and not _all_leaves(state, leaf):
            state = state[key]
    if not isinstance(state, dict) or not _all_leaves(state, leaf):
        raise BadInput(f"{path}: not a flat state dict of tensors")
    return state


def _all_leaves(state: dict, leaf: type) -> bool:
    return all(isinstance(v, leaf) for v in state.values())


class _Global:
    """A global torch's pickles name (a storage class, the tensor rebuilder), written by name: pickling
    the real one would import torch just to look it up."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self):  # pickle wants a reduce function to be callable; this one is never called
        raise TypeError(f"{self.module}.{self.name} stands in for torch's, it is not callable")


@functools.cache
def _global(module: str, name: str) -> _Global:
    """One object per global, so that the pickle memoizes it as it would torch's own."""
    return _Global(module, name)


class _Storage:
    def __init__(self, key: str, dtype: dtypes.DType, count: int):
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
        return _global("torch._utils", "_rebuild_tensor_v2"), args


class _Pickler(pickle._Pickler):
    """Python's own pickler (the C one has no hook for a global written by name); data.pkl is small."""

    def save_named_global(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch = {**pickle._Pickler.dispatch, _Global: save_named_global}

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return "storage", _global("torch", _STORAGE_CLASS[obj.dtype.torch_name]), obj.key, "cpu", obj.count
        return None


def _data_pkl(entries: list[tuple[str, dtypes.DType, Shape]], container: Container) -> bytes:
    tensors = []
    for key, (name, dtype, shape) in enumerate(entries):
        if dtype.torch_name not in _STORAGE_CLASS:
            raise BadInput(f"tensor {name!r}: dtype {dtype.code} cannot be written to a torch pickle")
        count = 1
        for d in shape:
            count *= d
        tensors.append(_Tensor(_Storage(str(key), dtype, count), shape))
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(container(tensors))
    return buf.getvalue()


# Builds the pickled object from the entries' tensor placeholders (in entry order).
Container = Callable[[list], object]


def flat_state_dict(entries: list[tuple[str, dtypes.DType, Shape]], wrap: str | None = None) -> Container:
    """{name: tensor} in entry order, or {wrap: {name: tensor}}."""

    def build(tensors: list) -> object:
        state = {name: t for (name, _, _), t in zip(entries, tensors)}
        return {wrap: state} if wrap else state

    return build


class PickleWriter:
    """torch.save-compatible zip (all records zip64, stored, data 64-byte aligned), written streaming."""

    def __init__(self, out: OutputFile, entries: list[tuple[str, dtypes.DType, Shape]], wrap: str | None = None,
                 container: Container | None = None):
        """`entries` in the order `add` is called; `container` shapes the pickled object (default: a flat
        state dict, wrapped as {wrap: …} when `wrap` is given). The archive starts where `out` is: its
        offsets count from there (archives back to back in one file, as DCP's `.distcp` holds them)."""
        self.out = out
        self.base = out.position
        self.prefix = out.final.stem or "archive"
        from concurrent.futures import ThreadPoolExecutor  # here: its import costs every run's start-up

        self.records: list[tuple[bytes, int, int, object]] = []  # (name, offset, size, CRC-32 or its Future)
        self._crcs = ThreadPoolExecutor(1)
        self._names = [name for name, _, _ in entries]
        self._next = 0
        self._record("data.pkl", memoryview(_data_pkl(entries, container or flat_state_dict(entries, wrap))))
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
        self._crcs.shutdown()
        self._end_of_central_directory()

    def _record(self, name: str, data) -> None:
        """A stored record; a ByteSource's CRC-32 (its local header's, filled in at close) is read back
        from the output on a second thread while the next records are written (the CRC releases the GIL)."""
        fname = f"{self.prefix}/{name}".encode()
        size = data.nbytes
        offset = self.out.position - self.base
        zip64 = struct.pack("<HHQQ", 1, 16, size, size)
        pad = -(offset + 30 + len(fname) + len(zip64) + 4) % ALIGN
        extra = zip64 + struct.pack("<HH", 0x4246, pad) + b"\0" * pad
        self.out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 0, 0, 0x21, 0, 0xFFFFFFFF, 0xFFFFFFFF,
                                   len(fname), len(extra)) + fname + extra)
        if isinstance(data, memoryview):
            self.out.write(data)
            crc = crc32(data)
        else:
            start = self.out.position
            data.write_to(self.out)
            crc = self._crcs.submit(_written_crc, self.out.tmp, start, size) if size else 0
        self.records.append((fname, offset, size, crc))

    def _end_of_central_directory(self) -> None:
        start = self.out.position - self.base
        for fname, offset, size, crc in self.records:
            crc = crc if isinstance(crc, int) else crc.result()
            os.pwrite(self.out.fd, struct.pack("<I", crc), self.base + offset + 14)
            cextra = struct.pack("<HHQQQ", 1, 24, size, size, offset)
            self.out.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0, 0, 0x21, crc, 0xFFFFFFFF,
                                       0xFFFFFFFF, len(fname), len(cextra), 0, 0, 0, 0, 0xFFFFFFFF) + fname + cextra)
        end = self.out.position - self.base
        size, count = end - start, len(self.records)
        self.out.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, size, start))
        self.out.write(struct.pack("<IIQI", 0x07064B50, 0, end, 1))
        self.out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))


def _written_crc(path: Path, offset: int, length: int) -> int:
    """CRC-32 of bytes already written to a file, read through a mapping of its page cache (no copy)."""
    crc = 0
    for (view,), _ in mapped_views(((str(path), offset, length),)):
        crc = crc32(view, crc)
    return crc

