"""Source headers + a model's rules → a Plan: every output tensor, its shape, dtype and recipe.

Planning reads no tensor data. It enforces coverage: every source tensor is used or explicitly
dropped, every rule group is complete, every target is produced exactly once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


from . import dtypes
from .dtypes import DType
from .errors import BadInput, UnmappedTensor
from .mapping import DROP, Block, Config, ModelSpec, Pattern, Rule
from .tensor_ref import CAST_CHUNK, Ranges, Shape, TensorRef, numel, sub_ranges
from .lazy import torch


@dataclass
class Group:
    """One application of a rule: its source tensors and the targets it produces."""

    rule: Rule
    sources: list[TensorRef]
    targets: list[str]
    shapes: list[Shape]
    dtypes: list[DType]
    reverse: bool
    cfg: Config = field(repr=False, default_factory=dict)
    blocks: list[list[Block]] | None = None  # per output, its row blocks of the sources (a row-moving op)

    @property
    def zero_copy(self) -> bool:
        return self.rule.op.zero_copy and all(d == s.dtype for d, s in zip(self.dtypes, self.sources))

    @property
    def in_files(self) -> bool:
        """The outputs are row blocks of sources on disk (a row-moving op): bytes of the source files."""
        return self.blocks is not None and all(s.ranges for s in self.sources)

    def ranges(self, index: int) -> Ranges:
        """Output `index` as (path, offset, length) pieces of the source files (`in_files` groups only)."""
        return tuple(r for i, first, count in self.blocks[index]
                     for r in sub_ranges(self.sources[i].ranges, first * self._row_bytes(i), count * self._row_bytes(i)))

    def _row_bytes(self, i: int) -> int:
        return numel(self.sources[i].shape[1:]) * self.sources[i].dtype.itemsize

    @property
    def work_bytes(self) -> int:
        """Memory the recipe needs at once (0 when bytes are copied file to file, a chunk when cast as a stream)."""
        streams = self.rule.op.zero_copy or self.in_files
        if streams and all(d == s.dtype for d, s in zip(self.dtypes, self.sources)):
            return 0
        if streams:
            return max(min(numel(s.shape), CAST_CHUNK) * (s.dtype.itemsize + d.itemsize)
                       for s, d in zip(self.sources, self.dtypes))
        return sum(s.nbytes for s in self.sources) + sum(numel(s) * d.itemsize for s, d in zip(self.shapes, self.dtypes))

    def compute(self) -> list[torch.Tensor]:
        return [dtypes.cast(t, d).contiguous() for t, d in zip(self.compute_uncast(), self.dtypes)]

    def compute_uncast(self) -> list[torch.Tensor]:
        """The op's outputs before the cast to `dtypes` (the executor casts them as a stream)."""
        return self.rule.op.run([s.read() for s in self.sources], self.cfg, self.reverse)


@dataclass
class Planned:
    """One output tensor."""

    name: str
    dtype: DType
    shape: Shape
    group: Group
    index: int

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * self.dtype.itemsize


@dataclass
class Plan:
    spec: ModelSpec
    reverse: bool
    cfg: Config
    tensors: list[Planned]
    dropped: dict[str, list[str]] = field(default_factory=dict)  # reason → source names
    unmapped: list[str] = field(default_factory=list)  # skipped under --allow-unmapped

    @property
    def entries(self) -> list[tuple[str, DType, Shape]]:
        return [(t.name, t.dtype, t.shape) for t in self.tensors]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def peak_work_bytes(self) -> int:
        return max((t.group.work_bytes for t in self.tensors), default=0)


EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def build_plan(spec: ModelSpec, refs: dict[str, TensorRef], *, reverse: bool, dtype: DType | None,
               cfg: Config, allow_unmapped: bool = False, keep_tied: bool = True,
               mindformers_defaults: bool = True, hf_default: DType | None = None) -> Plan:
    """Match every source name against the rules (first match wins) and derive the targets.

    `dtype` is the cast asked for; without it the forward uses the rule's or the model's MindFormers
    default dtype (unless `mindformers_defaults` is off); the reverse into HF files (`hf_default`:
    config.json's dtype) gives each tensor its rule's `hf_dtype`, else `hf_default`; otherwise the
    reverse keeps each tensor's dtype.
    """
    refs = _with_tied_alias(spec, refs, reverse, cfg)
    refs = _with_aliases(spec, refs) if reverse else refs
    rules = spec.all_rules(cfg, lora=any("lora" in name for name in refs))
    groups: dict[tuple, dict[tuple, TensorRef]] = {}
    unmapped: list[str] = []
    plan_dropped: dict[str, list[str]] = {}
    for name, ref in refs.items():
        key = match_rule(rules, name, reverse)
        if key is None:
            unmapped.append(name)
            continue
        rule_index, caps, pattern_index = key
        if spec.layers_flag and "layers" in cfg and int(dict(caps).get("i", -1)) >= int(cfg["layers"]):
            plan_dropped.setdefault(f"layer beyond --layers {cfg['layers']}", []).append(name)
            continue
        gathered = dict(caps).get(rules[rule_index].gather) if rules[rule_index].gather else None
        if gathered is not None:
            caps = tuple(c for c in caps if c[0] != rules[rule_index].gather)
        groups.setdefault((rule_index, caps), {})[(pattern_index, gathered)] = ref
    plan = Plan(spec, reverse, cfg, [], plan_dropped)
    produced: dict[str, str] = {}
    for (rule_index, caps), members in groups.items():
        rule = rules[rule_index]
        try:
            sources = _complete(rule, dict(caps), members, reverse, cfg)
        except UnmappedTensor:
            if not allow_unmapped:
                raise
            unmapped.extend(r.name for r in members.values())
            continue
        if rule.op is DROP:
            plan.dropped.setdefault(rule.why, []).extend(s.name for s in sources)
            continue
        target = dtype
        if target is None and mindformers_defaults and not reverse:
            target = dtypes.BY_CODE.get(rule.ms_dtype or spec.forward_dtype or "")
        elif target is None and hf_default is not None:
            target = dtypes.BY_CODE.get(rule.hf_dtype or "") or hf_default
        group = _group(rule, sources, dict(caps), reverse, cfg, target)
        for index, name in enumerate(group.targets):
            if name in produced:
                raise BadInput(f"both {produced[name]!r} and {sources[0].name!r} map to {name!r}")
            produced[name] = sources[0].name
            plan.tensors.append(Planned(name, group.dtypes[index], group.shapes[index], group, index))
    if unmapped and not allow_unmapped:
        more = f" (and {len(unmapped) - 1} more)" if len(unmapped) > 1 else ""
        raise UnmappedTensor(f"tensor {unmapped[0]!r}{more} is not known to the {spec.key} mapping; "
                             f"check --model, or pass --allow-unmapped to leave it out")
    plan.unmapped = unmapped
    if reverse and spec.tied and not keep_tied and cfg.get("tie_word_embeddings"):
        head = spec.tied[0]
        if any(t.name == head for t in plan.tensors):
            plan.tensors = [t for t in plan.tensors if t.name != head]
            plan.dropped.setdefault("tied to the embedding (tie_word_embeddings)", []).append(head)
    if not plan.tensors:
        raise BadInput(f"no tensor of the input maps to the {spec.key} model")
    return plan


def _complete(rule: Rule, caps: dict, members: dict[tuple, TensorRef], reverse: bool, cfg: Config):
    """The group's sources in pattern order (gathered ones by index), or UnmappedTensor naming the gap."""
    patterns = rule.side(reverse)[0]
    first = next(iter(members.values())).name
    if rule.gather and rule.gather in patterns[0].fields:
        indices = sorted(int(k[1]) for k in members)
        expected = next((cfg[k] for k in EXPERT_COUNT_KEYS if isinstance(cfg.get(k), int)), None)
        if expected is None:
            expected = max(indices) + 1
        elif max(indices) >= expected:
            raise BadInput(f"{first!r}: the input has expert {max(indices)} but config.json says {expected} experts")
        for index, pattern in enumerate(patterns):  # several patterns (gate, up): each has every expert
            missing = sorted(set(range(expected)) - {int(k[1]) for k in members if k[0] == index})
            if missing:
                name = pattern.format({**caps, rule.gather: str(missing[0])})
                raise UnmappedTensor(f"{first!r} needs {name!r}, which the input does not have")
        return [members[(index, str(k))] for index in range(len(patterns)) for k in range(expected)]
    missing = [p.format(caps) for i, p in enumerate(patterns) if (i, None) not in members]
    if missing:
        raise UnmappedTensor(f"{first!r} needs {missing[0]!r}, which the input does not have")
    return [members[(i, None)] for i in range(len(patterns))]


