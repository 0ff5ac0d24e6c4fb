"""HF checkpoint folders: single `model.safetensors`, or shards + `model.safetensors.index.json`.

The index logic (shard names, weight_map validation) also serves `pytorch_model.bin.index.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from ..errors import BadInput
from ..tensor_ref import TensorRef, numel

INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
METADATA = {"format": "pt"}

Reader = Callable[[Path], dict[str, TensorRef]]


def read_indexed(index_path: Path, read_one: Reader) -> dict[str, TensorRef]:
    """Tensors of every shard an index names; the index and the shards must agree exactly."""
    folder = index_path.parent
    weight_map = _weight_map(index_path)
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    refs: dict[str, TensorRef] = {}
    for file, names in by_file.items():
        shard = inside(folder, file, index_path)
        found = read_one(shard)
        for name in names:
            if name not in found:
                raise BadInput(f"{index_path}: tensor {name!r} is not in {file}")
        extra = [n for n in found if weight_map.get(n) != file]
        if extra:
            raise BadInput(f"{shard}: tensor {extra[0]!r} is not listed for this file in {index_path.name}")
        refs.update(found)
    return refs


def _weight_map(index_path: Path) -> dict[str, str]:
    """`{"weight_map": {name: file}}` (HF index) or a bare `{name: file}` (MindSpore param_name_map)."""
    try:
        data = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        raise BadInput(f"{index_path}: not valid JSON") from None
    if isinstance(data, dict) and isinstance(data.get("weight_map"), dict):
        data = data["weight_map"]
    if not isinstance(data, dict) or not data or not all(isinstance(v, str) for v in data.values()):
        raise BadInput(f"{index_path}: not a valid index (needs a 'weight_map' of tensor name → file)")
    return data


def inside(folder: Path, file, index_path: Path) -> Path:
    """A shard path from an index, refused if it leaves the folder (.., absolute, symlink escape)."""
    if not isinstance(file, str) or os.path.isabs(file) or ".." in Path(file).parts:
        raise BadInput(f"{index_path}: shard {file!r} is outside the checkpoint folder")
    path = folder / file
    if not path.is_file():
        raise BadInput(f"{index_path}: shard {file} does not exist")
    if not path.resolve().is_relative_to(folder.resolve()):
        raise BadInput(f"{index_path}: shard {file} links outside the checkpoint folder")
    return path


def read_files(paths: list[Path], read_one: Reader) -> dict[str, TensorRef]:
    """Several complete files read as one checkpoint; a name in two files is an error."""
    refs: dict[str, TensorRef] = {}
    origin: dict[str, Path] = {}
    for path in paths:
        for name, ref in read_one(path).items():
            if name in refs:
                raise BadInput(f"tensor {name!r} is in both {origin[name].name} and {path.name}")
            refs[name], origin[name] = ref, path
    return refs


def split_shards(entries: list, max_bytes: int | None) -> list[list]:
    """Consecutive (name, dtype, shape) entries cut into shards of at most `max_bytes` (one tensor may exceed it)."""
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = numel(entry[2]) * entry[1].itemsize
        if max_bytes and shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def shard_names(count: int, prefix: str = "model", ext: str = "safetensors") -> list[str]:
    """transformers' naming: `model.safetensors` alone, else `model-0000k-of-0000n.safetensors`."""
    if count == 1:
        return [f"{prefix}.{ext}"]
    return [f"{prefix}-{k:05d}-of-{count:05d}.{ext}" for k in range(1, count + 1)]


def index_json(weight_map: dict[str, str], total_size: int) -> bytes:
    return json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2).encode() + b"\n"
