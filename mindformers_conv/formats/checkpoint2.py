"""MindFormers 2.x "checkpoint 2.0" folders (spec mindformers_other.md §3.4):

    ROOT/latest_checkpointed_iteration.txt            the iteration, an integer; written last
    ROOT/iteration_{iter:08d}/model-{rank:07d}-{world:07d}.safetensors   MindSpore safetensors, one per rank
    ROOT/iteration_{iter:08d}/common.json             training counters
    ROOT/iteration_{iter:08d}/metadata.json           each parameter's chunks and the file that holds each

A converted full model is written the way a pipeline-parallel save lays out whole parameters: `world` is
the number of files `--max_shard_size` gives, file k is rank k, and each parameter is one chunk (slice 0
of a 1 × … × 1 fragmentation) stored by the rank of its file.

MindFormers numbers a chunk by its slice (`global_offset` = `(k,)`, row-major over `axis_fragmentations`,
each slice `global_shape / axis_fragmentations`); per-axis element offsets are read too. Reading puts a
parameter's chunks back together (row slices as byte ranges, other tilings in memory when read); without
metadata.json every tensor of the model files is a whole parameter, as MindFormers assumes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .. import dtypes
from ..errors import BadInput, UsageError
from ..tensor_ref import Shape, TensorRef, from_chunks
from . import hf_safetensors, ms_safetensors, safetensors_file
from .megatron import TRACKER, tracker_text
from .outputs import Entry, FileSpec, Layout

METADATA = "metadata.json"
COMMON = "common.json"
_ITERATION = re.compile(r"iteration_(\d{8})")
_MODEL_FILE = re.compile(r"(?:.+-)?model-\d{7}-\d{7}\.safetensors")  # `{user_prefix-}model-…`
_OPTIMIZER_FILE = re.compile(r"(?:.+-)?opt-\d{7}-\d{7}\.safetensors")


def iteration_dir(iteration: int) -> str:
    return f"iteration_{iteration:08d}"


def model_file(rank: int, world: int) -> str:
    return f"model-{rank:07d}-{world:07d}.safetensors"


@dataclass
class Found:
    root: Path  # the folder with the tracker file (config.json and tokenizer files go there)
    folder: Path  # iteration_XXXXXXXX
    iteration: int


def is_checkpoint2(path: str | Path) -> bool:
    """A root with the tracker file and `iteration_*` folders, or an `iteration_*` folder itself."""
    path = Path(path)
    if not path.is_dir():
        return False
    if _ITERATION.fullmatch(path.name):
        return True
    return (path / TRACKER).is_file() and any(_ITERATION.fullmatch(p.name) for p in path.iterdir() if p.is_dir())


def find(path: str | Path) -> Found:
    """The iteration folder a path names: the tracker's, or the folder itself."""
    path = Path(path)
    match = _ITERATION.fullmatch(path.name)
    if match:
        return Found(path.parent, path, int(match.group(1)))
    tracker = path / TRACKER
    text = tracker.read_text(errors="replace").strip()
    if not (text.isascii() and text.isdigit()):
        raise BadInput(f"{tracker}: expected an iteration number, got {text[:40]!r}")
    folder = path / iteration_dir(int(text))
    if not folder.is_dir():
        raise BadInput(f"{tracker} names iteration {int(text)}, but {folder.name} does not exist")
    return Found(path, folder, int(text))


def read(path: str | Path) -> tuple[Found, dict[str, TensorRef], list[Path]]:
    """The model parameters of a checkpoint 2.0 folder (optimizer files left out), as byte ranges."""
    found = find(path)
    if (found.folder / METADATA).is_file():
        refs, files = _read_with_metadata(found.folder)
    else:
        files = sorted(p for p in found.folder.glob("*.safetensors")
                       if not p.name.startswith(".") and not _OPTIMIZER_FILE.fullmatch(p.name))
        if not files:
            raise BadInput(f"{found.folder}: no model-*.safetensors files and no {METADATA}")
        refs = hf_safetensors.read_files(files, _header)
    if not refs:
        raise BadInput(f"{found.folder}: the checkpoint holds no model parameters")
    return found, refs, files