def _with_aliases(spec: ModelSpec, refs: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """A MindSpore input read with spec.aliases: the tensors it stores once, under their second names too."""
    extra = {}
    for alias in (a for a in spec.aliases if a.of in refs):
        where, name = Pattern(alias.where), Pattern(alias.name)
        for caps in (where.match(n) for n in refs):
            if caps is not None:
                extra[name.format(caps)] = refs[alias.of].renamed(name.format(caps))
    return {**refs, **extra}


def _with_tied_alias(spec: ModelSpec, refs: dict[str, TensorRef], reverse: bool, cfg: Config):
    """Forward of a tied model: the HF file stores no head; MindFormers' state_dict() emits one.

    Tied unless config.json says `tie_word_embeddings: false`: transformers' own default is true, and
    `save_pretrained` omits values equal to the default (GPTBigCode writes no such key).
    """
    if reverse or not spec.tied or cfg.get("tie_word_embeddings", True) is False:
        return refs
    head, embedding = spec.tied
    if head in refs or embedding not in refs:
        return refs
    return {**refs, head: refs[embedding].renamed(head)}


def match_rule(rules: tuple[Rule, ...], name: str, reverse: bool):
    """The first rule (and its first pattern) whose source side matches `name`, as (rule index, sorted
    captures, pattern index); None when no rule does."""
    matcher = _RuleMatcher.of(rules, reverse)
    found = matcher.regex.match(name)
    if found is None:
        return None
    rule_index, pattern_index = matcher.slots[found.lastindex - 1]
    caps = rules[rule_index].side(reverse)[0][pattern_index].match(name)
    return rule_index, tuple(sorted(caps.items())), pattern_index


class _RuleMatcher:
    """All source patterns of a rule list as one alternation, tried in rule order by one regex match
    (a 70-rule model then plans its tensors without 70 Python-level matches each)."""

    _cache: dict[tuple[int, bool], "_RuleMatcher"] = {}

    def __init__(self, rules: tuple[Rule, ...], reverse: bool):
        self.rules = rules  # held, so that id(rules) names these rules while the cache lives
        self.slots = [(r, p) for r, rule in enumerate(rules) for p in range(len(rule.side(reverse)[0]))]
        self.regex = re.compile("|".join(f"({rules[r].side(reverse)[0][p].source(named=False)})\\Z"
                                         for r, p in self.slots) or "(?!)")

    @classmethod
    def of(cls, rules: tuple[Rule, ...], reverse: bool) -> "_RuleMatcher":
        matcher = cls._cache.get((id(rules), reverse))
        if matcher is None or matcher.rules is not rules:
            if len(cls._cache) >= 256:  # a long-lived API process: keep the cache small
                cls._cache.clear()
            matcher = cls._cache[(id(rules), reverse)] = cls(rules, reverse)
        return matcher


def _derive(rule: Rule, sources: list[TensorRef], cfg: Config, reverse: bool) -> tuple[list, list, list | None]:
    """Output shapes, dtypes and (a row-moving op on sources alike but for their rows) row blocks; else
    shapes and dtypes from running the op on `meta` tensors. No data either way."""
    first = sources[0]
    try:
        if rule.op.rows and first.shape and all(s.shape[1:] == first.shape[1:] and s.dtype == first.dtype
                                                 for s in sources):
            blocks = rule.op.rows([s.shape[0] for s in sources], cfg, reverse)
            shapes = [(sum(n for _, _, n in out), *first.shape[1:]) for out in blocks]
            return shapes, [first.dtype] * len(blocks), blocks
        metas = [torch.empty(s.shape, dtype=s.dtype.torch, device="meta") for s in sources]
        outs = rule.op.run(metas, cfg, reverse)
    except (RuntimeError, ValueError, KeyError) as e:
        raise BadInput(f"cannot apply {rule.op.name} to {first.name!r} {list(first.shape)}: {e}") from None
    return [tuple(t.shape) for t in outs], [dtypes.from_torch(t.dtype) for t in outs], None


def _group(rule: Rule, sources: list[TensorRef], caps: dict, reverse: bool, cfg: Config,
           default: DType | None) -> Group:
    blocks = None
    if rule.op.zero_copy:  # a rename: the sources are the outputs (no torch needed to know that)
        shapes, out_dtypes = [s.shape for s in sources], [s.dtype for s in sources]
    else:
        shapes, out_dtypes, blocks = _derive(rule, sources, cfg, reverse)
    patterns = rule.side(reverse)[1]
    if rule.renumber:
        try:
            caps = rule.renumber.captures(caps, cfg, reverse)
        except ValueError as e:
            raise BadInput(f"{sources[0].name!r}: {e}") from None
    if rule.gather and rule.gather in patterns[0].fields:
        per = len(shapes) // len(patterns)
        targets = [p.format({**caps, rule.gather: str(k)}) for p in patterns for k in range(per)]
    else:
        targets = [p.format(caps) for p in patterns]
    out_dtypes = [default if default and d.is_float else d for d in out_dtypes]
    return Group(rule, sources, targets, shapes, out_dtypes, reverse, cfg, blocks)
