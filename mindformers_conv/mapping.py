"""The declarative rule language: name patterns with captures, and reversible ops.

A rule relates HF-side tensors to MS-side tensors. "Forward" is HF → MindSpore; the reverse walks the
same rule backwards with the op's inverse. Ops are written once on torch tensors; shapes are derived
by running them on `meta` tensors, so planning never touches data. An op that only moves whole rows
(split, concat, QKV grouping) also declares its row map: planned and written from it, its outputs are
windows of the source files (no torch at all).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Callable


from .errors import UsageError
from .tensor_ref import Shape
from .lazy import torch

Config = dict  # merged config.json + CLI flags
Block = tuple[int, int, int]  # (source index, first row, row count): rows of one source, in place
# Source row counts (axis 0), config, reverse → per output, its row blocks in order.
RowMap = Callable[[list[int], Config, bool], list[list[Block]]]


class Pattern:
    """`model.layers.{i}.mlp.{p}` — `{i}`/`{j}`/`{e}` match digits, `{x}` one name part, `{x*}` anything."""

    _FIELD = re.compile(r"\{(\w+)(\*?)\}")

    def __init__(self, text: str):
        self.text = text
        self.fields = tuple(m.group(1) for m in self._FIELD.finditer(text))

    @cached_property
    def regex(self) -> re.Pattern:
        """Compiled on first match: a run matches one model's patterns, start-up declares them all."""
        return re.compile(self.source() + r"\Z")

    def source(self, named: bool = True) -> str:
        """The regular expression, its fields as named groups (or unnamed, non-capturing ones)."""
        parts, pos = [], 0
        for m in self._FIELD.finditer(self.text):
            parts.append(re.escape(self.text[pos:m.start()]))
            name, star = m.groups()
            body = r".+" if star else r"\d+" if name in ("i", "j", "e") else r"[^.]+"
            parts.append(f"(?P<{name}>{body})" if named else f"(?:{body})")
            pos = m.end()
        parts.append(re.escape(self.text[pos:]))
        return "".join(parts)

    def match(self, name: str) -> dict[str, str] | None:
        m = self.regex.match(name)
        return m.groupdict() if m else None

    def format(self, captures: dict[str, str]) -> str:
        return self._FIELD.sub(lambda m: captures[m.group(1)], self.text)

    def __repr__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Op:
    """A reversible transform from the HF-side tensors of a rule to its MS-side tensors."""

    name: str
    forward: Callable[[list[torch.Tensor], Config], list[torch.Tensor]]
    backward: Callable[[list[torch.Tensor], Config], list[torch.Tensor]]
    zero_copy: bool = False  # outputs are the inputs' bytes unchanged
    rows: RowMap | None = field(default=None, compare=False)  # when the outputs are row blocks of the inputs

    def run(self, tensors: list[torch.Tensor], cfg: Config, reverse: bool) -> list[torch.Tensor]:
        return (self.backward if reverse else self.forward)(tensors, cfg)

    def shapes(self, shapes: list[Shape], cfg: Config, reverse: bool) -> list[Shape]:
        metas = [torch.empty(s, device="meta") for s in shapes]
        return [tuple(t.shape) for t in self.run(metas, cfg, reverse)]


IDENTITY = Op("rename", lambda xs, cfg: xs, lambda xs, cfg: xs, zero_copy=True)
TRANSPOSE = Op("transpose", lambda xs, cfg: [xs[0].t()], lambda xs, cfg: [xs[0].t()])
DROP = Op("drop", lambda xs, cfg: [], lambda xs, cfg: [])
# Experts {e} of one projection ↔ one [E, …] tensor (rules using it gather the `e` capture).
STACK = Op("stack", lambda xs, cfg: [torch.stack(xs)], lambda xs, cfg: list(xs[0].unbind(0)))
# [E, out, in] ↔ [E, in, out] (MindFormers' grouped-matmul "gmm" layout).
SWAP_LAST = Op("swap_last", lambda xs, cfg: [xs[0].transpose(-1, -2)], lambda xs, cfg: [xs[0].transpose(-1, -2)])


