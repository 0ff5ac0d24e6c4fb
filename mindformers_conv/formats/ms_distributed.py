"""A distributed MindFormers 1.x checkpoint (`rank_{r}/{prefix}_rank_{r}-{epoch}_{step}.{ckpt|safetensors}`) read as one model.

Each parameter is put back together from the slices its strategy places on the ranks (see `strategy.py`),
lazily: a parameter cut along axis 0 only (model parallel and/or optimizer sharding) is the concatenation
of its slices' byte ranges, still copied file to file; one cut along other axes is assembled when read,
one tensor at a time. Every slice is taken from the lowest rank that holds it, so replicated copies, pipeline
stages (parameters only on their stage's ranks) and `remove_redundancy` files (each slice saved once) all work.

Names the strategy does not list (training state such as `global_step`) are taken whole from the lowest
rank holding them; optimizer moments (`adam_m.X`, `adam_v.X`, `accu_grads.X`) are sliced as X is.
"""

from __future__ import annotations

import itertools
import math
import re
import shutil
from pathlib import Path

from ..errors import BadInput
from ..lazy import torch
from ..outfile import OutputFile, make_folder, room_for_files
from ..tensor_ref import ByteSource, MemoryBytes, Shape, TensorRef, from_chunks
from . import ms_ckpt, ms_safetensors, safetensors_file
from .safetensors_file import SafetensorsWriter
from .strategy import Layout, Strategy, read_strategy

RANK_DIR = re.compile(r"rank_(\d+)")
_EPOCH_STEP = re.compile(r"-(\d+)_(\d+)$")
_READERS = {".ckpt": ms_ckpt.read_index, ".safetensors": lambda p: safetensors_file.read_header(p)[0]}
STATE_PREFIXES = ("adam_m.", "adam_v.", "accu_grads.", "moments.")


def rank_folders(folder: Path) -> dict[int, Path]:
    """`rank_{r}` subfolders by rank."""
    found = {}
    for child in folder.iterdir():
        match = RANK_DIR.fullmatch(child.name)
        if match and child.is_dir():
            found[int(match[1])] = child
    return found


def find_strategy(folder: Path, given: str | None) -> Path | None:
    """`--strategy`, else a `strategy/` folder inside the checkpoint folder or beside it (MindFormers' default)."""
    if given:
        if not Path(given).exists():
            raise BadInput(f"--strategy {given} does not exist")
        return Path(given)
    for candidate in (folder / "strategy", folder.parent / "strategy"):
        if candidate.is_dir():
            return candidate
    return None


