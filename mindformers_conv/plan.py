"""Source headers + a model's rules → a Plan: every output tensor, its shape, dtype and recipe.

Planning reads no tensor data. It enforces coverage: every source tensor is used or explicitly
dropped, every rule group is complete, every target is produced exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import dtypes
from .dtypes import DType
from .errors import BadInput, UnmappedTensor
from .mapping import DROP, Config, ModelSpec, Rule
from .tensor_ref import Shape, TensorRef, numel


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

    @property
    def zero_copy(self) -> bool:
        return self.rule.op.zero_copy and all(d == s.dtype for d, s in zip(self.dtypes, self.sources))

    @property
    def work_bytes(self) -> int:
        """Memory the recipe needs at once (0 when bytes are copied file to file)."""
        if self.zero_copy:
            return 0
        return sum(s.nbytes for s in self.sources) + sum(numel(s) * d.itemsize for s, d in zip(self.shapes, self.dtypes))

    def compute(self) -> list[torch.Tensor]:
        outs = self.rule.op.run([s.read() for s in self.sources], self.cfg, self.reverse)
        return [dtypes.cast(t, d).contiguous() for t, d in zip(outs, self.dtypes)]


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


def build_plan(spec: ModelSpec, refs: dict[str, TensorRef], *, reverse: bool, dtype: DType | None,
               cfg: Config, allow_unmapped: bool = False, keep_tied: bool = True) -> Plan:
    """Match every source name against the rules (first match wins) and derive the targets."""
    refs = _with_tied_alias(spec, refs, reverse, cfg)
    rules = spec.all_rules()
    groups: dict[tuple, dict[int, TensorRef]] = {}
    unmapped = []
    for name, ref in refs.items():
        key = match_rule(rules, name, reverse)
        if key is None:
            unmapped.append(name)
        else:
            rule_index, caps, pattern_index = key
            groups.setdefault((rule_index, caps), {})[pattern_index] = ref
    plan = Plan(spec, reverse, cfg, [])
    produced: dict[str, str] = {}
    default = dtype or (None if reverse else dtypes.BY_CODE.get(spec.forward_dtype or ""))
    for (rule_index, caps), members in groups.items():
        rule = rules[rule_index]
        sources_p, targets_p = rule.side(reverse)
        if len(members) != len(sources_p):
            missing = [p.format(dict(caps)) for i, p in enumerate(sources_p) if i not in members]
            names = [members[i].name for i in sorted(members)]
            if not allow_unmapped:
                raise UnmappedTensor(f"{names[0]!r} needs {missing[0]!r}, which the input does not have")
            unmapped.extend(names)
            continue
        sources = [members[i] for i in range(len(sources_p))]
        if rule.op is DROP:
            plan.dropped.setdefault(rule.why, []).extend(s.name for s in sources)
            continue
        group = _group(rule, sources, [p.format(dict(caps)) for p in targets_p], reverse, cfg, default)
        for index, target in enumerate(group.targets):
            if target in produced:
                raise BadInput(f"both {produced[target]!r} and {sources[0].name!r} map to {target!r}")
            produced[target] = sources[0].name
            plan.tensors.append(Planned(target, group.dtypes[index], group.shapes[index], group, index))
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


def _with_tied_alias(spec: ModelSpec, refs: dict[str, TensorRef], reverse: bool, cfg: Config):
    """Forward with tie_word_embeddings: an HF file stores no head; MindFormers' state_dict() emits one."""
    if reverse or not spec.tied or not cfg.get("tie_word_embeddings"):
        return refs
    head, embedding = spec.tied
    if head in refs or embedding not in refs:
        return refs
    return {**refs, head: refs[embedding].renamed(head)}


def match_rule(rules: tuple[Rule, ...], name: str, reverse: bool):
    for rule_index, rule in enumerate(rules):
        for pattern_index, pattern in enumerate(rule.side(reverse)[0]):
            caps = pattern.match(name)
            if caps is not None:
                return rule_index, tuple(sorted(caps.items())), pattern_index
    return None


def _group(rule: Rule, sources: list[TensorRef], targets: list[str], reverse: bool, cfg: Config,
           default: DType | None) -> Group:
    metas = [torch.empty(s.shape, dtype=s.dtype.torch, device="meta") for s in sources]
    try:
        outs = rule.op.run(metas, cfg, reverse)
    except (RuntimeError, ValueError, KeyError) as e:
        raise BadInput(f"cannot apply {rule.op.name} to {sources[0].name!r} {list(sources[0].shape)}: {e}") from None
    shapes = [tuple(t.shape) for t in outs]
    out_dtypes = [dtypes.from_torch(t.dtype) for t in outs]
    out_dtypes = [default if default and d.is_float else d for d in out_dtypes]
    return Group(rule, sources, targets, shapes, out_dtypes, reverse, cfg)
