"""MindSpore parallel strategy files (`ckpt_strategy_rank_{r}.ckpt`, `merged_ckpt_strategy.ckpt`), read without protobuf.

The file is one protobuf `ParallelStrategyMap` (MindSpore's `node_strategy.proto`): field 2 repeats
`ParallelStrategyItem{node_name=1, ParallelStrategys{stage=1, …}=2}`, field 3 repeats
`ParallelLayoutItem{param_name=1, ParallelLayouts=2}` with `ParallelLayouts{dev_matrix=1, tensor_map=2,
param_split_shape=3, indices_offset=4, field=5, opt_weight_shard_step=6, opt_weight_shard_size=7}`, each of
the first four a repeated message whose field 1 repeats the integers. A merged (all-stages) file prefixes
every name with `{stage}-`, as `mindspore.merge_pipeline_strategys` writes it.

How a layout places slices on ranks (MindSpore's `parallel/_tensor.py`): ranks count row-major through
`dev_matrix` (last axis fastest); a `tensor_map` value m names device axis `len(dev_matrix) - 1 - m`; a
tensor axis is cut into as many slices as its device axes have devices (several axes: the first is the
outer one), -1 leaves it whole. Optimizer sharding then cuts axis 0 of each slice again, over the device
axes the tensor_map leaves free, taken from the right (a partly used axis contributes its inner part).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput

_STAGE_PREFIX = re.compile(r"(\d+)-(.+)", re.S)


@dataclass(frozen=True)
class Layout:
    """One parameter's placement. `tensor_map`: per tensor axis, the device axes (numbered from the right) cutting it."""

    dev_matrix: tuple[int, ...]
    tensor_map: tuple[tuple[int, ...], ...]
    opt_shard_size: int = 0  # 0: no optimizer sharding; -1: over every free device axis
    field: int = 0

    @property
    def devices(self) -> int:
        """Ranks of one pipeline stage."""
        return math.prod(self.dev_matrix)

    def _axis(self, m: int) -> int:
        return len(self.dev_matrix) - 1 - m

    def grid(self) -> tuple[int, ...]:
        """Slices per tensor axis (axis 0 includes the optimizer shards)."""
        cuts = [math.prod(self.dev_matrix[self._axis(m)] for m in dims) for dims in self.tensor_map]
        if cuts:
            cuts[0] *= self._opt_shards()[1]
        return tuple(cuts)

    def slice_of(self, rank: int) -> tuple[int, ...]:
        """Which slice (per-axis index into `grid()`) rank `rank` of its stage holds."""
        coord, rest = [0] * len(self.dev_matrix), rank % self.devices
        for axis in reversed(range(len(self.dev_matrix))):
            coord[axis], rest = rest % self.dev_matrix[axis], rest // self.dev_matrix[axis]
        index = []
        for dims in self.tensor_map:
            i = 0
            for m in dims:
                i = i * self.dev_matrix[self._axis(m)] + coord[self._axis(m)]
            index.append(i)
        if index:
            parts, size = self._opt_shards()
            opt, stride = 0, 1
            for axis, take in parts:
                opt, stride = opt + coord[axis] % take * stride, stride * take
            index[0] = index[0] * size + opt
        return tuple(index)

    def _opt_shards(self) -> tuple[list[tuple[int, int]], int]:
        """The (device axis, devices taken) that shard axis 0 for the optimizer, innermost first, and their product."""
        if self.opt_shard_size in (0, 1):
            return [], 1
        used = {self._axis(m) for dims in self.tensor_map for m in dims}
        free = [a for a in reversed(range(len(self.dev_matrix))) if a not in used and self.dev_matrix[a] > 1]
        left = self.opt_shard_size if self.opt_shard_size > 0 else math.prod(self.dev_matrix[a] for a in free)
        parts = []
        for axis in free:
            if left == 1:
                break
            take = min(left, self.dev_matrix[axis])
            if self.dev_matrix[axis] % take or left % take:
                break
            parts.append((axis, take))
            left //= take
        if left != 1:
            raise BadInput(f"opt_weight_shard_size {self.opt_shard_size} does not fit the free device axes of "
                           f"dev_matrix {list(self.dev_matrix)} (tensor_map {self.tensor_map})")
        return parts, math.prod(t for _, t in parts)


@dataclass
class Strategy:
    """Every parameter's layout and pipeline stage(s), and how many stages the files describe."""

    layouts: dict[str, Layout]
    stages_of: dict[str, set[int]]
    files: list[Path]

    @property
    def stages(self) -> int:
        return max((max(s) for s in self.stages_of.values()), default=0) + 1

    @property
    def devices(self) -> int:
        """Ranks per stage."""
        return next(iter(self.layouts.values())).devices


