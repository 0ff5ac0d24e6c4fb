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

from mindformers_conv.mapping import ModelSpec, config_heads, drop_hf, qkv_grouped, rename, transform
from mindformers_conv.registry import register

LAYER = "model.layers.{i}"


FUSED = rename(f"{LAYER}.attention.wqkv.{{p}}", f"{LAYER}.attention.w.{{p}}")
SPLIT = transform(f"{LAYER}.attention.wqkv.{{p}}",
                  [f"{LAYER}.attention.wq.{{p}}", f"{LAYER}.attention.wk.{{p}}", f"{LAYER}.attention.wv.{{p}}"],
                  qkv_grouped(config_heads))

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
