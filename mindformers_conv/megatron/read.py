"""Reads a Megatron checkpoint as full tensors with full Megatron names, lazily.

The layout (TP, PP, VPP, EP and every stage's layer counts) comes from the files themselves: folder
names give the rank grid, `model{v}` keys the VPP chunks, the local layer and expert numbers each
stage holds its share of the pipeline. A full tensor's bytes are its TP shards put back together:
row- and column-split tensors as byte ranges of the rank files (nothing read until written), others
merged in memory when asked for. Vocab padding is stripped to config.json's vocab size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput, UsageError
from ..formats import megatron as fmt
from ..mapping import Config
from ..tensor_ref import TensorRef, column_ranges, numel, sub_ranges
from .layout import MegatronLayout, discover_pipelines, local_to_full
from .pipeline import PipelineLayers
from .tensor_parallel import TpSplit, merge, merge_spans, shard_length


@dataclass
class MegatronSource:
    refs: dict[str, TensorRef]
    files: list[Path]
    tps: dict[str, int]  # modality → its TP size
    ep: int
    pipelines: dict[str, PipelineLayers]
    iteration: int | None


def read_megatron(path: str | Path, layout: MegatronLayout, cfg: Config) -> MegatronSource:
    found = fmt.open_dir(path)
    files = {key: fmt.read_rank_file(p) for key, p in found.files.items()}
    chunk_keys = sorted(files[(0, 0, 0)], key=fmt.chunk_index)
    for key, chunks in files.items():
        if sorted(chunks, key=fmt.chunk_index) != chunk_keys:
            raise BadInput(f"{found.files[key]}: holds {sorted(chunks)}, but {found.files[(0, 0, 0)]} holds {chunk_keys}")
    vpp, pp = len(chunk_keys), found.pp
    stages = [list(files[(0, f % pp, 0)][chunk_keys[f // pp]]) for f in range(pp * vpp)]
    pipelines = discover_pipelines(layout, stages, pp)
    per_rank = 1 + max((found_e[0] for (t, p, e), chunks in files.items() if e == 0 for state in chunks.values()
                        for n in state if (found_e := layout.expert_of(n)) is not None), default=-1)
    shards: dict[str, dict[int, TensorRef]] = {}
    origin: dict[str, tuple[int, int]] = {}
    for (t, p, e), chunks in files.items():
        for key, state in chunks.items():
            flat = fmt.chunk_index(key) * pp + p
            for local, ref in state.items():
                if e and layout.expert_of(local) is None:
                    continue  # the same non-expert tensors sit on every EP rank
                m = layout.modality_of(local)
                if flat >= len(pipelines[m.name].flat) or (flat and local.startswith(m.everywhere)):
                    continue  # a tower repeated over the stages, or a tensor on every stage: seen before (§4.6)
                full = local_to_full(layout, local, flat, pipelines, e, per_rank)
                if origin.setdefault(full, (flat, e)) != (flat, e):
                    raise BadInput(f"{found.files[(t, p, e)]}: {local!r} is also on another stage as {full!r}")
                shards.setdefault(full, {})[t] = ref
    for name, by_rank in shards.items():
        missing = sorted(set(range(found.tp)) - set(by_rank))
        if missing:
            flat, e = origin[name]
            raise BadInput(f"{name!r} is missing from TP rank {missing[0]} "
                           f"({fmt.rank_dir(missing[0], flat % pp, e, pp, found.ep)})")
    tps = {m.name: module_tp([n for n in shards if layout.modality_of(n) is m], shards, found.tp, layout)
           for m in layout.modalities}
    refs = {name: merged_ref(name, [by_rank[t] for t in range(tps[layout.modality_of(name).name])],
                             layout.split_of(name), cfg, layout.vocab_size(cfg))
            for name, by_rank in shards.items()}
    return MegatronSource(refs, list(found.files.values()), tps, found.ep, pipelines, found.iteration)


def module_tp(names: list[str], shards: dict[str, dict[int, TensorRef]], folders: int, layout: MegatronLayout) -> int:
    """A modality's own TP size: the smallest size s dividing the TP folders such that folder r holds
    the bytes of folder r mod s for each of its split tensors (spec §3.5). A wrong size shows a
    difference at once; only the right one reads the repeated shards through."""
    split = [n for n in names if layout.split_of(n).kind != "replicated" and shards[n][0].shape]
    for size in (s for s in range(1, folders) if folders % s == 0):
        if all(_same(shards[n][r], shards[n][r % size]) for n in split for r in range(size, folders)):
            return size
    return folders


SAME_STEP = 16 << 20  # bytes compared at a time


def _same(a: TensorRef, b: TensorRef) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    first, second = a.source(), b.source()
    scratch = [memoryview(bytearray(min(SAME_STEP, a.nbytes))) for _ in range(2)]
    for at in range(0, a.nbytes, SAME_STEP):
        n = min(SAME_STEP, a.nbytes - at)
        if first.view(at, n, scratch[0]) != second.view(at, n, scratch[1]):
            return False
    return True


def merged_ref(name: str, shards: list[TensorRef], split: TpSplit, cfg: Config, vocab: int | None) -> TensorRef:
    """The full tensor of TP shards: byte ranges when rows are stacked, else a loader that merges."""
    first, tp = shards[0], len(shards)
    for s in shards[1:]:
        if s.dtype != first.dtype or len(s.shape) != len(first.shape):
            raise BadInput(f"{name!r}: TP ranks disagree on dtype or rank ({first.dtype.code} {list(first.shape)} "
                           f"vs {s.dtype.code} {list(s.shape)})")
    if not first.shape:
        return first.renamed(name)
    dim = split.dim
    if split.kind == "replicated":
        axis = first.shape[0]
    elif split.kind == "qkv":
        nh, nkv, hd = split.heads(cfg)
        axis = (nh + 2 * nkv) * hd
    else:
        axis = sum(s.shape[dim] for s in shards)
    shape = tuple(axis if d == dim else n for d, n in enumerate(first.shape))
    try:
        per_rank = split.pieces(shape, tp, cfg)
    except UsageError as e:
        raise BadInput(f"{name!r}: the shards do not fit a TP {tp} split ({e})") from None
    for rank, (s, pieces) in enumerate(zip(shards, per_rank)):
        expected = tuple(shard_length(pieces) if d == dim else n for d, n in enumerate(shape))
        if s.shape != expected:
            raise BadInput(f"{name!r}: TP rank {rank} holds {list(s.shape)}, the TP {tp} split needs {list(expected)}")
    real = axis
    if split.kind == "vocab":
        if vocab is None:
            raise UsageError(f"{name!r}: stripping the vocab padding needs the HF vocab_size; "
                             "pass --config_path with the HF config.json")
        if vocab > axis:
            raise BadInput(f"{name!r} has {axis} vocab rows, fewer than config.json's vocab_size {vocab}")
        real = vocab
    if real == axis and (tp == 1 or split.kind == "replicated"):
        return first.renamed(name)
    full_shape = tuple(real if d == dim else n for d, n in enumerate(shape))
    spans = merge_spans(per_rank, real)
    if dim == 0 and all(s.ranges for s in shards):
        row = numel(shape[1:]) * first.dtype.itemsize
        ranges = tuple(r for sp in spans for r in sub_ranges(shards[sp.rank].ranges, sp.offset * row, sp.length * row))
        return TensorRef(name, first.dtype, full_shape, ranges)
    if dim == 1 and all(s.ranges for s in shards):
        inner = numel(shape[2:]) * first.dtype.itemsize
        blocks = [(shards[sp.rank].ranges, shards[sp.rank].shape[1] * inner, sp.offset * inner, sp.length * inner)
                  for sp in spans]
        return TensorRef(name, first.dtype, full_shape, column_ranges(shape[0], blocks))
    return TensorRef(name, first.dtype, full_shape,
                     loader=lambda: merge([s.read() for s in shards], dim, per_rank, real))