def read_strategy(path: Path) -> Strategy:
    """A strategy file, or a folder of them (every `*.ckpt` in it: per-rank files and/or a merged one)."""
    path = Path(path)
    files = sorted(p for p in path.glob("*.ckpt") if p.is_file()) if path.is_dir() else [path]
    if not files:
        raise BadInput(f"{path}: no strategy files (*.ckpt) in this folder")
    strategy = Strategy({}, {}, files)
    for file in files:
        _read_file(file, strategy)
    return strategy


def _read_file(path: Path, into: Strategy) -> None:
    """Adds a file's layouts; a name's stage is its `{stage}-` prefix, else the stage the file is for."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadInput(f"{path}: cannot read the strategy file ({e.strerror})") from None
    try:
        items, stages = [], set()
        for field, value in _fields(data):
            if field == 2:
                strategys = _one(value, 2)
                stages |= {v for f, v in _fields(strategys) if f == 1} if strategys is not None else set()
            elif field == 3:
                items.append(value)
        for item in items:
            name, stage, layout = _layout_item(item)
            if layout.field:
                raise BadInput(f"{path}: parameter {name!r} is laid out by `field` (embedding field slicing), "
                               "which is not supported")
            into.layouts.setdefault(name, layout)
            into.stages_of.setdefault(name, set()).add(min(stages, default=0) if stage is None else stage)
    except (_Corrupt, UnicodeDecodeError, TypeError) as e:
        raise BadInput(f"{path}: not a MindSpore strategy file ({e})") from None
    if not items:
        raise BadInput(f"{path}: not a MindSpore strategy file (no parameter layouts in it)")


def _layout_item(item: bytes) -> tuple[str, int | None, Layout]:
    name_bytes, layouts = _one(item, 1), _one(item, 2)
    if name_bytes is None or layouts is None:
        raise _Corrupt("a layout item without name or layouts")
    name, stage = name_bytes.decode("utf-8"), None
    prefixed = _STAGE_PREFIX.fullmatch(name)
    if prefixed:
        stage, name = int(prefixed[1]), prefixed[2]
    dev = [_ints(v) for f, v in _fields(layouts) if f == 1]
    maps = [_ints(v, signed=True) for f, v in _fields(layouts) if f == 2]
    scalars = {f: _signed(v) for f, v in _fields(layouts) if f in (5, 6, 7) and isinstance(v, int)}
    if not dev or not maps:
        raise _Corrupt(f"parameter {name!r} has no dev_matrix or tensor_map")
    # Several tensor_map entries: one per tensor axis, each naming its device axes (MindSpore's Layout API).
    axes = [m for m in maps if m] if len(maps) > 1 else [[m] for m in maps[0]]
    tensor_map = tuple(tuple(m for m in axis if m != -1) for axis in axes)
    dev_matrix = tuple(dev[0])
    if any(d <= 0 for d in dev_matrix) or any(not 0 <= m < len(dev_matrix) for axis in tensor_map for m in axis):
        raise _Corrupt(f"parameter {name!r} has tensor_map {axes} outside dev_matrix {list(dev_matrix)}")
    opt_size = scalars.get(7, 0) if scalars.get(6, 0) else 0  # step 0: not sharded, whatever the size says
    return name, stage, Layout(dev_matrix, tensor_map, opt_size, scalars.get(5, 0))


class _Corrupt(Exception):
    pass


def _fields(data: bytes):
    """(field number, value) of one message: ints for varints, bytes for length-delimited fields."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            n, pos = _varint(data, pos)
            if pos + n > len(data):
                raise _Corrupt(f"field {field} runs past the end at byte {pos}")
            value, pos = data[pos:pos + n], pos + n
        elif wire in (1, 5):
            value, pos = data[pos:pos + (8 if wire == 1 else 4)], pos + (8 if wire == 1 else 4)
        else:
            raise _Corrupt(f"wire type {wire} at byte {pos}")
        if field == 0 or pos > len(data):
            raise _Corrupt(f"truncated or bad field at byte {pos}")
        yield field, value


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while pos < len(data) and shift < 70:
        b = data[pos]
        result |= (b & 0x7F) << shift
        pos += 1
        if not b & 0x80:
            return result, pos
        shift += 7
    raise _Corrupt(f"bad varint at byte {pos}")


def _signed(value: int) -> int:
    """int32/int64 fields store negatives as 64-bit two's complement."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _one(message: bytes, number: int) -> bytes | None:
    return next((v for f, v in _fields(message) if f == number and isinstance(v, bytes)), None)


def _ints(message: bytes, signed: bool = False) -> list[int]:
    """Field 1 of a `{repeated int dim = 1}` message, packed or not."""
    out = []
    for field, value in _fields(message):
        if field != 1:
            continue
        if isinstance(value, int):
            out.append(value)
        else:
            pos = 0
            while pos < len(value):
                v, pos = _varint(value, pos)
                out.append(v)
    return [_signed(v) for v in out] if signed else out
