"""Tensor-parallel (TP) splits: which rows (or columns) of a full tensor each TP rank holds.

A split kind describes, for every rank, the slices of the full tensor's split axis it holds, in order
(spec §3.1–3.3). The one description serves both directions: `shard` cuts a rank's part, `merge` puts
the parts back, so a merge is the inverse of its split by construction. Slices past the real length
of the axis are padding (vocab rows padded to a TP multiple): zeros when split, dropped when merged.

MindSpeed-MM's names are the other way round: its `RowSplit` (dim 0) is our `ROW`, its `ColSplit`
(dim 1) our `COL`.
"""

from __future__ import annotations

from dataclasses import dataclass


from ..errors import BadInput, UsageError
from ..mapping import Config, Heads
from ..tensor_ref import Shape
from ..lazy import torch

Piece = tuple[int, int]  # [start, stop) on the split axis of the full (padded) tensor


@dataclass(frozen=True)
class TpSplit:
    """How one tensor is split over TP ranks: `row` (dim 0, column-parallel linear), `col` (dim 1,
    row-parallel linear), `glu` ([gate; up], each half split), `qkv` (whole KV-head groups; KV heads
    replicated when there are fewer than ranks), `vocab` (rows padded to a TP multiple), `replicated`;
    and MindSpeed-MM's unaligned splits (spec §3.1, InternVL): `uneven` (rows dealt out, the first
    n mod tp ranks one more), `uneven_qkv` ([Q; K; V], each third by whole heads, unevenly) and
    `uneven_col` (columns by whole heads, unevenly)."""

    kind: str
    heads: Heads | None = None  # qkv: (query heads, kv heads, head_dim) from the config

    @property
    def dim(self) -> int:
        return 1 if self.kind in ("col", "uneven_col") else 0

    def axis_length(self, shape: Shape, tp: int, divisible_by: int = 1) -> int:
        """Length of the split axis in the sharded layout (the vocab padded, else the tensor's own)."""
        if not shape:
            return 0
        if self.kind == "vocab":
            return padded_vocab(shape[0], tp, divisible_by)
        return shape[self.dim]

    def pieces(self, shape: Shape, tp: int, cfg: Config, divisible_by: int = 1) -> list[list[Piece]]:
        """Per rank, the slices of the split axis it holds; raises UsageError when `tp` cannot divide it."""
        if self.kind == "replicated" or not shape:
            n = shape[0] if shape else 0
            return [[(0, n)] for _ in range(tp)]
        if self.dim == 1 and len(shape) < 2:
            raise UsageError(f"a column split needs a matrix, got shape {list(shape)}")
        if tp == 1:
            return [[(0, self.axis_length(shape, tp, divisible_by))]]
        n = self.axis_length(shape, tp, divisible_by)
        if self.kind in ("row", "col", "vocab"):
            return [[part] for part in _equal(n, tp, "rows" if self.dim == 0 else "columns")]
        if self.kind == "glu":
            if n % 2:
                raise UsageError(f"[gate; up] has an odd number of rows ({n})")
            half = n // 2
            gates = _equal(half, tp, "gate/up rows (ffn size)")
            return [[(a, b), (half + a, half + b)] for a, b in gates]
        if self.kind == "qkv":
            return _qkv_pieces(n, tp, self.heads(cfg))
        if self.kind == "uneven":
            return [[part] for part in _uneven(n, tp, "rows")]
        if self.kind in ("uneven_qkv", "uneven_col"):
            return _head_pieces(n, tp, self.heads(cfg)[0], 3 if self.kind == "uneven_qkv" else 1)
        raise ValueError(f"unknown TP split kind {self.kind!r}")


ROW = TpSplit("row")
COL = TpSplit("col")
GLU = TpSplit("glu")
VOCAB = TpSplit("vocab")
REPLICATED = TpSplit("replicated")


UNEVEN = TpSplit("uneven")


def qkv(heads: Heads) -> TpSplit:
    return TpSplit("qkv", heads)


def uneven_qkv(heads: Heads) -> TpSplit:
    return TpSplit("uneven_qkv", heads)


def uneven_col(heads: Heads) -> TpSplit:
    return TpSplit("uneven_col", heads)


