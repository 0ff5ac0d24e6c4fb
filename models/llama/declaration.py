"""llama: Llama 1/2/3/3.1 and CodeLlama; yi and deepseek (v1) reuse the same
declaration, internlm (v1) too (models/internlm).

Facts: spec/mindformers_llm.md §4.1–§4.3 (names; no transposes; tied head emitted by state_dict()).
`ATTENTION_QKV` and `BODY` are shared with families that differ only in how q/k/v are stored (baichuan).
"""

from mindformers_conv.mapping import ModelSpec, drop_hf, rename
from mindformers_conv.registry import register

LAYER = "model.layers.{i}"

EMBEDDING = rename("model.embed_tokens.weight", "model.tok_embeddings.embedding_weight")
# {p}: weight, and bias where the checkpoint has one (InternLM v1's q/k/v/o).
ATTENTION_QKV = tuple(rename(f"{LAYER}.self_attn.{hf}_proj.{{p}}", f"{LAYER}.attention.w{ms}.{{p}}")
                      for hf, ms in (("q", "q"), ("k", "k"), ("v", "v")))
BODY = (
    rename(f"{LAYER}.self_attn.o_proj.{{p}}", f"{LAYER}.attention.wo.{{p}}"),
    rename(f"{LAYER}.mlp.gate_proj.{{p}}", f"{LAYER}.feed_forward.w1.{{p}}"),
    rename(f"{LAYER}.mlp.down_proj.{{p}}", f"{LAYER}.feed_forward.w2.{{p}}"),
    rename(f"{LAYER}.mlp.up_proj.{{p}}", f"{LAYER}.feed_forward.w3.{{p}}"),
    rename(f"{LAYER}.input_layernorm.weight", f"{LAYER}.attention_norm.weight"),
    rename(f"{LAYER}.post_attention_layernorm.weight", f"{LAYER}.ffn_norm.weight"),
    rename("model.norm.weight", "model.norm_out.weight"),
    rename("lm_head.weight", "lm_head.weight"),
    drop_hf(f"{LAYER}.self_attn.rotary_emb.inv_freq", "rotary inv_freq buffer, recomputed at load"),
)

LLAMA = register(ModelSpec(
    key="llama",
    description="Llama, Llama 2/3/3.1, CodeLlama",
    model_types=("llama",),
    architectures=("LlamaForCausalLM",),
    forward_dtype="F32",  # v1.3.2 loads through transformers 4.x, which materialises fp32 (§4.1 dtype)
    tied=("lm_head.weight", "model.embed_tokens.weight"),
    lora_style="tk_delta_lora",  # MindFormers' llama LoRA parameters (§4.1 reverse)
    rules=(EMBEDDING, *ATTENTION_QKV, *BODY),
))

register(LLAMA.variant("yi", "Yi-6B/34B (Llama architecture)", model_types=("Yi", "yi"),
                       architectures=("YiForCausalLM",)))
# MindFormers' guide lists DeepSeek-V2 under `--model deepseek` too: the input decides (registry.resolve).
register(LLAMA.variant("deepseek", "DeepSeek-LLM / DeepSeek-Coder v1 (Llama architecture)",
                       model_types=(), architectures=(), covers=("deepseek2",)))
