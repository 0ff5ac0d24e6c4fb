"""torch.distributed.checkpoint (DCP) folders as MindSpeed-MM's FSDP2 backend saves them (spec §1.2):
`<root>/latest_checkpointed_iteration.txt` (`release`), `<root>/release/.metadata`, `…/__0_0.distcp`.

The saved object is `{'model': state_dict, 'checkpoint_version': 3.0}` with full tensors; DCP flattens
it, so the metadata keys are `model.<name>` and `checkpoint_version`. torch's FileSystemWriter format:
each item is a `torch.save` archive of its own, back to back in the `.distcp` file, and `.metadata`
pickles a `Metadata` whose `storage_data` maps every item (`MetadataIndex`) to its byte range
(`_StorageInfo`: file, offset, length).

Reading runs nothing from the files: `.metadata` is unpickled with an allow-list of exactly torch's DCP
dataclasses (plus torch.Size, dtypes and the layout helper); each tensor archive is indexed like any
torch zip (allow-listed `data.pkl`), so tensors are byte ranges of the `.distcp` files. Writing streams
one tensor at a time into the data file and builds the `Metadata` from the DCP classes themselves.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .. import dtypes
from ..errors import BadInput
from ..outfile import OutputFile
from ..tensor_ref import ByteSource, Shape, TensorRef, from_chunks, numel, sub_ranges
from . import megatron, torch_pickle
from ..lazy import torch

METADATA = ".metadata"
DATA_FILE = "__0_0.distcp"  # storage prefix `__{rank}_`, file 0
MODEL = "model."  # the flattened `model` dict's keys
VERSION_KEY = "checkpoint_version"
DCP_VERSION = "1.0.0"  # torch's CURRENT_DCP_VERSION for this layout
ALIGN = torch_pickle.ALIGN  # archives start on this boundary, so tensor data is aligned in the file too

_DCP_MD = "torch.distributed.checkpoint.metadata"
_DCP_CLASSES = ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")


def _allowed(module: str, name: str):
    """The globals a DCP `.metadata` pickle names; None for anything else."""
    if module == _DCP_MD and name in _DCP_CLASSES:
        import torch.distributed.checkpoint.metadata as md
        return getattr(md, name)
    if (module, name) == ("torch.distributed.checkpoint.filesystem", "_StorageInfo"):
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        return _StorageInfo
    if (module, name) == ("torch", "Size"):
        return torch.Size
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if (module, name) == ("torch.serialization", "_get_layout"):
        return _layout
    if module in ("pathlib", "pathlib._local") and name in ("PosixPath", "WindowsPath", "PurePosixPath", "Path"):
        return lambda *parts: os.path.join(*map(str, parts)) if parts else ""  # checkpoint_id, kept as text
    if (module, name) == ("collections", "OrderedDict"):
        import collections
        return collections.OrderedDict
    return None


def _layout(name: str):
    if name != "torch.strided":
        raise BadInput(f"DCP metadata names layout {name!r}; only dense (torch.strided) tensors are read")
    return torch.strided


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: Path):
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str):
        found = _allowed(module, name)
        if found is None:
            raise BadInput(f"{self.path}: refused: the metadata pickle calls {module}.{name}, which is not a "
                           "torch DCP metadata class (nothing in it was run)")
        return found

    def persistent_load(self, pid):
        raise BadInput(f"{self.path}: refused: unexpected persistent id in the metadata pickle")


def read_metadata(folder: Path):
    """The `Metadata` of a DCP folder, unpickled through the allow-list."""
    path = folder / METADATA
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror})") from None
    try:
        md = _MetadataUnpickler(data, path).load()
    except BadInput:
        raise
    except Exception as e:  # a damaged pickle: truncated, wrong opcodes, bad dataclass state
        reason = (str(e).splitlines() or [""])[0] or type(e).__name__
        raise BadInput(f"{path}: corrupt DCP metadata ({reason})") from None
    from torch.distributed.checkpoint.metadata import Metadata
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict) \
            or not isinstance(md.storage_data, dict):
        raise BadInput(f"{path}: not a DCP metadata file (no Metadata with storage data)")
    return md


@dataclass
class DcpDir:
    root: Path
    folder: Path  # where .metadata and the .distcp files are
    iteration: int | None


def data_folder(path: str | Path) -> DcpDir | None:
    """The DCP folder a path names (a root with the tracker file, or the folder itself), else None."""
    root = Path(path)
    if not root.is_dir():
        return None
    if (root / METADATA).is_file():
        match = root.name.removeprefix("iter_")
        return DcpDir(root, root, int(match) if match.isdigit() else None)
    if (root / megatron.TRACKER).is_file():
        try:
            folder, iteration = megatron.find_iteration_dir(root)
        except BadInput:
            return None
        if (folder / METADATA).is_file():
            return DcpDir(root, folder, iteration)
    return None


def is_dcp(path: str | Path) -> bool:
    return data_folder(path) is not None


class _Window(io.RawIOBase):
    """Bytes [start, start+length) of a file as a seekable file of their own (one archive of a .distcp)."""

    def __init__(self, f, start: int, length: int):
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buf) -> int:
        n = max(0, min(len(buf), self.length - self.pos))
        data = os.pread(self.f.fileno(), n, self.start + self.pos) if n else b""
        buf[:len(data)] = data
        self.pos += len(data)
        return len(data)


def _archive_tensor(path: Path, start: int, length: int, name: str) -> TensorRef:
    """The tensor one `torch.save` archive at [start, start+length) of `path` holds, as byte ranges."""
    with open(path, "rb") as f:
        window = _Window(f, start, length)
        try:
            with zipfile.ZipFile(window) as zf:
                pkl = next((n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
                if pkl is None:
                    raise BadInput(f"{path}: {name!r} at byte {start} is not a torch.save archive (no data.pkl)")
                stored = torch_pickle._IndexUnpickler(zf.read(pkl), path).load()
                if not isinstance(stored, torch_pickle._StoredTensor):
                    raise BadInput(f"{path}: {name!r} at byte {start} holds a {type(stored).__name__}, not a tensor")
                record = f"{pkl[:-len('data.pkl')]}data/{stored.key}"
                offset, size = torch_pickle._record_span(zf, window, record, path)
        except (BadInput, torch_pickle._NotPlainWeights) as e:
            raise BadInput(str(e) if isinstance(e, BadInput) else f"{path}: {name!r}: not plain weights ({e})") from None
        except Exception as e:  # zipfile on damaged bytes, bad pickle opcodes
            raise BadInput(f"{path}: {name!r} at byte {start}: corrupt archive "
                           f"({(str(e).splitlines() or [''])[0] or type(e).__name__})") from None
    if offset + size > length:
        raise BadInput(f"{path}: {name!r}: its data reaches past the item's byte range")
    return torch_pickle._ref(path, name, stored, (start + offset, size))


def read_dcp(path: str | Path) -> tuple[DcpDir, dict[str, TensorRef], list[Path]]:
    """The `model.*` tensors of a DCP folder (names without `model.`), as byte ranges; other entries
    (checkpoint_version, optimizer state) are left out. A tensor saved in several chunks is put back
    together (rows stacked as byte ranges, other tilings in memory when read)."""
    found = data_folder(path)
    if found is None:
        raise BadInput(f"{path}: not a DCP checkpoint (no .metadata)")
    md = read_metadata(found.folder)
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    by_fqn: dict[str, list] = {}
    for index, info in md.storage_data.items():
        by_fqn.setdefault(getattr(index, "fqn", None), []).append((index, info))
    refs, files = {}, set()
    for fqn, entry in md.state_dict_metadata.items():
        if not isinstance(fqn, str) or not fqn.startswith(MODEL):
            continue
        name = fqn[len(MODEL):]
        if not isinstance(entry, TensorStorageMetadata):
            raise BadInput(f"{found.folder / METADATA}: {fqn!r} is not a tensor")
        dtype = dtypes.from_torch(entry.properties.dtype)
        shape = tuple(int(d) for d in entry.size)
        chunks = []
        for chunk in entry.chunks:
            offsets = tuple(int(o) for o in chunk.offsets)
            info = next((i for x, i in by_fqn.get(fqn, ()) if tuple(x.offset or ()) == offsets), None)
            if info is None:
                raise BadInput(f"{found.folder / METADATA}: {fqn!r} chunk at {list(offsets)} has no storage entry")
            if getattr(info, "transform_descriptors", None):
                raise BadInput(f"{found.folder}: {fqn!r} is stored with transforms {list(info.transform_descriptors)}"
                               " (compressed DCP); only plain torch.save items are read")
            file = _inside(found.folder, info.relative_path)
            files.add(file)
            ref = _archive_tensor(file, int(info.offset), int(info.length), fqn)
            if ref.dtype != dtype or ref.shape != tuple(int(s) for s in chunk.sizes):
                raise BadInput(f"{file}: {fqn!r} chunk holds {ref.dtype.code} {list(ref.shape)}, the metadata says "
                               f"{dtype.code} {list(chunk.sizes)}")
            chunks.append((offsets, ref))
        refs[name] = from_chunks(name, dtype, shape, chunks, found.folder)
    if not refs:
        raise BadInput(f"{found.folder}: the DCP checkpoint has no 'model.*' tensors")
    return found, refs, sorted(files)


def _inside(folder: Path, relative: str) -> Path:
    path = (folder / str(relative)).resolve()
    if path.parent != folder.resolve():
        raise BadInput(f"{folder / METADATA}: storage file {relative!r} is outside the checkpoint folder")
    return path


def rows_prefix(ref: TensorRef, rows: int) -> TensorRef:
    """The first `rows` rows of a tensor (vocab padding stripped), as byte ranges when it has them."""
    shape = (rows, *ref.shape[1:])
    if ref.ranges:
        return TensorRef(ref.name, ref.dtype, shape, sub_ranges(ref.ranges, 0, numel(shape) * ref.dtype.itemsize))
    return TensorRef(ref.name, ref.dtype, shape, loader=lambda: ref.read()[:rows])


class DcpWriter:
    """Writes one DCP folder streaming: each `add` appends one tensor's torch.save archive to the data
    file; `close` pickles the Metadata (built from torch's DCP classes) beside it."""

    def __init__(self, out: OutputFile, checkpoint_id: str):
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex
        self.out, self.checkpoint_id = out, checkpoint_id
        self.state: dict = {}
        self.storage: dict = {}
        self.planner: dict = {}
        start = self._archive([], lambda _: megatron.CHECKPOINT_VERSION)  # BYTE_IO items come first
        self._item(MetadataIndex(VERSION_KEY), start, BytesStorageMetadata(), (VERSION_KEY,))

    def add(self, name: str, dtype: dtypes.DType, shape: Shape, data: ByteSource) -> None:
        from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex, TensorProperties,
                                                           TensorStorageMetadata)
        entries = [(name, dtype, shape)]
        start = self._archive(entries, lambda tensors: tensors[0], data)
        zeros = torch.Size([0] * len(shape))
        meta = TensorStorageMetadata(TensorProperties(dtype=dtype.torch), torch.Size(shape),
                                     [ChunkStorageMetadata(offsets=zeros, sizes=torch.Size(shape))])
        self._item(MetadataIndex(MODEL + name, zeros, 0), start, meta, ("model", name))

    def _archive(self, entries, container, data: ByteSource | None = None) -> int:
        pad = -self.out.position % ALIGN
        if pad:
            self.out.write(b"\0" * pad)
        start = self.out.position
        writer = torch_pickle.PickleWriter(self.out, entries, container=container)
        if data is not None:
            writer.add(*entries[0], data)
        writer.close()
        return start

    def _item(self, index, start: int, meta, path: tuple) -> None:
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        self.storage[index] = _StorageInfo(DATA_FILE, start, self.out.position - start)
        self.state[index.fqn] = meta
        self.planner[index.fqn] = path

    def metadata_bytes(self) -> bytes:
        import uuid

        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
        version = self.state.pop(VERSION_KEY)
        self.state[VERSION_KEY] = version  # torch lists it after the model's entries
        md = Metadata(self.state, planner_data=self.planner, storage_data=self.storage,
                      storage_meta=StorageMeta(checkpoint_id=self.checkpoint_id, save_id=str(uuid.uuid4())),
                      version=DCP_VERSION)
        return pickle.dumps(md)
