"""Pipeline (PP) and virtual-pipeline (VPP) placement of one modality's layers.

Layer counts are given as MindSpeed-MM's `pipeline_num_layers`: `[[vpp0: pp0..ppP-1], [vpp1: ...], ...]`.
Flat stage `f = v·P + p` is chunk `model{v}` of PP rank `p` (spec §4.3). Placement follows the rule the
training side uses (spec §4.4), not MindSpeed-MM's HEAD partition that loses layers (§4.5).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import accumulate

from ..errors import UsageError


@dataclass(frozen=True)
class PipelineLayers:
    """How many layers of one modality each (VPP chunk, PP rank) holds."""

    chunks: tuple[tuple[int, ...], ...]  # [v][p]

    def __post_init__(self):
        if not self.chunks or not self.chunks[0]:
            raise UsageError("pipeline layer list is empty")
        if len({len(c) for c in self.chunks}) != 1:
            raise UsageError(f"every VPP chunk needs the same number of PP stages, got {self.as_text()}")
        if any(n < 0 for c in self.chunks for n in c):
            raise UsageError(f"pipeline layer counts must be >= 0, got {self.as_text()}")

    @staticmethod
    def single(layers: int) -> "PipelineLayers":
        return PipelineLayers(((layers,),))

    @property
    def pp(self) -> int:
        return len(self.chunks[0])

    @property
    def vpp(self) -> int:
        return len(self.chunks)

    @property
    def flat(self) -> tuple[int, ...]:
        """Layer counts in execution order D0V0, D1V0, …, D0V1, … (spec §4.3)."""
        return tuple(n for chunk in self.chunks for n in chunk)

    @property
    def total(self) -> int:
        return sum(self.flat)

    @property
    def starts(self) -> tuple[int, ...]:
        return (0, *accumulate(self.flat))[:-1]

    @property
    def first_stage(self) -> int | None:
        """Flat stage with the modality's first layer (gets its `firsts`, e.g. the embedding)."""
        return next((f for f, n in enumerate(self.flat) if n), None)

    @property
    def last_stage(self) -> int | None:
        """Flat stage with the modality's last layer (gets its `lasts`, e.g. the final norm and head)."""
        return next((f for f in reversed(range(len(self.flat))) if self.flat[f]), None)

    def stage_of(self, layer: int) -> tuple[int, int]:
        """(flat stage, local layer index) of a global layer."""
        for f, (start, n) in enumerate(zip(self.starts, self.flat)):
            if start <= layer < start + n:
                return f, layer - start
        raise ValueError(f"layer {layer} is beyond the {self.total} layers of {self.as_text()}")

    def global_layer(self, stage: int, local: int) -> int:
        if not 0 <= local < self.flat[stage]:
            raise ValueError(f"stage {stage} holds {self.flat[stage]} layers, not local layer {local}")
        return self.starts[stage] + local

    def as_text(self) -> str:
        return json.dumps([list(c) for c in self.chunks])


def stage_of_flat(flat: int, pp: int) -> tuple[int, int]:
    """Flat stage → (VPP chunk v, PP rank p)."""
    return divmod(flat, pp)


def flat_of(chunk: int, rank: int, pp: int) -> int:
    return chunk * pp + rank


def parse_pp_layers(text: str) -> PipelineLayers:
    """`1,3` (one chunk) or the VPP form `[[1,2],[2,1]]` (also `[1,3]`) → PipelineLayers."""
    text = text.strip()
    try:
        value = json.loads(text) if text.startswith("[") else [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"pipeline layers {text!r}: expected e.g. 1,3 or [[1,2],[2,1]]") from None
    if value and all(isinstance(x, int) for x in value):
        value = [value]
    if not (isinstance(value, list) and value and all(isinstance(c, list) and c for c in value)
            and all(isinstance(n, int) and not isinstance(n, bool) for c in value for n in c)):
        raise UsageError(f"pipeline layers {text!r}: expected e.g. 1,3 or [[1,2],[2,1]]")
    return PipelineLayers(tuple(tuple(c) for c in value))
