"""telechat2-mcore: TeleChat2 (remote code, `transformer.`-prefixed names) in MindFormers 2.x mcore names.

Facts: spec/mindformers_other.md §3.3 (telechat2 weight_mapping; HF `key_value` holds per KV head hd rows
of k then hd rows of v; fused training layouts, models/mcore/rules.py) and spec/mindformers_llm.md §4.12
(the HF names, as the legacy `telechat` key's telechat_12b style). config.json says `telechat` as for
TeleChat-7B/12B, so --model auto keeps choosing the legacy key; pass --model telechat2-mcore.
"""

from models.mcore.rules import MS, QKV_CONTIGUOUS, contiguous_attention, either, mlp

from mindformers_conv.mapping import (Config, ModelSpec, compose, config_heads, grouped_rows, invert, qkv_grouped,
                                      rename)
from mindformers_conv.registry import register

HF = "transformer.h.{i}"


def query_key_value(cfg: Config) -> tuple[int, list[int]]:
    """Per KV group: its g query heads, then its key_value rows (k then v): the grouped linear_qkv."""
    n_heads, n_kv, head_dim = config_heads(cfg)
    if n_kv <= 0 or n_heads % n_kv:
        raise ValueError(f"{n_heads} heads cannot be grouped over {n_kv} kv heads")
    return n_kv, [n_heads // n_kv * head_dim, 2 * head_dim]


# (query, key_value) → grouped linear_qkv; the contiguous [q; k; v] goes on through q, k, v.
QKV_GROUPED = invert(grouped_rows(query_key_value))

TELECHAT2_MCORE = register(ModelSpec(
    key="telechat2-mcore",
    description="TeleChat2, MindFormers 2.x mcore names (key_value split into a fused linear_qkv)",
    ms_names_of="qwen2-mcore",  # the MindSpore names of its layers are qwen2-mcore's
    rules=(
        rename("transformer.word_embeddings.weight", "embedding.word_embeddings.weight"),
        rename("transformer.ln_f.weight", "decoder.final_layernorm.weight"),
        rename("lm_head.weight", "output_layer.weight"),
        rename(f"{HF}.input_layernorm.weight", f"{MS}.input_layernorm.weight"),
        rename(f"{HF}.post_attention_layernorm.weight", f"{MS}.pre_mlp_layernorm.weight"),
        *either([f"{HF}.self_attention.query.{{p}}", f"{HF}.self_attention.key_value.{{p}}"],
                f"{MS}.self_attention.linear_qkv.{{p}}", contiguous_attention,
                compose(QKV_GROUPED, qkv_grouped(config_heads), QKV_CONTIGUOUS), QKV_GROUPED),
        rename(f"{HF}.self_attention.dense.{{p}}", f"{MS}.self_attention.linear_proj.{{p}}"),
        *mlp(f"{HF}.mlp", f"{MS}.mlp"),
    ),
))
