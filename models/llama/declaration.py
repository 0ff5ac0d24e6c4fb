"""llama: Llama 1/2/3/3.1 and CodeLlama; yi and deepseek (v1) reuse the same declaration.

Facts: spec/mindformers_llm.md §4.1–§4.3 (names; no transposes; tied head emitted by state_dict()).
"""

from mindformers_conv.mapping import ModelSpec, drop_hf, rename
from mindformers_conv.registry import register

LLAMA = register(ModelSpec(
    key="llama",
    description="Llama, Llama 2/3/3.1, CodeLlama",
    model_types=("llama",),
    architectures=("LlamaForCausalLM",),
    forward_dtype="F32",  # v1.3.2 loads through transformers 4.x, which materialises fp32 (§4.1 dtype)
    tied=("lm_head.weight", "model.embed_tokens.weight"),
    rules=(
        rename("model.embed_tokens.weight", "model.tok_embeddings.embedding_weight"),
        rename("model.layers.{i}.self_attn.q_proj.{p}", "model.layers.{i}.attention.wq.{p}"),
        rename("model.layers.{i}.self_attn.k_proj.{p}", "model.layers.{i}.attention.wk.{p}"),
        rename("model.layers.{i}.self_attn.v_proj.{p}", "model.layers.{i}.attention.wv.{p}"),
        rename("model.layers.{i}.self_attn.o_proj.{p}", "model.layers.{i}.attention.wo.{p}"),
        rename("model.layers.{i}.mlp.gate_proj.{p}", "model.layers.{i}.feed_forward.w1.{p}"),
        rename("model.layers.{i}.mlp.down_proj.{p}", "model.layers.{i}.feed_forward.w2.{p}"),
        rename("model.layers.{i}.mlp.up_proj.{p}", "model.layers.{i}.feed_forward.w3.{p}"),
        rename("model.layers.{i}.input_layernorm.weight", "model.layers.{i}.attention_norm.weight"),
        rename("model.layers.{i}.post_attention_layernorm.weight", "model.layers.{i}.ffn_norm.weight"),
        rename("model.norm.weight", "model.norm_out.weight"),
        rename("lm_head.weight", "lm_head.weight"),
        drop_hf("model.layers.{i}.self_attn.rotary_emb.inv_freq", "rotary inv_freq buffer, recomputed at load"),
    ),
))

register(LLAMA.variant("yi", "Yi-6B/34B (Llama architecture)", model_types=("Yi", "yi"),
                       architectures=("YiForCausalLM",)))
register(LLAMA.variant("deepseek", "DeepSeek-LLM / DeepSeek-Coder v1 (Llama architecture)",
                       model_types=(), architectures=()))