def invert(op: Op) -> Op:
    """The same transform declared from the other side (e.g. concat is an inverted split)."""
    rows = (lambda counts, cfg, reverse: op.rows(counts, cfg, not reverse)) if op.rows else None
    return Op(f"inverse {op.name}", op.backward, op.forward, op.zero_copy, rows)


def compose(*ops: Op) -> Op:
    """Ops applied in turn forward, and their inverses in reverse order backward."""

    def forward(xs, cfg):
        for op in ops:
            xs = op.forward(xs, cfg)
        return xs

    def backward(xs, cfg):
        for op in reversed(ops):
            xs = op.backward(xs, cfg)
        return xs

    return Op(" + ".join(op.name for op in ops), forward, backward)


Sizes = Callable[[Config, int], list[int]]


def equal_parts(n: int) -> Sizes:
    """Split sizes for `n` equal parts of an axis."""
    return lambda cfg, total: [total // n] * n


def split(sizes: Sizes, dim: int = 0) -> Op:
    """One tensor → parts along `dim` (sizes from config and the axis length); backward concatenates."""

    def parts_of(cfg, total):
        parts = sizes(cfg, total)
        if sum(parts) != total:
            raise ValueError(f"axis {dim} has {total} rows, the split needs {sum(parts)}")
        return parts

    def rows(counts, cfg, reverse):
        if reverse:
            return [[(i, 0, n) for i, n in enumerate(counts)]]
        firsts = [0]
        for n in parts_of(cfg, counts[0]):
            firsts.append(firsts[-1] + n)
        return [[(0, a, b - a)] for a, b in zip(firsts, firsts[1:])]

    return Op("split", lambda xs, cfg: list(torch.split(xs[0], parts_of(cfg, xs[0].shape[dim]), dim)),
              lambda xs, cfg: [torch.cat(xs, dim)], rows=rows if dim == 0 else None)


Heads = Callable[[Config], tuple[int, int, int]]  # (query heads, kv heads, head_dim)


def qkv_grouped(heads: Heads) -> Op:
    """Fused QKV grouped per KV head (g query heads, then k, then v per group) ↔ separate q, k, v.

    Megatron's layout and InternLM2's `wqkv`; with kv heads = heads and g = 1 it is also the per-head
    interleave of BLOOM. Works for weights [rows, in] and biases [rows]; head_dim need not be hidden/heads.
    """

    def grouping(cfg) -> tuple[int, int, int]:
        """(kv heads, query heads per group, head_dim)."""
        nh, nkv, hd = heads(cfg)
        if nkv <= 0 or nh % nkv:
            raise ValueError(f"{nh} heads cannot be grouped over {nkv} kv heads")
        return nkv, nh // nkv, hd

    def fused(cfg, rows: int) -> tuple[int, int, int]:
        nkv, g, hd = grouping(cfg)
        if rows != nkv * (g + 2) * hd:
            raise ValueError(f"fused qkv has {rows} rows, {nkv * g}/{nkv} heads of {hd} need {nkv * (g + 2) * hd}")
        return nkv, g, hd

    def separate(cfg, q: int, k: int, v: int) -> tuple[int, int, int]:
        nkv, g, hd = grouping(cfg)
        if (q, k, v) != (nkv * g * hd, nkv * hd, nkv * hd):
            raise ValueError(f"q/k/v have {q}/{k}/{v} rows, but {nkv * g} heads and {nkv} kv heads of {hd} need "
                             f"{nkv * g * hd}/{nkv * hd}/{nkv * hd}; does config.json describe it?")
        return nkv, g, hd

    def forward(xs, cfg):
        x = xs[0]
        nkv, g, hd = fused(cfg, x.shape[0])
        grouped = x.reshape(nkv, g + 2, hd, *x.shape[1:])
        q = grouped[:, :g].reshape(nkv * g * hd, *x.shape[1:])
        k = grouped[:, g].reshape(nkv * hd, *x.shape[1:])
        v = grouped[:, g + 1].reshape(nkv * hd, *x.shape[1:])
        return [q, k, v]

    def backward(xs, cfg):
        q, k, v = xs
        nkv, g, hd = separate(cfg, q.shape[0], k.shape[0], v.shape[0])
        rest = q.shape[1:]
        grouped = torch.cat([q.reshape(nkv, g, hd, *rest), k.reshape(nkv, 1, hd, *rest),
                             v.reshape(nkv, 1, hd, *rest)], dim=1)
        return [grouped.reshape(-1, *rest)]

    def rows(counts, cfg, reverse):
        if reverse:  # q, k, v → per group j: its g query heads, then k_j, then v_j
            nkv, g, hd = separate(cfg, *counts)
            return [[b for j in range(nkv) for b in ((0, j * g * hd, g * hd), (1, j * hd, hd), (2, j * hd, hd))]]
        nkv, g, hd = fused(cfg, counts[0])
        size = (g + 2) * hd
        return [[(0, j * size + at, n) for j in range(nkv)] for at, n in ((0, g * hd), (g * hd, hd), ((g + 1) * hd, hd))]

    return Op("qkv_grouped", forward, backward, rows=rows)


def config_section(cfg: Config, section: str | None) -> Config:
    """A nested config (e.g. `text_config`) when present, else the top level (older config.json files)."""
    return (cfg.get(section) or cfg) if section else cfg


def attention_heads(section: str | None = None, heads: tuple[str, ...] = ("num_attention_heads", "n_head"),
                    kv: str | None = "num_key_value_heads", hidden: str = "hidden_size") -> Heads:
    """(query heads, kv heads, head_dim) read from config.json (a `section` of it) or --n_head /
    --hidden_size, the first of the `heads` keys present; head_dim may differ from hidden / heads."""

    def read(cfg: Config) -> tuple[int, int, int]:
        c = config_section(cfg, section)
        nh = next((c[k] for k in heads if c.get(k)), None)
        if not nh or not c.get(hidden):
            where = f"{section}." if section else ""
            raise UsageError(f"config.json has no {where}{heads[0]}/{hidden}; pass --config_path with the HF "
                             "config.json (or --n_head and --hidden_size)")
        nkv = (c.get(kv) if kv else None) or nh
        return nh, nkv, c.get("head_dim") or c[hidden] // nh

    return read


config_heads = attention_heads()  # a decoder's heads from the top level of config.json


def interleave_rows(n: int) -> Op:
    """n tensors of equal rows ↔ one whose rows alternate (a0, b0, a1, b1, …): MindFormers' w_gate_hidden."""

    def forward(xs, cfg):
        return [torch.stack(xs, dim=1).reshape(-1, *xs[0].shape[1:])]

    def backward(xs, cfg):
        x = xs[0]
        return list(x.reshape(x.shape[0] // n, n, *x.shape[1:]).unbind(1))

    return Op("interleave_rows", forward, backward)


def grouped_rows(layout: Callable[[Config], tuple[int, list[int]]]) -> Op:
    """One tensor of `groups` row blocks, each holding the parts' rows in turn ↔ the parts (each its rows of
    every group, in group order); `layout` gives (groups, rows of each part per group). TeleChat's
    `key_value` is (kv heads, [hd, hd]). Weights [rows, in] and biases [rows] alike.
    """

    def forward(xs, cfg):
        (groups, sizes), x = layout(cfg), xs[0]
        if x.shape[0] != groups * sum(sizes):
            raise ValueError(f"{x.shape[0]} rows are not {groups} groups of {'+'.join(map(str, sizes))}")
        parts = x.reshape(groups, sum(sizes), *x.shape[1:]).split(sizes, dim=1)
        return [p.reshape(-1, *x.shape[1:]) for p in parts]

    def backward(xs, cfg):
        groups, rest = layout(cfg)[0], xs[0].shape[1:]
        return [torch.cat([x.reshape(groups, -1, *rest) for x in xs], dim=1).reshape(-1, *rest)]

    return Op("grouped_rows", forward, backward)


def experts_matrix(parts: int, inner: Callable[[Config], int]) -> Op:
    """Per-expert [out, in] weights of `parts` projections (every expert of the first, then of the next) ↔
    one [E·in, parts·out] matrix: per expert its projections side by side ([gate | up]) transposed, the
    experts one after another down the rows (MindFormers' GroupedMLP weight1 / weight2). `inner`: `in`,
    from the config (the reverse needs it to tell E from in).
    """

    def forward(xs, cfg):
        if len(xs) % parts:
            raise ValueError(f"{len(xs)} expert weights do not make {parts} projections")
        experts, (out, size) = len(xs) // parts, xs[0].shape
        stacked = torch.stack(xs).reshape(parts, experts, out, size)
        return [stacked.permute(1, 3, 0, 2).reshape(experts * size, parts * out)]

    def backward(xs, cfg):
        (rows, cols), size = xs[0].shape, inner(cfg)
        if rows % size or cols % parts:
            raise ValueError(f"[{rows}, {cols}] is not experts of [{size}, {parts}·out]")
        split = xs[0].reshape(rows // size, size, parts, cols // parts).permute(2, 0, 3, 1)
        return list(split.reshape(-1, cols // parts, size).unbind(0))

    return Op("experts_matrix", forward, backward)


@dataclass(frozen=True)
class Renumber:
    """A capture numbered differently on the two sides: HF's `n` is MS's `table(cfg)[n]` (Qwen3-VL's
    deepstack merger j sits under ViT block `deepstack_visual_indexes[j]` in MindSpeed-MM)."""

    field: str
    table: Callable[[Config], list[int]]

    def captures(self, caps: dict, cfg: Config, reverse: bool) -> dict:
        table, n = list(self.table(cfg)), int(caps[self.field])
        if reverse and n not in table:
            raise ValueError(f"{self.field} = {n} is none of {table}")
        if not reverse and n >= len(table):
            raise ValueError(f"{self.field} = {n} is beyond the {len(table)} entries of {table}")
        return {**caps, self.field: str(table.index(n) if reverse else table[n])}


@dataclass(frozen=True)
class Rule:
    hf: tuple[Pattern, ...]
    ms: tuple[Pattern, ...]
    op: Op = IDENTITY
    why: str = ""  # for drops: shown in the summary of what was left out
    gather: str | None = None  # a capture whose every value feeds one application (e.g. experts {e})
    ms_dtype: str | None = None  # dtype MindFormers forces for this tensor when --dtype is absent
    hf_dtype: str | None = None  # its dtype in HF checkpoints whatever the model's (DeepSeek's fp32 router bias)
    when: Callable[[Config], bool] | None = field(default=None, compare=False)  # active only if true
    renumber: Renumber | None = None  # a capture whose number differs between the sides

    def side(self, reverse: bool) -> tuple[tuple[Pattern, ...], tuple[Pattern, ...]]:
        """(source patterns, target patterns) for this direction."""
        return (self.ms, self.hf) if reverse else (self.hf, self.ms)


def _patterns(texts) -> tuple[Pattern, ...]:
    return tuple(Pattern(t) for t in ([texts] if isinstance(texts, str) else texts))


def rename(hf: str, ms: str, **kw) -> Rule:
    return Rule(_patterns(hf), _patterns(ms), **kw)


def transform(hf, ms, op: Op, **kw) -> Rule:
    """HF pattern(s) ↔ MS pattern(s) through `op` (declared HF → MS)."""
    return Rule(_patterns(hf), _patterns(ms), op, **kw)


def stack_experts(hf: str, ms: str, op: Op = STACK) -> Rule:
    """Per-expert HF tensors (`{e}` in the name) ↔ one stacked MS tensor."""
    return Rule(_patterns(hf), _patterns(ms), op, gather="e")


def use_gmm(cfg: Config) -> bool:
    return bool(cfg.get("use_gmm"))


def hidden_at(axis: int) -> Op:
    """Identity that refuses stacked experts whose `axis` is not hidden_size.

    [E, out, in] and [E, in, out] differ only in shape, so a reverse with the wrong --use_gmm would
    otherwise write every expert transposed; config.json's hidden_size tells them apart.
    """

    def check(xs, cfg):
        hidden = cfg.get("hidden_size")
        if isinstance(hidden, int) and xs[0].shape[axis] != hidden:
            hint = "without --use_gmm" if use_gmm(cfg) else "with --use_gmm"
            raise ValueError(f"axis {axis} is not hidden_size {hidden}: experts in the other layout (run {hint})")
        return xs

    return Op("check_hidden_axis", check, check)


def expert_stacks(hf: str, ms: str, hidden_axis: int) -> tuple[Rule, Rule]:
    """Per-expert HF tensors (`{e}`) ↔ one MS stack: [E, out, in], or MindFormers' gmm [E, in, out] under
    --use_gmm. `hidden_axis`: where hidden_size sits in [E, out, in] (2 for gate/up, 1 for down); the
    reverse refuses a stack in the other layout instead of writing every expert transposed.
    """
    return (replace(stack_experts(hf, ms, compose(STACK, SWAP_LAST, hidden_at(3 - hidden_axis))), when=use_gmm),
            replace(stack_experts(hf, ms, compose(STACK, hidden_at(hidden_axis))),
                    when=lambda cfg: not use_gmm(cfg)))


def drop_hf(pattern: str, why: str) -> Rule:
    """HF tensors that have no MindSpore counterpart (e.g. rotary inv_freq buffers)."""
    return Rule(_patterns(pattern), (), DROP, why)


def drop_ms(pattern: str, why: str) -> Rule:
    """MindSpore checkpoint entries that are not model weights (optimizer and loop state)."""
    return Rule((), _patterns(pattern), DROP, why)


# What MindSpore training checkpoints hold besides the network's parameters.
TRAINING_STATE = tuple(drop_ms(p, "training state") for p in (
    "adam_m.{rest*}", "adam_v.{rest*}", "accu_grads.{rest*}", "moments.{rest*}", "global_step", "scale_sense",
    "learning_rate", "current_iterator_step", "last_overflow_iterator_step", "epoch_num", "step_num", "loss_scale",
))


# MindFormers' LoRA suffixes: mindpet's LoRADense (qwen, baichuan, …), the older llama/glm `tk_delta_lora`,
# and the plain `lora` of `--is_lora` (v1.4+). Each has `_a` ([r, in]) and `_b` ([out, r]).
LORA_STYLES = ("mindpet_delta_lora", "tk_delta_lora", "lora")
MEGATRON_LORA = "lora_{AB}.default.weight"  # MindSpeed-MM's LoRA names (megatron_layout.md §6.3)


def lora_rules(rules: tuple[Rule, ...], style: str) -> tuple[Rule, ...]:
    """LoRA A/B of every renamed linear: HF `{module}.lora_A.weight` ↔ MS `{module'}.{style}_a`.

    Derived from the plain renames of `….weight` / `….{p}` (a transposed or split weight has no such
    simple LoRA counterpart, so its LoRA stays unmapped and is reported). Forward writes `style`; the
    reverse reads every style.
    """
    derived = []
    for rule in rules:
        if rule.op is not IDENTITY or len(rule.hf) != 1 or len(rule.ms) != 1 or rule.gather or rule.renumber:
            continue
        hf, ms = rule.hf[0].text, rule.ms[0].text
        tail = next((t for t in (".weight", ".{p}") if hf.endswith(t) and ms.endswith(t)), None)
        if tail is None:
            continue
        for suffix in (style,) if style == MEGATRON_LORA else (style, *(s for s in LORA_STYLES if s != style)):
            for ab in ("a", "b"):
                name = suffix.format(AB=ab.upper()) if suffix == MEGATRON_LORA else f"{suffix}_{ab}"
                derived.append(Rule(_patterns(f"{hf[:-len(tail)]}.lora_{ab.upper()}.weight"),
                                    _patterns(f"{ms[:-len(tail)]}.{name}"), when=rule.when))
    return tuple(derived)


@dataclass(frozen=True)
class Alias:
    """A tensor MindSpore stores once that the HF side holds again: reading a MindSpore input, `name`
    (a pattern) is `of` wherever an input name matches `where`, and a rule maps it to the HF copy."""

    name: str
    of: str
    where: str


@dataclass(frozen=True)
class ModelSpec:
    """One model key: its rules plus what --model auto and the default dtype need to know."""

    key: str
    description: str
    rules: tuple[Rule, ...]
    model_types: tuple[str, ...] = ()  # config.json model_type values served
    architectures: tuple[str, ...] = ()  # config.json architectures served
    forward_dtype: str | None = None  # MS dtype when --dtype is absent (None: keep the source dtype)
    tied: tuple[str, str] | None = None  # (output head, embedding) HF names shared when tie_word_embeddings
    family: str = ""  # the key whose declaration this one reuses ("" = itself)
    pickle_wrap: str | None = None  # reverse .bin holds {pickle_wrap: state_dict} (vit/mae/blip), else flat
    layers_flag: bool = False  # --layers N converts layers {i} < N only (gpt, wizardcoder)
    covers: tuple[str, ...] = ()  # other keys this key also accepts, picked from the input (qwen → qwen2)
    ms_names_of: str = ""  # the key whose MindSpore names these are too (--model auto prefers that key)
    layout_of: Callable[[Config], str] | None = field(default=None, compare=False)  # which variant, said
    lora_style: str = "mindpet_delta_lora"  # MindFormers' LoRA parameter suffix (`…_a` / `…_b`) written forward
    extra_rules: tuple[Rule, ...] = field(default=TRAINING_STATE, repr=False)
    # A Megatron model: the MS side names full Megatron tensors and this MegatronLayout places them.
    megatron: object = field(default=None, repr=False)
    # Rules whose names config.json decides (DeepSeek-V3's MTP layers are numbered after the decoder's);
    # they come before `rules`.
    config_rules: Callable[[Config], tuple[Rule, ...]] | None = field(default=None, compare=False)
    aliases: tuple[Alias, ...] = ()  # tensors MindSpore stores once and HF twice

    def all_rules(self, cfg: Config | None = None, lora: bool = True) -> tuple[Rule, ...]:
        """The rules in force: all of them, or (given a config) those whose `when` holds; without the LoRA
        rules when `lora` is false (every LoRA name has `lora` in it: a plan of names without skips them).

        LoRA rules come first: a MindSpore LoRA name (`….wq.tk_delta_lora_a`) would match `….wq.{p}`.
        """
        style = "lora" if cfg and cfg.get("is_lora") else self.lora_style  # v1.4+'s `--is_lora` names
        own = self.config_rules(cfg) + self.rules if cfg is not None and self.config_rules else self.rules
        rules = (lora_rules(self.rules, style) if lora else ()) + own + self.extra_rules
        return rules if cfg is None else tuple(r for r in rules if r.when is None or r.when(cfg))

    def variant(self, key: str, description: str, **changes) -> "ModelSpec":
        """The same declaration under another key (e.g. yi and deepseek reuse llama's)."""
        return replace(self, key=key, description=description, family=self.family or self.key, **changes)
