"""Runs a Plan streaming: one output file at a time, one tensor at a time, atomically renamed at the end."""

from __future__ import annotations

import shutil
from pathlib import Path


from . import dtypes
from .distributed import Team
from .errors import OutputError
from .formats.ms_ckpt import SLICE_BYTES
from .formats.outputs import CARRIED_FILES, Layout
from .outfile import OutputFile, room_for_files
from .plan import Plan, Planned
from .progress import byte_bar
from .tensor_ref import ByteSource, FileRanges, MemoryBytes, TensorRef, cast_source, numel
from .lazy import torch


class GroupOutputs:
    """Computes a rule group once and hands out its outputs one by one (a split reads its source once);
    the group is let go when its last output has been taken."""

    def __init__(self):
        self._live: dict[int, list] = {}

    def tensor(self, planned: Planned) -> torch.Tensor:
        """The output before its cast to `planned.dtype`."""
        group = planned.group
        key = id(group)
        if key not in self._live:
            self._live[key] = [group.compute_uncast(), len(group.targets)]
        entry = self._live[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self._live[key]
        return entry[0][planned.index]

    def bytes_of(self, planned: Planned) -> ByteSource:
        group = planned.group
        if group.rule.op.zero_copy:  # a rename: file to file, or cast on the way
            ref = group.sources[planned.index]
            return cast_source(ref.source(), ref.dtype, planned.dtype)
        if group.in_files:  # row blocks of the source files: file to file too
            return cast_source(FileRanges(group.ranges(planned.index)), group.sources[0].dtype, planned.dtype)
        tensor = self.tensor(planned)
        return cast_source(MemoryBytes.of(tensor), dtypes.from_torch(tensor.dtype), planned.dtype)


def as_refs(plan: Plan) -> dict[str, TensorRef]:
    """A plan's outputs as lazy tensors, the source of another plan (MindSpore → MindSpore via the HF names).

    Renamed tensors keep their file ranges (still zero-copy); a computed group runs once for all its outputs.
    """
    groups = GroupOutputs()

    def ref(t: Planned) -> TensorRef:
        if t.group.zero_copy:
            return t.group.sources[t.index].renamed(t.name)
        if t.group.in_files and t.dtype == t.group.sources[0].dtype:
            return TensorRef(t.name, t.dtype, t.shape, t.group.ranges(t.index))
        return TensorRef(t.name, t.dtype, t.shape, loader=lambda: dtypes.cast(groups.tensor(t), t.dtype))

    return {t.name: ref(t) for t in plan.tensors}


def execute(plan: Plan, layout: Layout, *, progress: bool = True, carry_from: Path | None = None,
            ckpt_slice_bytes: int = SLICE_BYTES, jobs: int = 1, team: Team | None = None) -> list[Path]:
    """Write every file of the layout under temporary names, then rename them; index files last.

    `jobs` > 1 writes the weight files in that many forked worker processes, one whole file each at a
    time; the temporary files, the renames and the clean-up stay with this process. `team`: torchrun's
    ranks, each writing its share of the weight files; renamed once every rank wrote its share, the index
    files (rank 0) once every rank renamed its own; a failure anywhere removes them all. Returns the
    weight files this process wrote.
    """
    team = team or Team()
    sizes = [sum(numel(shape) * dtype.itemsize for _, dtype, shape in spec.entries) for spec in layout.files]
    mine = team.share(sizes)
    bar = byte_bar(sum(sizes[i] for i in mine), "converting", progress)
    outs: dict[int, OutputFile] = {}
    written: list[OutputFile] = []
    committed: list[OutputFile] = []

    def write_share() -> None:
        room_for_files(len(mine))
        for index in mine:
            outs[index] = OutputFile(layout.files[index].path, bar.update)
            written.append(outs[index])
        by_name = {t.name: t for t in plan.tensors}
        if jobs > 1 and len(outs) > 1:
            _write_in_workers(by_name, layout, outs, ckpt_slice_bytes, jobs, bar)
        else:
            groups = GroupOutputs()
            for index in outs:
                _write_file(by_name, layout, outs, index, groups, ckpt_slice_bytes)

    def commit_share() -> None:
        for out in outs.values():
            out.commit()
            committed.append(out)

    try:
        team.step(write_share)
        team.step(commit_share)
        if team.lead:
            extras = []
            for path, data in layout.extras.items():
                extra = OutputFile(path)
                written.append(extra)
                extra.write(data)
                extra.close()
                extras.append(extra)
            if layout.folder is not None and carry_from is not None:
                carry_files(carry_from, layout.folder)
            for extra in extras:
                extra.commit()
    except BaseException:
        for out in written:
            out.abort()
        for out in committed:
            out.final.unlink(missing_ok=True)
        team.settle()
        raise
    finally:
        bar.close()
    return [out.final for out in outs.values()]


def _write_file(by_name: dict[str, Planned], layout: Layout, outs: dict[int, OutputFile], index: int,
                groups: GroupOutputs, ckpt_slice_bytes: int) -> int:
    """Stream one weight file of the layout into its (already open) temporary file; its size."""
    spec, out = layout.files[index], outs[index]
    writer = spec.open_writer(out, ckpt_slice_bytes)
    for name, dtype, shape in spec.entries:
        writer.add(spec.name_prefix + name, dtype, shape, groups.bytes_of(by_name[name]))
    writer.close()
    out.close()
    return out.position


_FORKED: tuple = ()  # what forked workers inherit: (by_name, layout, outs, ckpt_slice_bytes)


def _worker(index: int) -> tuple[int, int]:
    by_name, layout, outs, ckpt_slice_bytes = _FORKED
    outs[index]._on_bytes = lambda n: None  # the parent's progress bar is not ours to draw
    return index, _write_file(by_name, layout, outs, index, GroupOutputs(), ckpt_slice_bytes)


def _write_in_workers(by_name: dict[str, Planned], layout: Layout, outs: dict[int, OutputFile],
                      ckpt_slice_bytes: int, jobs: int, bar) -> None:
    global _FORKED
    _FORKED = (by_name, layout, outs, ckpt_slice_bytes)
    try:
        import multiprocessing  # here: its import costs start-up time that one-process runs do not need

        with multiprocessing.get_context("fork").Pool(min(jobs, len(outs))) as pool:
            for index, size in pool.imap_unordered(_worker, list(outs)):
                outs[index].close()
                bar.update(size)
    finally:
        _FORKED = ()


def carry_files(source: Path, folder: Path) -> list[str]:
    """Copy config / tokenizer files found in `source` into the output folder (never over itself)."""
    carried = []
    if source.resolve() == folder.resolve():
        return carried
    for name in CARRIED_FILES:
        if (source / name).is_file():
            try:
                shutil.copyfile(source / name, folder / name)
            except OSError as e:
                raise OutputError(f"cannot copy {name} to {folder}: {e.strerror}") from None
            carried.append(name)
    return carried
