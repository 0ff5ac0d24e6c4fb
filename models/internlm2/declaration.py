"""internlm2: InternLM2-7B/20B (remote code `InternLM2ForCausalLM`).

Facts: spec/mindformers_llm.md §4.10 (HF names already MindFormers' except embedding, final norm, head and
the fused `wqkv`, grouped per KV head: g query heads, then k, then v) and §8 (Float32 without --dtype).

`--qkv_concat`: off by default, so `wqkv` is split into `wq`/`wk`/`wv`; on, it is kept as `attention.w`.
That is MindFormers' default from v1.4.0-beta1 (the flag declared with default False) and what the
model yamls shipped with v1.3.2 (`qkv_concat: False`) load. v1.3.2's root parser does not declare the
flag, so there the bare command keeps `attention.w` (which those yamls do not load, §6.7 #4); its
README's `--qkv_concat True` gives the same file as ours. The reverse takes either layout, flag or not.
"""

from dataclasses import replace

from mindformers_conv.mapping import ModelSpec, drop_hf, qkv_grouped, rename, transform
from mindformers_conv.registry import register

LAYER = "model.layers.{i}"


def heads(cfg) -> tuple[int, int, int]:
    """(query heads, kv heads, head_dim) from config.json, or --n_head / --hidden_size."""
    n_heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    hidden = cfg.get("hidden_size")
    if not n_heads or not hidden:
        raise ValueError("config.json has no num_attention_heads/hidden_size; pass --config_path or "
                         "--n_head and --hidden_size")
    return n_heads, cfg.get("num_key_value_heads") or n_heads, hidden // n_heads


FUSED = rename(f"{LAYER}.attention.wqkv.{{p}}", f"{LAYER}.attention.w.{{p}}")
SPLIT = transform(f"{LAYER}.attention.wqkv.{{p}}",
                  [f"{LAYER}.attention.wq.{{p}}", f"{LAYER}.attention.wk.{{p}}", f"{LAYER}.attention.wv.{{p}}"],
                  qkv_grouped(heads))

INTERNLM2 = register(ModelSpec(
    key="internlm2",
    ms_names_of="llama",  # the MindSpore side is llama's layout
    description="InternLM2-7B/20B",
    model_types=("internlm2",),
    architectures=("InternLM2ForCausalLM",),
    forward_dtype="F32",  # the remote-code loader materialises fp32 under transformers 4.x (§8)
    rules=(
        rename("model.tok_embeddings.weight", "model.tok_embeddings.embedding_weight"),
        # First match wins: forward takes FUSED only under --qkv_concat, else SPLIT; in reverse both MS
        # layouts are known whatever the flag (SPLIT's MS names, and FUSED below it).
        replace(FUSED, when=lambda cfg: bool(cfg.get("qkv_concat"))),
        SPLIT,
        FUSED,
        rename(f"{LAYER}.attention.wo.{{p}}", f"{LAYER}.attention.wo.{{p}}"),
        rename(f"{LAYER}.attention_norm.weight", f"{LAYER}.attention_norm.weight"),
        rename(f"{LAYER}.ffn_norm.weight", f"{LAYER}.ffn_norm.weight"),
        rename(f"{LAYER}.feed_forward.w1.{{p}}", f"{LAYER}.feed_forward.w1.{{p}}"),
        rename(f"{LAYER}.feed_forward.w2.{{p}}", f"{LAYER}.feed_forward.w2.{{p}}"),
        rename(f"{LAYER}.feed_forward.w3.{{p}}", f"{LAYER}.feed_forward.w3.{{p}}"),
        rename("model.norm.weight", "model.norm_out.weight"),
        rename("output.weight", "lm_head.weight"),
        drop_hf(f"{LAYER}.attention.rotary_emb.inv_freq", "rotary inv_freq buffer, recomputed at load"),
    ),
))
