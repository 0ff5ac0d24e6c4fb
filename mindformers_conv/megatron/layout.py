"""A model's Megatron layout (the declaration) and the placement of full tensors into rank files.

A Megatron model is a ModelSpec whose MindSpore side names the full (unsharded) Megatron tensors, plus
this declaration: the TP split of every name, the pipeline stage schema of every modality (spec §4.1),
and where expert numbers sit (EP, spec §5). Placement is the forward map full name → (stage, rank
files, local name, slices); `local_to_full` is its inverse for reading.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..dtypes import DType
from ..errors import BadInput, UsageError
from ..lora import HF_LORA
from ..mapping import Config, Pattern
from ..tensor_ref import Shape
from .pipeline import PipelineLayers, stage_of_flat
from .tensor_parallel import REPLICATED, Piece, TpSplit, shard_shape


@dataclass(frozen=True)
class Modality:
    """One tower's pipeline schema: `firsts` go on its first stage with layers, `lasts` on its last,
    layers `{layers}{n}.…` on the stage holding global layer n (renumbered locally), `everywhere` on
    every stage (spec §4.1 `all_layer`, DeepSeek-VL2's `image_newline`)."""

    name: str  # "llm", "vit": the CLI flag is --{name}_pp_layers
    firsts: tuple[str, ...]
    lasts: tuple[str, ...]
    layers: str
    everywhere: tuple[str, ...] = ()

    def owns(self, name: str) -> bool:
        return name.startswith((self.layers, *self.firsts, *self.lasts, *self.everywhere))

    def layer_of(self, name: str) -> tuple[int, str] | None:
        """(layer number, rest of the name after it) for a layer tensor, else None."""
        if not name.startswith(self.layers):
            return None
        number, dot, rest = name[len(self.layers):].partition(".")
        if not number.isdigit() or not dot:
            return None
        return int(number), rest

    def layer_name(self, layer: int, rest: str) -> str:
        return f"{self.layers}{layer}.{rest}"


@dataclass(frozen=True)
class MegatronLayout:
    """The Megatron side of a model: modalities in stage order (vision before text, spec §4.1), TP
    splits by full-name pattern (first match; unmatched names are replicated), the tied head."""

    modalities: tuple[Modality, ...]
    tp_rules: tuple[tuple[str, TpSplit], ...]
    tied: tuple[str, str] | None = None  # (output layer, word embedding) full names
    expert_marker: str = ".mlp.experts.local_experts."  # the expert number follows it (spec §5)
    vocab_size: Callable[[Config], int | None] = lambda cfg: cfg.get("vocab_size")  # to strip vocab padding
    _patterns: tuple = field(default=(), compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "_patterns", tuple((Pattern(p), s) for p, s in self.tp_rules))

    def split_of(self, name: str) -> TpSplit:
        lora = HF_LORA.fullmatch(name)  # `X.lora_A.default.weight`: A has X's columns, B its rows
        if lora:
            base = self.split_of(f"{lora['module']}.weight")
            return base if (base.dim == 0) == (lora["ab"] == "B") else REPLICATED
        return next((s for p, s in self._patterns if p.match(name) is not None), REPLICATED)

    def modality_of(self, name: str) -> Modality:
        for m in self.modalities:
            if m.owns(name):
                return m
        raise BadInput(f"tensor {name!r} belongs to no pipeline stage of the Megatron layout")

    def expert_of(self, name: str) -> tuple[int, str, str] | None:
        """(expert number, text before it, text after it) for an expert tensor, else None."""
        head, marker, tail = name.partition(self.expert_marker)
        if not marker:
            return None
        number, dot, rest = tail.partition(".")
        if not number.isdigit():
            return None
        return int(number), head + marker, dot + rest

    def modality(self, name: str) -> Modality:
        return next(m for m in self.modalities if m.name == name)


LLM = "llm"  # the modality whose pipeline lists set the PP and VPP sizes (spec §8: pp_size = len(llm_pp_layers[0]))


@dataclass(frozen=True)
class Parallel:
    """The target layout: the TP size of every modality (a tower may differ from the LLM, spec §3.5), the
    EP size, per-modality pipeline layer counts (the LLM's set the stages, §4.6), vocab padding."""

    tps: dict[str, int]
    ep: int = 1
    pipelines: dict[str, PipelineLayers] = field(default_factory=dict)
    vocab_divisible_by: int = 1
    iteration: int | None = None

    @property
    def tp(self) -> int:
        """TP rank folders: the largest modality TP size (every other one divides it)."""
        return max(self.tps.values())

    @property
    def main(self) -> PipelineLayers:
        return main_pipeline(self.pipelines)

    @property
    def pp(self) -> int:
        return self.main.pp

    @property
    def vpp(self) -> int:
        return self.main.vpp

    @property
    def stages(self) -> int:
        return len(self.main.flat)


def main_pipeline(pipelines: dict[str, PipelineLayers]) -> PipelineLayers:
    return pipelines.get(LLM) or next(iter(pipelines.values()))


@dataclass
class Placement:
    """One full tensor placed on one PP rank: its chunk, local name, EP ranks and TP slices."""

    chunk: int
    pp: int
    local: str
    target: str  # full Megatron name
    source: str  # the plan tensor that computes it (the embedding, for a tied head)
    ep_ranks: tuple[int, ...]
    split: TpSplit
    pieces: list[list[Piece]]  # per TP rank folder, on the (padded) split axis
    tp: int  # the modality's TP size: folder r holds its rank r mod tp (spec §3.5)
    dtype: DType
    shape: Shape  # full, unpadded
    order: tuple = ()

    def shard_shape(self, tp_rank: int, padded: int) -> Shape:
        if not self.shape:
            return self.shape
        shape = list(self.shape)
        shape[self.split.dim] = padded
        return shard_shape(tuple(shape), self.split.dim, self.pieces[tp_rank])


Entry = tuple[str, DType, Shape]


def resolve_parallel(layout: MegatronLayout, entries: list[Entry], tp: int, ep: int,
                     pp_layers: dict[str, PipelineLayers | None], vocab_divisible_by: int = 1,
                     iteration: int | None = None, tower_tps: dict[str, int | None] | None = None) -> Parallel:
    """Fill in the pipeline lists and TP sizes the user left out and check them against the model.

    `tower_tps`: a modality's own TP size (--vit_tp, --audio_tp; 0 or None = --tp).
    """
    counts = layer_counts(layout, [e[0] for e in entries])
    given = {k: v for k, v in pp_layers.items() if v is not None}
    shape = given.get(LLM) or next(iter(given.values()), None)
    pipelines = {}
    for m in layout.modalities:
        layers = given.get(m.name)
        if layers is None:
            # One stage, or the model's first stages hold this tower when other lists are given.
            flat = [counts[m.name]] + [0] * ((shape.pp * shape.vpp - 1) if shape else 0)
            p = shape.pp if shape else 1
            layers = PipelineLayers(tuple(tuple(flat[v * p:(v + 1) * p]) for v in range(len(flat) // p)))
        if layers.total != counts[m.name]:
            raise UsageError(f"--{m.name}_pp_layers {layers.as_text()} sum to {layers.total}, but the model "
                             f"has {counts[m.name]} {m.name} layers")
        pipelines[m.name] = layers
    stages = len(main_pipeline(pipelines).flat)
    for name, layers in pipelines.items():
        if len(layers.flat) > stages:  # MindSpeed-MM partitions them but saves only the LLM's stages (§4.6)
            raise UsageError(f"--{name}_pp_layers {layers.as_text()} has {len(layers.flat)} stages, more than the "
                             f"{stages} of --{LLM}_pp_layers; a tower may have as many or fewer (it is then "
                             "repeated over the stages), not more")
    if tp < 1 or ep < 1:
        raise UsageError("--tp and --ep must be at least 1")
    tps = {m.name: (tower_tps or {}).get(m.name) or tp for m in layout.modalities}
    if any(n < 0 for n in tps.values()):
        raise UsageError("a tower's TP size must be at least 0 (0 = --tp)")
    largest = max(tps.values())
    if any(largest % n for n in tps.values()):
        raise UsageError(f"TP sizes {', '.join(f'{k} {v}' for k, v in tps.items())}: each must divide the largest")
    return Parallel(tps, ep, pipelines, vocab_divisible_by, iteration)


def layer_counts(layout: MegatronLayout, names) -> dict[str, int]:
    counts = {m.name: 0 for m in layout.modalities}
    for name in names:
        for m in layout.modalities:
            found = m.layer_of(name)
            if found:
                counts[m.name] = max(counts[m.name], found[0] + 1)
    return counts


def place(layout: MegatronLayout, entries: list[Entry], par: Parallel, cfg: Config) -> list[Placement]:
    """Every full tensor of the plan on its PP rank (spec §4.4), EP ranks (§5) and TP slices (§3),
    ordered per PP rank by chunk, tower, firsts / layers / lasts. A tied head is written only where
    Megatron has one: on a last stage that is not the embedding's stage (§4.7)."""
    by_name = {e[0]: e for e in entries}
    experts = _expert_count(layout, by_name)
    if experts and experts % par.ep:
        raise UsageError(f"{experts} experts do not divide over --ep {par.ep}")
    if par.ep > 1 and not experts:
        raise UsageError(f"--ep {par.ep} needs a model with experts")
    per_rank = experts // par.ep if experts else 0
    todo = [(e[0], e[0]) for e in entries]
    if layout.tied and layout.tied[0] not in by_name and layout.tied[1] in by_name:  # a model without a head is tied
        todo.append((layout.tied[0], layout.tied[1]))
    out = []
    for target, source in todo:
        _, dtype, shape = by_name[source]
        m = layout.modality_of(target)
        lines = par.pipelines[m.name]
        layer = m.layer_of(target)
        if layer is not None:
            flat, local_layer = lines.stage_of(layer[0])
            local, rank_order = m.layer_name(local_layer, layer[1]), (1, layer[0])
        elif target.startswith(m.firsts):
            flat, local, rank_order = lines.first_stage, target, (0, _prefix_index(target, m.firsts))
        elif target.startswith(m.lasts):
            flat, local, rank_order = lines.last_stage, target, (2, _prefix_index(target, m.lasts))
            if layout.tied and target == layout.tied[0] and cfg.get("tie_word_embeddings") \
                    and lines.first_stage == lines.last_stage:
                continue  # Megatron shares the embedding on that stage: no separate head (§4.7)
        elif target.startswith(m.everywhere):
            flat, local, rank_order = 0, target, (-1, _prefix_index(target, m.everywhere))
        else:
            raise BadInput(f"tensor {target!r} is neither a layer nor a first/last-stage tensor of {m.name}")
        if flat is None:
            raise UsageError(f"--{m.name}_pp_layers gives {m.name} no layers, but the model has {target!r}")
        ep_ranks = tuple(range(par.ep))
        expert = layout.expert_of(local)
        if expert is not None and par.ep > 1:
            rank, number = divmod(expert[0], per_rank)
            local, ep_ranks = f"{expert[1]}{number}{expert[2]}", (rank,)
        split, tp = layout.split_of(target), par.tps[m.name]
        try:
            pieces = split.pieces(shape, tp, cfg, par.vocab_divisible_by)
        except UsageError as e:
            raise UsageError(f"{target}: {e}") from None
        pieces = [pieces[r % tp] for r in range(par.tp)]
        # A tower with fewer stages than the LLM repeats over them: stage f holds its stage f mod L (§4.6).
        for f in range(flat, par.stages, 1 if target.startswith(m.everywhere) else len(lines.flat)):
            chunk, pp = stage_of_flat(f, par.pp)
            # A function of the names only, so files come out the same whatever order the input lists tensors.
            order = (chunk, layout.modalities.index(m), *rank_order, expert[0] if expert else -1, local)
            out.append(Placement(chunk, pp, local, target, source, ep_ranks, split, pieces, tp, dtype, shape, order))
    out.sort(key=lambda p: (p.pp, p.order))
    return out


def _prefix_index(name: str, prefixes: tuple[str, ...]) -> int:
    return next(i for i, p in enumerate(prefixes) if name.startswith(p))


def _expert_count(layout: MegatronLayout, names) -> int:
    numbers = {found[0] for n in names if (found := layout.expert_of(n)) is not None}
    return max(numbers) + 1 if numbers else 0


def local_to_full(layout: MegatronLayout, local: str, flat: int, pipelines: dict[str, PipelineLayers],
                  ep_rank: int, experts_per_rank: int) -> str:
    """The full name of a rank file's tensor: global layer (PP/VPP) and global expert (EP) numbers."""
    m = layout.modality_of(local)
    layer = m.layer_of(local)
    name = local
    if layer is not None:
        try:
            name = m.layer_name(pipelines[m.name].global_layer(flat, layer[0]), layer[1])
        except ValueError as e:
            raise BadInput(f"{local!r}: {e}") from None
    expert = layout.expert_of(name)
    if expert is not None and ep_rank:
        name = f"{expert[1]}{expert[0] + ep_rank * experts_per_rank}{expert[2]}"
    return name


def discover_pipelines(layout: MegatronLayout, stage_names: list[list[str]], pp: int) -> dict[str, PipelineLayers]:
    """Per-modality layer counts of every flat stage, from the names the stages hold. A tower repeated
    over the stages (spec §4.6) holds its first-stage tensors again after L stages: its list is the
    first L stages' counts, and every later stage must hold what stage f mod L holds."""
    out = {}
    for m in layout.modalities:
        mine = [{n for n in names if m.owns(n)} for names in stage_names]
        flat = [layer_counts(layout, names)[m.name] for names in mine]
        period = _period(m, mine)
        if period == len(flat):
            out[m.name] = PipelineLayers(tuple(tuple(flat[v * pp:(v + 1) * pp]) for v in range(len(flat) // pp)))
            continue
        for f in range(period, len(flat)):
            if mine[f] != mine[f % period]:
                raise BadInput(f"{m.name} repeats every {period} pipeline stages, but stage {f} does not hold "
                               f"what stage {f % period} holds")
        out[m.name] = PipelineLayers((tuple(flat[:period]),))
    return out


def _period(m: Modality, stages: list[set[str]]) -> int:
    """After how many stages a tower's first- (or last-) stage tensors come again; all stages if never."""
    for prefixes in (m.firsts, m.lasts):
        holding = [f for f, names in enumerate(stages) if any(n.startswith(prefixes) for n in names)]
        if len(holding) > 1:
            return holding[1] - holding[0]
    return len(stages)