def _header(path: Path) -> dict[str, TensorRef]:
    return safetensors_file.read_header(path)[0]


_MS_DTYPES = {name.lower(): d for name, d in dtypes.BY_MS.items()}


def _read_with_metadata(folder: Path) -> tuple[dict[str, TensorRef], list[Path]]:
    path = folder / METADATA
    try:
        data = json.loads(path.read_text())
        params, storage = data["state_dict_metadata"], data["storage_data"]
        if not isinstance(params, dict) or not isinstance(storage, dict):
            raise TypeError("not objects")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError) as e:
        raise BadInput(f"{path}: not a checkpoint 2.0 metadata file ({type(e).__name__}: {e})") from None
    headers: dict[Path, dict[str, TensorRef]] = {}
    refs = {}
    for name, meta in params.items():
        try:
            ref = _parameter(folder, name, meta, storage, headers)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BadInput(f"{path}: parameter {name!r} has malformed metadata ({type(e).__name__}: {e})") from None
        if ref is not None:
            refs[name] = ref
    return refs, sorted(headers)


def _parameter(folder: Path, name: str, meta: dict, storage: dict, headers: dict) -> TensorRef | None:
    """One parameter from its chunks; None when it is optimizer state (stored in `opt-*` files)."""
    where = f"{folder / METADATA}: {name!r}"
    dtype = _MS_DTYPES.get(str(meta["properties"]["dtype"]).lower())
    if dtype is None:
        raise BadInput(f"{where} has an unsupported dtype {meta['properties']['dtype']!r}")
    shape = tuple(int(d) for d in meta["global_shape"])
    grid = tuple(int(f) for f in meta.get("axis_fragmentations") or [1] * len(shape))
    if len(grid) != len(shape) or any(f < 1 or s % f for s, f in zip(shape, grid)):
        raise BadInput(f"{where}: axis_fragmentations {list(grid)} do not divide its shape {list(shape)}")
    local = tuple(s // f for s, f in zip(shape, grid))
    chunks, slices = [], set()
    for chunk in meta["chunk"]:
        offset = tuple(int(o) for o in chunk["global_offset"])
        if tuple(int(d) for d in chunk["local_shape"]) != local:
            raise BadInput(f"{where}: chunk at {list(offset)} has shape {chunk['local_shape']}, expected {list(local)}")
        index = _slice_index(offset, grid, local, where)
        if index in slices:
            continue  # the same slice listed twice (replicas)
        slices.add(index)
        entries = storage.get(str((name, offset)))
        if not entries:
            raise BadInput(f"{where}: chunk at {list(offset)} has no storage_data entry")
        file_name = entries[0]["file_name"]
        if _OPTIMIZER_FILE.fullmatch(file_name):
            return None
        ref = _stored(folder, file_name, name, headers)
        if ref.dtype != dtype or ref.shape != local:
            raise BadInput(f"{folder / file_name}: {name!r} holds {ref.dtype.code} {list(ref.shape)}, "
                           f"{METADATA} says {dtype.code} {list(local)}")
        chunks.append((_element_offset(index, grid, local), ref))
    if len(slices) != math.prod(grid):
        raise BadInput(f"{where}: {len(slices)} of its {math.prod(grid)} chunks are listed")
    return from_chunks(name, dtype, shape, chunks, folder)


def _slice_index(offset: tuple[int, ...], grid: Shape, local: Shape, where: str) -> int:
    """The chunk's slice number: MindFormers' `(k,)`, or per-axis element offsets on the slice grid."""
    if len(offset) == 1 and (len(grid) != 1 or offset[0] < grid[0]):
        index = offset[0]
    elif len(offset) == len(grid) and all(n and o % n == 0 for o, n in zip(offset, local)):
        index = 0
        for o, n, f in zip(offset, local, grid):
            index = index * f + o // n
    else:
        index = -1
    if not 0 <= index < math.prod(grid):
        raise BadInput(f"{where}: chunk offset {list(offset)} is not a slice of axis_fragmentations {list(grid)}")
    return index


def _element_offset(index: int, grid: Shape, local: Shape) -> tuple[int, ...]:
    offset = []
    for f, n in zip(reversed(grid), reversed(local)):
        index, position = divmod(index, f)
        offset.append(position * n)
    return tuple(reversed(offset))


def _stored(folder: Path, file_name, name: str, headers: dict) -> TensorRef:
    """Tensor `name` of a file storage_data names (inside the iteration folder)."""
    path = hf_safetensors.inside(folder, file_name, folder / METADATA)
    if path not in headers:
        headers[path] = _header(path)
    if name not in headers[path]:
        raise BadInput(f"{path}: tensor {name!r} is not in the file {METADATA} names for it")
    return headers[path][name]


def plan_layout(output_path: str, reverse: bool, entries: list[Entry], max_shard_bytes: int,
                flags: dict) -> Layout:
    """`--target checkpoint2`: the model files (split by `max_shard_bytes`), then metadata.json,
    common.json and, last, the tracker file. `flags`: the layout flags (only `iteration` applies)."""
    if reverse:
        raise UsageError("--target checkpoint2 writes a MindSpore checkpoint; leave out --reversed")
    given = [k for k, v in flags.items() if k != "iteration" and (v not in (None, 1) or v is True)]
    if given:
        raise UsageError(f"--target checkpoint2 writes full, unsharded parameters: --{given[0]} does not apply")
    root = Path(output_path)
    iteration = flags.get("iteration") or 0
    folder = root / iteration_dir(iteration)
    shards = hf_safetensors.split_shards(entries, max_shard_bytes)
    names = [model_file(rank, len(shards)) for rank in range(len(shards))]
    _refuse_other_layouts(folder, names)
    files = [FileSpec(folder / n, "safetensors", s, ms_safetensors.METADATA) for n, s in zip(names, shards)]
    extras = {folder / METADATA: metadata_json(names, shards),
              folder / COMMON: common_json(iteration),
              root / TRACKER: tracker_text(iteration)}  # last: the folder is a checkpoint only when complete
    return Layout(files, extras, root)


def _refuse_other_layouts(folder: Path, ours: list[str]) -> None:
    """Model files of an earlier run with another file count would be read as part of this one: stop."""
    if folder.is_dir():
        stale = sorted(p.name for p in folder.iterdir() if _MODEL_FILE.fullmatch(p.name) and p.name not in ours)
        if stale:
            raise UsageError(f"{folder} holds {stale[0]} of another checkpoint; write to an empty folder")


def metadata_json(names: list[str], shards: list[list[Entry]]) -> bytes:
    """Compact metadata.json: each parameter one whole chunk, stored by the rank of its file."""
    params, storage = {}, {}
    for rank, (file_name, shard) in enumerate(zip(names, shards)):
        for name, dtype, shape in shard:
            params[name] = {
                "properties": {"dtype": dtype.ms or dtype.code, "replica_id": 0, "allow_shape_mismatch": False,
                               "allow_to_save": True},
                "global_shape": list(shape),
                "axis_fragmentations": [1] * len(shape),
                # MindSpore's Layout.to_dict() of one device (rank `rank`), every axis unsplit
                "layout": {"device_matrix": [1], "tensor_map": [-1] * len(shape), "interleaved_parallel": False,
                           "alias_name": ["dp"], "rank_list": [rank]},
                "chunk": [{"global_offset": [0], "local_shape": list(shape)}],
            }
            storage[str((name, (0,)))] = [{"file_name": file_name, "storage_rank": rank, "rank_group": [rank]}]
    return json.dumps({"state_dict_metadata": params, "storage_data": storage}, separators=(",", ":")).encode()


def common_json(iteration: int) -> bytes:
    """MindFormers' CommonInfo of a checkpoint that has not been trained here: the counters at `iteration`,
    no loss scaling; what a conversion cannot know (batch size, samples seen, health status) is null."""
    info = {"epoch_num": 0, "step_num": iteration, "global_step": iteration, "loss_scale": 1.0,
            "global_batch_size": None, "consumed_samples": None, "ckpt_status": None}
    return json.dumps(info, indent=2).encode() + b"\n"
