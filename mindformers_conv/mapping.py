"""The declarative rule language: name patterns with captures, and reversible ops.

A rule relates HF-side tensors to MS-side tensors. "Forward" is HF → MindSpore; the reverse walks the
same rule backwards with the op's inverse. Ops are written once on torch tensors; shapes are derived
by running them on `meta` tensors, so planning never touches data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from .tensor_ref import Shape

Config = dict  # merged config.json + CLI flags


class Pattern:
    """`model.layers.{i}.mlp.{p}` — `{i}`/`{j}`/`{e}` match digits, `{x}` one name part, `{x*}` anything."""

    _FIELD = re.compile(r"\{(\w+)(\*?)\}")

    def __init__(self, text: str):
        self.text = text
        parts, pos = [], 0
        for m in self._FIELD.finditer(text):
            parts.append(re.escape(text[pos:m.start()]))
            name, star = m.groups()
            body = r".+" if star else r"\d+" if name in ("i", "j", "e") else r"[^.]+"
            parts.append(f"(?P<{name}>{body})")
            pos = m.end()
        parts.append(re.escape(text[pos:]))
        self.regex = re.compile("".join(parts) + r"\Z")
        self.fields = tuple(m.group(1) for m in self._FIELD.finditer(text))

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

    def run(self, tensors: list[torch.Tensor], cfg: Config, reverse: bool) -> list[torch.Tensor]:
        return (self.backward if reverse else self.forward)(tensors, cfg)

    def shapes(self, shapes: list[Shape], cfg: Config, reverse: bool) -> list[Shape]:
        metas = [torch.empty(s, device="meta") for s in shapes]
        return [tuple(t.shape) for t in self.run(metas, cfg, reverse)]


IDENTITY = Op("rename", lambda xs, cfg: xs, lambda xs, cfg: xs, zero_copy=True)
TRANSPOSE = Op("transpose", lambda xs, cfg: [xs[0].t()], lambda xs, cfg: [xs[0].t()])
DROP = Op("drop", lambda xs, cfg: [], lambda xs, cfg: [])


@dataclass(frozen=True)
class Rule:
    hf: tuple[Pattern, ...]
    ms: tuple[Pattern, ...]
    op: Op = IDENTITY
    why: str = ""  # for drops: shown in the summary of what was left out

    def side(self, reverse: bool) -> tuple[tuple[Pattern, ...], tuple[Pattern, ...]]:
        """(source patterns, target patterns) for this direction."""
        return (self.ms, self.hf) if reverse else (self.hf, self.ms)


def _patterns(texts) -> tuple[Pattern, ...]:
    return tuple(Pattern(t) for t in ([texts] if isinstance(texts, str) else texts))


def rename(hf: str, ms: str) -> Rule:
    return Rule(_patterns(hf), _patterns(ms))


def transpose(hf: str, ms: str) -> Rule:
    return Rule(_patterns(hf), _patterns(ms), TRANSPOSE)


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
    extra_rules: tuple[Rule, ...] = field(default=TRAINING_STATE, repr=False)

    def all_rules(self) -> tuple[Rule, ...]:
        return self.rules + self.extra_rules

    def variant(self, key: str, description: str, **changes) -> "ModelSpec":
        """The same declaration under another key (e.g. yi and deepseek reuse llama's)."""
        return replace(self, key=key, description=description, family=self.family or self.key, **changes)