def open_distributed(folder: Path, strategy_path: str | None) -> tuple[dict[str, TensorRef], list[Path]]:
    """The merged tensors of a folder of `rank_*` checkpoints, and the rank files behind them."""
    ranks = rank_folders(folder)
    strategy_at = find_strategy(folder, strategy_path)
    if strategy_at is None:
        if len(ranks) == 1:  # a single-device run: no strategy is written
            file = _checkpoint_files(ranks)[next(iter(ranks))]
            return _READERS[file.suffix](file), [file]
        raise BadInput(f"{folder}: {len(ranks)} rank folders but no strategy/ beside or inside it; "
                       f"pass the strategy file or folder with --strategy")
    strategy = read_strategy(strategy_at)
    _check_ranks(folder, ranks, strategy)
    files = _checkpoint_files(ranks)
    held: dict[str, list[tuple[int, TensorRef]]] = {}
    for rank in sorted(files):
        for name, ref in _READERS[files[rank].suffix](files[rank]).items():
            held.setdefault(name, []).append((rank, ref))
    missing = sorted(set(strategy.layouts) - held.keys())
    if missing:
        raise BadInput(f"{strategy_at}: parameter {missing[0]!r} is in the strategy but in no rank file"
                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    refs = {name: _merged(name, _layout_for(name, strategy), holders) for name, holders in held.items()}
    return refs, [files[r] for r in sorted(files)]


def _strategy_name(name: str, strategy: Strategy) -> str | None:
    """The strategy entry a tensor follows: its own, or (optimizer moments) its parameter's."""
    if name in strategy.layouts:
        return name
    base = next((name[len(p):] for p in STATE_PREFIXES if name.startswith(p)), None)
    return base if base in strategy.layouts else None


def _layout_for(name: str, strategy: Strategy) -> Layout | None:
    key = _strategy_name(name, strategy)
    return strategy.layouts[key] if key else None


def _check_ranks(folder: Path, ranks: dict[int, Path], strategy: Strategy) -> None:
    devices = strategy.devices
    world = max(devices * strategy.stages, max(ranks) + 1)
    absent = [r for r in range(world) if r not in ranks]
    if absent:
        raise BadInput(f"{folder}: rank_{absent[0]} is missing (the strategy places {devices} ranks per stage "
                       f"× {strategy.stages} stage(s); found {len(ranks)} rank folders)")


def _checkpoint_files(ranks: dict[int, Path]) -> dict[int, Path]:
    """One checkpoint per rank: the latest `-{epoch}_{step}` one of rank 0, at the same epoch and step in every rank."""
    candidates = {r: sorted(p for p in folder.iterdir() if p.suffix in _READERS and p.is_file()
                            and not p.name.startswith(".")) for r, folder in ranks.items()}
    first = min(candidates)
    if not candidates[first]:
        raise BadInput(f"{ranks[first]}: no checkpoint (*.ckpt or *.safetensors) in it")
    chosen = max(candidates[first], key=lambda p: (_epoch_step(p) or (-1, -1), p.suffix, p.name))
    key = _epoch_step(chosen)
    files = {}
    for rank, paths in candidates.items():
        same = [p for p in paths if p.suffix == chosen.suffix and (key is None or _epoch_step(p) == key)]
        if len(same) != 1:
            what = f"epoch {key[0]} step {key[1]}" if key else f"a single {chosen.suffix} file"
            raise BadInput(f"{ranks[rank]}: expected one {chosen.suffix} checkpoint for {what} "
                           f"(as {chosen.name} in rank_{first}), found {len(same)}")
        files[rank] = same[0]
    return files


def _epoch_step(path: Path) -> tuple[int, int] | None:
    match = _EPOCH_STEP.search(path.stem)
    return (int(match[1]), int(match[2])) if match else None


def _merged(name: str, layout: Layout | None, holders: list[tuple[int, TensorRef]]) -> TensorRef:
    """One parameter from its slices; `holders`: (rank, slice) in rank order."""
    grid = layout.grid() if layout else ()
    if math.prod(grid) == 1:
        return holders[0][1].renamed(name)
    pieces: dict[tuple[int, ...], tuple[int, TensorRef]] = {}
    for rank, ref in holders:
        if len(ref.shape) != len(grid):
            raise BadInput(f"rank_{rank}: tensor {name!r} has {len(ref.shape)} dimensions but its strategy "
                           f"tensor_map has {len(grid)}")
        pieces.setdefault(layout.slice_of(rank), (rank, ref))
    for index in itertools.product(*map(range, grid)):
        if index not in pieces:
            raise BadInput(f"tensor {name!r}: slice {list(index)} of {list(grid)} is in no rank file "
                           f"(ranks holding it: {[r for r, _ in holders]})")
    extents = [[pieces[tuple(i if a == axis else 0 for a in range(len(grid)))][1].shape[axis] for i in range(n)]
               for axis, n in enumerate(grid)]
    for index, (rank, ref) in pieces.items():
        want = tuple(extents[a][i] for a, i in enumerate(index))
        if ref.shape != want or ref.dtype != holders[0][1].dtype:
            raise BadInput(f"rank_{rank}: slice {list(index)} of tensor {name!r} is {ref.dtype.code}{list(ref.shape)}, "
                           f"expected {holders[0][1].dtype.code}{list(want)} like the others")
    starts = [[sum(e[:i]) for i in range(len(e))] for e in extents]
    chunks = [(tuple(starts[a][i] for a, i in enumerate(index)), ref) for index, (_, ref) in pieces.items()]
    return from_chunks(name, holders[0][1].dtype, tuple(sum(e) for e in extents), chunks, "the rank files")


def write_distributed(refs: dict[str, TensorRef], strategy: Strategy, folder: Path, fmt: str) -> list[Path]:
    """Cut whole tensors into `folder/rank_{r}/checkpoint_{r}.{fmt}` by the strategy, as MindSpore's
    `transform_checkpoints` does: each rank gets its stage's parameters, sliced; names the strategy does not
    list go whole to every rank. Each tensor is read once; axis-0 slices are copied file to file. The
    strategy files are copied to `folder/strategy/`.
    """
    world = strategy.devices * strategy.stages
    holders = {name: _ranks_of(name, strategy, world) for name in refs}
    shapes = {(n, r): _slice_shape(refs[n], _layout_for(n, strategy)) for n in refs for r in holders[n]}
    paths = [folder / f"rank_{r}" / f"checkpoint_{r}.{fmt}" for r in range(world)]
    for path in paths:
        make_folder(path.parent)
    outs: list[OutputFile] = []
    room_for_files(world)
    try:
        writers = []
        for rank, path in enumerate(paths):
            outs.append(OutputFile(path))
            entries = [(n, refs[n].dtype, shapes[n, rank]) for n in refs if rank in holders[n]]
            writers.append(SafetensorsWriter(outs[-1], entries, ms_safetensors.METADATA) if fmt == "safetensors"
                           else ms_ckpt.CkptWriter(outs[-1]))
        for name, ref in refs.items():
            layout = _layout_for(name, strategy)
            cut_inside = layout is not None and any(n > 1 for n in layout.grid()[1:])
            whole = ref.read() if cut_inside else ref.source()  # read once, shared by every rank
            for rank in holders[name]:
                writers[rank].add(name, ref.dtype, shapes[name, rank], _slice_bytes(whole, layout, rank))
        for writer, out in zip(writers, outs):
            writer.close()
            out.commit()
    except BaseException:
        for out in outs:
            out.abort()
        raise
    make_folder(folder / "strategy")  # where merging the folder back looks first
    for file in strategy.files:
        shutil.copyfile(file, folder / "strategy" / file.name)
    return paths


def _ranks_of(name: str, strategy: Strategy, world: int) -> list[int]:
    key = _strategy_name(name, strategy)
    if key is None:
        return list(range(world))
    return [r for r in range(world) if r // strategy.devices in strategy.stages_of[key]]


def _slice_shape(ref: TensorRef, layout: Layout | None) -> Shape:
    grid = layout.grid() if layout else ()
    if len(grid) != len(ref.shape) and grid:
        raise BadInput(f"tensor {ref.name!r} has {len(ref.shape)} dimensions but its strategy tensor_map has {len(grid)}")
    if any(size % n for size, n in zip(ref.shape, grid)):
        raise BadInput(f"tensor {ref.name!r} {list(ref.shape)} does not divide evenly into {list(grid)} slices")
    return tuple(size // n for size, n in zip(ref.shape, grid)) if grid else ref.shape


def _slice_bytes(whole: ByteSource | torch.Tensor, layout: Layout | None, rank: int) -> ByteSource:
    """Rank `rank`'s slice: a window of the bytes when only axis 0 is cut, else cut from the tensor."""
    if isinstance(whole, ByteSource):
        if layout is None or not layout.grid():
            return whole
        piece = whole.nbytes // layout.grid()[0]
        return whole.window(layout.slice_of(rank)[0] * piece, piece)
    grid, index = layout.grid(), layout.slice_of(rank)
    size = [s // n for s, n in zip(whole.shape, grid)]
    return MemoryBytes.of(whole[tuple(slice(i * n, (i + 1) * n) for i, n in zip(index, size))])