def padded_vocab(rows: int, tp: int, divisible_by: int = 1) -> int:
    """Megatron's padded vocab: the next multiple of `divisible_by × tp`."""
    multiple = max(1, divisible_by) * tp
    return -(-rows // multiple) * multiple


def _equal(n: int, tp: int, what: str) -> list[Piece]:
    if n % tp:
        raise UsageError(f"{n} {what} do not divide over --tp {tp}")
    size = n // tp
    return [(r * size, (r + 1) * size) for r in range(tp)]


def _uneven(n: int, tp: int, what: str) -> list[Piece]:
    """[start, stop) per rank: n // tp each, one more for the first n % tp ranks (none left empty)."""
    if n < tp:
        raise UsageError(f"{n} {what} do not spread over --tp {tp}")
    size, extra = divmod(n, tp)
    starts = [r * size + min(r, extra) for r in range(tp + 1)]
    return list(zip(starts, starts[1:]))


def _head_pieces(n: int, tp: int, heads: int, parts: int) -> list[list[Piece]]:
    """Each of `parts` equal parts of the axis ([Q; K; V]: 3) cut by whole heads, unevenly (spec §3.1)."""
    if n % (parts * heads):
        raise BadInput(f"{n} rows/columns are not {parts} part(s) of {heads} heads")
    part, per_head = n // parts, n // parts // heads
    return [[(k * part + a * per_head, k * part + b * per_head) for k in range(parts)]
            for a, b in _uneven(heads, tp, "heads")]


def _qkv_pieces(rows: int, tp: int, heads: tuple[int, int, int]) -> list[list[Piece]]:
    """Megatron's fused QKV: nkv groups of [g query heads; k; v] (spec §2.4), whole groups per rank.

    With fewer KV heads than ranks, the ranks of one group share its k and v (replicated) and split
    its query heads.
    """
    nh, nkv, hd = heads
    g = nh // nkv
    group = (g + 2) * hd
    if rows != nkv * group:
        raise BadInput(f"fused qkv has {rows} rows; {nh} heads over {nkv} kv heads of {hd} need {nkv * group}")
    if nh % tp:
        raise UsageError(f"num_attention_heads {nh} is not divisible by --tp {tp}")
    if nkv >= tp:
        if nkv % tp:
            raise UsageError(f"num_key_value_heads {nkv} does not divide over --tp {tp}")
        return [[part] for part in _equal(rows, tp, "qkv rows")]
    if tp % nkv:
        raise UsageError(f"--tp {tp} is not a multiple of num_key_value_heads {nkv} (kv heads cannot be replicated evenly)")
    per_group = tp // nkv
    q_rows = g // per_group * hd
    out = []
    for r in range(tp):
        j, i = divmod(r, per_group)
        base = j * group
        out.append([(base + i * q_rows, base + (i + 1) * q_rows), (base + g * hd, base + group)])
    return out


def shard_length(pieces: list[Piece]) -> int:
    return sum(b - a for a, b in pieces)


def shard_shape(shape: Shape, dim: int, pieces: list[Piece]) -> Shape:
    if not shape:
        return shape
    return (*shape[:dim], shard_length(pieces), *shape[dim + 1:])


def shard(full: torch.Tensor, dim: int, pieces: list[Piece]) -> torch.Tensor:
    """One rank's part of `full`: its slices in order; slices past the tensor's length are zero padding."""
    if full.dim() == 0:
        return full
    real = full.shape[dim]
    parts = []
    for a, b in pieces:
        if a < real:
            parts.append(full.narrow(dim, a, min(b, real) - a))
        if b > max(a, real):
            shape = list(full.shape)
            shape[dim] = b - max(a, real)
            parts.append(torch.zeros(shape, dtype=full.dtype))
    return torch.cat(parts, dim) if len(parts) > 1 else parts[0].contiguous()


@dataclass(frozen=True)
class Span:
    """`length` rows of the full tensor from `start` are rows `offset…` of rank `rank`'s shard."""

    start: int
    length: int
    rank: int
    offset: int


def merge_spans(per_rank: list[list[Piece]], real: int) -> list[Span]:
    """Where each part of the full axis [0, real) comes from: every row once (the first rank holding a
    replicated row wins), padding past `real` left out. BadInput if a row is held by no rank."""
    spans = []
    for rank, pieces in enumerate(per_rank):
        offset = 0
        for a, b in pieces:
            spans.append(Span(a, b - a, rank, offset))
            offset += b - a
    spans.sort(key=lambda s: (s.start, s.rank))
    out, pos = [], 0
    for s in spans:
        end = min(s.start + s.length, real)
        if end <= pos:
            continue
        if s.start > pos:
            raise BadInput(f"rows {pos}..{s.start} of a tensor are on no TP rank")
        skip = pos - s.start
        out.append(Span(pos, end - pos, s.rank, s.offset + skip))
        pos = end
    if pos < real:
        raise BadInput(f"rows {pos}..{real} of a tensor are on no TP rank")
    return out


def merge(shards: list[torch.Tensor], dim: int, per_rank: list[list[Piece]], real: int) -> torch.Tensor:
    """The full tensor (axis length `real`) from every rank's part: the inverse of `shard`."""
    if shards[0].dim() == 0:
        return shards[0]
    parts = [shards[s.rank].narrow(dim, s.offset, s.length) for s in merge_spans(per_rank, real)]
    return torch.cat(parts, dim) if len(parts) > 1 else parts[0].contiguous()

