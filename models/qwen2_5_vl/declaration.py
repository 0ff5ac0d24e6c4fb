"""qwen2_5_vl: Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) ↔ MindSpeed-MM's Megatron layout.

Qwen2-VL's declaration (models/qwen2_vl) with the differences of spec/megatron_layout.md §6.3 and §3.3:
the ViT MLP is gated with biases (`mlp.gate_proj` + `up_proj`, weight and bias → `mlp.linear_fc1` =
[gate; up], GLU-split over TP; `down_proj` → `linear_fc2`), the ViT norms and the merger's `ln_q` are
RMSNorms (weight only, same names), and the ViT width is `vision_config.hidden_size` (Qwen2-VL's
`embed_dim`). The text decoder, merger, pipeline schemas and tied head are Qwen2-VL's.

HF names: transformers 4.x writes `visual.*`, `model.*`, `lm_head.weight` (what `save_pretrained`
writes up to 4.57, and the published checkpoints); the later `model.visual.*` / `model.language_model.*`
names are read too. The reverse writes the former, which every transformers version loads.
"""

from dataclasses import replace

from models.llama.megatron import GATE_UP, gpt_rules, gpt_tp
from models.qwen2_vl.declaration import HF_BLOCK, QWEN2_VL, QWEN2_VL_LAYOUT, TEXT, TEXT_HEADS, VISION, VISION_TP, VIT

from mindformers_conv.mapping import (Pattern, Rule, attention_heads, compose, equal_parts, invert, qkv_grouped, rename,
                                      split, transform)
from mindformers_conv.megatron.tensor_parallel import GLU, qkv
from mindformers_conv.registry import register_megatron

# vision_config.hidden_size is the ViT width here (Qwen2-VL: embed_dim; out_hidden_size is the LLM's).
VIT_HEADS = attention_heads("vision_config", heads=("num_heads",), kv=None, hidden="hidden_size")
QKV, FC1 = f"{VIT}.self_attention.linear_qkv.{{p}}", f"{VIT}.mlp.linear_fc1.{{p}}"
_REPLACED = {f"{HF_BLOCK}.attn.qkv.{{p}}", f"{HF_BLOCK}.mlp.fc1.{{p}}", f"{HF_BLOCK}.mlp.fc2.{{p}}"}

VISION_25 = (
    *(r for r in VISION if r.hf[0].text not in _REPLACED),
    transform(f"{HF_BLOCK}.attn.qkv.{{p}}", QKV,
              compose(split(equal_parts(3)), invert(qkv_grouped(VIT_HEADS)))),  # [Q; K; V] → per head
    transform([f"{HF_BLOCK}.mlp.gate_proj.{{p}}", f"{HF_BLOCK}.mlp.up_proj.{{p}}"], FC1, GATE_UP),
    rename(f"{HF_BLOCK}.mlp.down_proj.{{p}}", f"{VIT}.mlp.linear_fc2.{{p}}"),
)
VISION_TP_25 = (
    *((p, s) for p, s in VISION_TP if p not in (QKV, FC1)),
    (QKV, qkv(VIT_HEADS)),
    (FC1, GLU),
)


def hf_prefixed(rules: tuple[Rule, ...], old: str, new: str) -> tuple[Rule, ...]:
    """The rules whose HF names start with `old`, reading `new…` names instead (the Megatron side kept)."""
    return tuple(replace(r, hf=tuple(Pattern(new + p.text[len(old):]) for p in r.hf))
                 for r in rules if all(p.text.startswith(old) for p in r.hf))


TEXT_RULES = gpt_rules(TEXT_HEADS, mg=TEXT)
# First match wins: the reverse writes the 4.x names; the later names only ever match as a source.
RULES = (VISION_25 + TEXT_RULES + hf_prefixed(VISION_25, "visual.", "model.visual.")
         + hf_prefixed(TEXT_RULES, "model.", "model.language_model."))

QWEN2_5_VL = register_megatron(replace(
    QWEN2_VL,
    key="qwen2_5_vl",
    description="Qwen2.5-VL (MindSpeed-MM Megatron layout only)",
    model_types=("qwen2_5_vl",),
    architectures=("Qwen2_5_VLForConditionalGeneration",),
    rules=RULES,
    megatron=replace(QWEN2_VL_LAYOUT, tp_rules=VISION_TP_25 + gpt_tp(TEXT_HEADS, TEXT)),
))
