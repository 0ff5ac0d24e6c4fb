"""Writes a plan's full Megatron tensors as TP/PP/EP rank files, streaming.

The files of one PP rank (all its TP × EP ranks) are written side by side: each full tensor is computed
once and every rank's slice of it goes straight into that rank's file, so memory holds one full tensor
and its slices, never a stage or the model. A tensor that is byte ranges of the input (renamed, or row
blocks of it) is sliced as byte ranges, rows as windows and columns as a piece per row: nothing is
materialised, the bytes go file to file. `latest_checkpointed_iteration.txt` is written last.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from ..errors import UsageError
from ..execute import GroupOutputs
from ..formats import megatron as fmt
from ..formats.outputs import FileSpec, Layout
from ..formats.torch_pickle import PickleWriter
from ..outfile import OutputFile, room_for_files
from ..plan import Plan
from ..progress import byte_bar
from ..tensor_ref import ByteSource, CastBytes, FileRanges, MemoryBytes, column_ranges, concat_sources, numel, \
    tensor_over
from .layout import MegatronLayout, Parallel, Placement, place
from .tensor_parallel import shard
from ..lazy import torch


@dataclass
class RankFile:
    tp: int
    pp: int
    ep: int
    path: Path
    placements: list[Placement]
    entries: list  # (entry name, dtype, shard shape), in write order
    keys: list  # (chunk key, local name) per entry


def plan_rank_files(plan: Plan, layout: MegatronLayout, par: Parallel, root: Path) -> list[RankFile]:
    """Every rank file with its tensors (checks divisibility and pipeline lists; reads no data)."""
    placements = place(layout, plan.entries, par, plan.cfg)
    folder = root / fmt.iteration_dir(par.iteration)
    files = []
    for pp in range(par.pp):
        for ep in range(par.ep):
            for tp in range(par.tp):
                mine = [p for p in placements if p.pp == pp and ep in p.ep_ranks]
                keys = [(fmt.chunk_key(p.chunk, par.vpp), p.local) for p in mine]
                entries = [(f"{k}/{n}", p.dtype, p.shard_shape(tp, _padded(p, par))) for (k, n), p in zip(keys, mine)]
                path = folder / fmt.rank_dir(tp, pp, ep, par.pp, par.ep) / fmt.RANK_FILE
                files.append(RankFile(tp, pp, ep, path, mine, entries, keys))
    return files


def _padded(p: Placement, par: Parallel) -> int:
    return p.split.axis_length(p.shape, p.tp, par.vocab_divisible_by)


def as_layout(files: list[RankFile], root: Path) -> Layout:
    """The rank files as a Layout (for reports and dry runs)."""
    return Layout([FileSpec(f.path, "pickle", f.entries) for f in files], {}, root)


def write_rank_files(plan: Plan, files: list[RankFile], par: Parallel, root: Path, progress: bool = True) -> None:
    folder = root / fmt.iteration_dir(par.iteration)
    _refuse_other_layouts(folder, {f.path.parent.name for f in files})
    by_name = {t.name: t for t in plan.tensors}
    groups = GroupOutputs()
    total = sum(numel(e[2]) * e[1].itemsize for f in files for e in f.entries)
    bar = byte_bar(total, "writing rank files", progress)
    outs: list[OutputFile] = []
    try:
        for pp in range(par.pp):
            stage = [f for f in files if f.pp == pp]
            room_for_files(len(stage))
            chunks = [fmt.chunk_key(v, par.vpp) for v in range(par.vpp)]
            writers = {}
            for f in stage:
                f.path.parent.mkdir(parents=True, exist_ok=True)
                out = OutputFile(f.path, bar.update)
                outs.append(out)
                index = {id(p): i for i, p in enumerate(f.placements)}
                writers[(f.tp, f.ep)] = (PickleWriter(out, f.entries, container=fmt.rank_file_container(chunks, f.keys)),
                                         f.entries, index)
            for placement in _in_order(stage):
                full = _Full(groups.bytes_of(by_name[placement.source]), placement)
                for ep in placement.ep_ranks:
                    for tp in range(par.tp):
                        writer, entries, index = writers[(tp, ep)]
                        writer.add(*entries[index[id(placement)]], full.slice_for(tp))
            for writer, _, _ in writers.values():
                writer.close()
            for out in outs[-len(stage):]:
                out.close()
        commit_with_tracker(outs, root, par.iteration)
    except BaseException:
        for out in outs:
            out.abort()
        raise
    finally:
        bar.close()


def commit_with_tracker(outs: list[OutputFile], root: Path, iteration: int | None) -> None:
    """Rename the written files into place, then write the tracker file: the folder is a checkpoint only
    when complete. The tracker joins `outs`, so the caller's clean-up covers it too."""
    for out in outs:
        out.commit()
    tracker = OutputFile(root / fmt.TRACKER)
    outs.append(tracker)
    tracker.write(fmt.tracker_text(iteration))
    tracker.commit()


def _in_order(stage: list[RankFile]) -> list[Placement]:
    """The PP rank's placements in file order (every file's order is a subsequence of it)."""
    seen, order = set(), []
    for f in stage:
        for p in f.placements:
            if id(p) not in seen:
                seen.add(id(p))
                order.append(p)
    return sorted(order, key=lambda p: p.order)


def _refuse_other_layouts(folder: Path, ours: set[str]) -> None:
    """Rank folders of an earlier, different layout would make a mixed checkpoint: stop instead."""
    if not folder.is_dir():
        return
    stale = sorted(p.name for p in folder.iterdir() if p.name.startswith("mp_rank_") and p.name not in ours)
    if stale:
        raise UsageError(f"{folder} holds {stale[0]} of another layout; write to an empty folder")


class _Full:
    """One full tensor's bytes, sliced per TP rank: byte windows for row slices, file ranges per row for
    column slices of a tensor on disk, else torch slicing (padding, columns in memory)."""

    def __init__(self, source: ByteSource, placement: Placement):
        self.source, self.p = source, placement
        self._tensor: torch.Tensor | None = None

    def slice_for(self, tp: int) -> ByteSource:
        p = self.p
        if not p.shape:
            return self.source
        pieces = p.pieces[tp]
        real = p.shape[p.split.dim]
        if pieces == [(0, real)]:
            return self.source
        if p.split.dim == 0 and all(b <= real for _, b in pieces):
            row = numel(p.shape[1:]) * p.dtype.itemsize
            return concat_sources([self.source.window(a * row, (b - a) * row) for a, b in pieces])
        if p.split.dim == 1:
            columns = self._columns(pieces, real)
            if columns is not None:
                return columns
        return MemoryBytes.of(shard(self.tensor(), p.split.dim, pieces))

    def _columns(self, pieces: list, real: int) -> ByteSource | None:
        """Column slices of a matrix in files as a piece per row, cast on the way when the tensor is."""
        cast = self.source if isinstance(self.source, CastBytes) else None
        raw = cast.source if cast else self.source
        if not isinstance(raw, FileRanges):
            return None
        inner = numel(self.p.shape[2:]) * (cast.from_dtype if cast else self.p.dtype).itemsize
        columns = FileRanges(column_ranges(self.p.shape[0], [(raw.ranges, real * inner, a * inner, (b - a) * inner)
                                                            for a, b in pieces]))
        return CastBytes(columns, cast.from_dtype, cast.dtype) if cast else columns

    def tensor(self) -> torch.Tensor:
        if self._tensor is None:
            nbytes = self.source.nbytes
            self._tensor = tensor_over(self.source.view(0, nbytes, memoryview(bytearray(nbytes))), self.p.dtype,
                                       self.p.shape)
        return self._tensor
