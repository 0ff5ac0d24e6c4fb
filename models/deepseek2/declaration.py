"""deepseek2: DeepSeek-V2 / V2-Chat / V2-Lite (MLA attention, MoE with shared experts).

Facts: spec/mindformers_llm.md §4.4 (names; routed experts stacked per layer [E, out, in] in expert
order; no RoPE permutation; norms and the router Float32, everything else BFloat16; V2-Lite's `q_proj`
and the gmm layout [E, in, out] as added at v1.5.0). MindFormers v1.3.2 has this converter only as a
standalone script that hard-codes 160 experts; the expert count here is config.json's n_routed_experts
(or, without it, how many the input has), and the reverse is the exact inverse.
"""

from mindformers_conv.mapping import ModelSpec, drop_hf, expert_stacks, rename
from mindformers_conv.registry import register

LAYER = "model.layers.{i}"
FP32 = "F32"  # MindFormers stores every name containing "norm" or "dense" (the router) in Float32


def experts(hf: str, ms: str, hidden_axis: int) -> tuple:
    """One projection of the routed experts (`hidden_axis`: see mapping.expert_stacks)."""
    return expert_stacks(f"{LAYER}.mlp.experts.{{e}}.{hf}.weight",
                         f"{LAYER}.feed_forward.routed_experts.ffn.{ms}.weight", hidden_axis)


DEEPSEEK2 = register(ModelSpec(
    key="deepseek2",
    description="DeepSeek-V2 / V2-Chat / V2-Lite (MLA + MoE; --use_gmm for [E, in, out] experts)",
    model_types=("deepseek_v2",),
    architectures=("DeepseekV2ForCausalLM",),
    forward_dtype="BF16",  # the script loads in bf16 and writes bf16, norms and router excepted (below)
    rules=(
        rename("model.embed_tokens.weight", "model.tok_embeddings.embedding_weight"),
        rename(f"{LAYER}.self_attn.q_a_proj.{{p}}", f"{LAYER}.attention.q2l_proj.{{p}}"),
        rename(f"{LAYER}.self_attn.q_a_layernorm.{{p}}", f"{LAYER}.attention.lq_norm.{{p}}", ms_dtype=FP32),
        rename(f"{LAYER}.self_attn.q_b_proj.{{p}}", f"{LAYER}.attention.l2q_proj.{{p}}"),
        rename(f"{LAYER}.self_attn.q_proj.{{p}}", f"{LAYER}.attention.q_proj.{{p}}"),  # V2-Lite (q_lora_rank null)
        rename(f"{LAYER}.self_attn.kv_a_proj_with_mqa.{{p}}", f"{LAYER}.attention.kv2l.{{p}}"),
        rename(f"{LAYER}.self_attn.kv_a_layernorm.{{p}}", f"{LAYER}.attention.lkv_norm.{{p}}", ms_dtype=FP32),
        rename(f"{LAYER}.self_attn.kv_b_proj.{{p}}", f"{LAYER}.attention.lkv2kv.{{p}}"),
        rename(f"{LAYER}.self_attn.o_proj.{{p}}", f"{LAYER}.attention.wo.{{p}}"),
        # dense layers (i < first_k_dense_replace)
        rename(f"{LAYER}.mlp.gate_proj.{{p}}", f"{LAYER}.feed_forward.w1.{{p}}"),
        rename(f"{LAYER}.mlp.down_proj.{{p}}", f"{LAYER}.feed_forward.w2.{{p}}"),
        rename(f"{LAYER}.mlp.up_proj.{{p}}", f"{LAYER}.feed_forward.w3.{{p}}"),
        # MoE layers
        *experts("gate_proj", "w1", hidden_axis=2),
        *experts("down_proj", "w2", hidden_axis=1),
        *experts("up_proj", "w3", hidden_axis=2),
        rename(f"{LAYER}.mlp.shared_experts.gate_proj.{{p}}", f"{LAYER}.feed_forward.shared_experts.w1.{{p}}"),
        rename(f"{LAYER}.mlp.shared_experts.down_proj.{{p}}", f"{LAYER}.feed_forward.shared_experts.w2.{{p}}"),
        rename(f"{LAYER}.mlp.shared_experts.up_proj.{{p}}", f"{LAYER}.feed_forward.shared_experts.w3.{{p}}"),
        rename(f"{LAYER}.mlp.gate.weight", f"{LAYER}.feed_forward.routed_experts.router.dense.weight",
               ms_dtype=FP32),
        rename(f"{LAYER}.input_layernorm.weight", f"{LAYER}.attention_norm.weight", ms_dtype=FP32),
        rename(f"{LAYER}.post_attention_layernorm.weight", f"{LAYER}.ffn_norm.weight", ms_dtype=FP32),
        rename("model.norm.weight", "model.norm_out.weight", ms_dtype=FP32),
        rename("lm_head.weight", "lm_head.weight"),
        drop_hf(f"{LAYER}.self_attn.rotary_emb.inv_freq", "rotary inv_freq buffer, recomputed at load"),
    ),
))
