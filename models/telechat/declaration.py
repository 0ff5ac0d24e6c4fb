"""telechat: TeleChat-7B/12B (remote code; MindFormers reads the `pytorch_model*.bin` files directly).

Facts: spec/mindformers_llm.md §4.12 (names; `key_value` kept fused as `wk_v`, its per-KV-head [k; v]
rows being what the MS attention splits; no transforms; the source dtype is kept).

Two key styles, chosen by --telechat_type in both directions (telechat_12b by default, as in
MindFormers' CLI): telechat_7b (`word_embeddings.weight`, `h.{i}.…`, `ln_f.weight`, no head) and
telechat_12b (`transformer.`-prefixed, plus `lm_head.weight`). MindFormers' unified forward crashes on the
12b layer keys (its regex admits one leading word) and its reverse stores strings and drops the 12b
prefix; both work here.
"""

from mindformers_conv.mapping import ModelSpec, rename
from mindformers_conv.registry import register


def is_7b(cfg) -> bool:
    return cfg.get("telechat_type", "telechat_12b") == "telechat_7b"


def style(prefix: str, when) -> tuple:
    """The name table for one key style (`prefix` = "" for telechat_7b, "transformer." for telechat_12b)."""
    layer, ms = f"{prefix}h.{{i}}", "model.layers.{i}"
    table = (
        (f"{prefix}word_embeddings.weight", "model.tok_embeddings.embedding_weight"),
        (f"{layer}.input_layernorm.weight", f"{ms}.attention_norm.weight"),
        (f"{layer}.self_attention.query.weight", f"{ms}.attention.wq.weight"),
        (f"{layer}.self_attention.key_value.weight", f"{ms}.attention.wk_v.weight"),
        (f"{layer}.self_attention.dense.{{p}}", f"{ms}.attention.wo.{{p}}"),
        (f"{layer}.mlp.gate_proj.weight", f"{ms}.feed_forward.w1.weight"),
        (f"{layer}.mlp.up_proj.weight", f"{ms}.feed_forward.w3.weight"),
        (f"{layer}.mlp.down_proj.{{p}}", f"{ms}.feed_forward.w2.{{p}}"),
        (f"{layer}.post_attention_layernorm.weight", f"{ms}.ffn_norm.weight"),
        (f"{prefix}ln_f.weight", "model.norm_out.weight"),
    )
    return tuple(rename(hf, ms_name, when=when) for hf, ms_name in table)


TELECHAT = register(ModelSpec(
    key="telechat",
    description="TeleChat-7B/12B (--telechat_type telechat_7b or telechat_12b)",
    model_types=("telechat",),
    architectures=("TelechatForCausalLM", "TeleChatForCausalLM"),
    forward_dtype=None,  # pt2ms on the raw .bin tensors keeps their dtype
    rules=(
        *style("", when=is_7b),
        *style("transformer.", when=lambda cfg: not is_7b(cfg)),
        rename("lm_head.weight", "lm_head.weight"),  # telechat_12b
    ),
))
