"""llama: Llama 1/2/3/3.1 and CodeLlama; yi and deepseek (v1) reuse the same
declaration, internlm (v1) too (models/internlm).

Facts: spec/mindformers_llm.md §4.1–§4.3 (names; no transposes; tied head emitted by state_dict()).
`ATTENTION_QKV` and `BODY` are shared with families that differ only in how q/k/v are stored (baichuan).

`--qkv_concat` writes MindFormers' fused layout (spec/mindformers_other.md §3.1): `attention.w_qkv` grouped
per KV head (g query heads, then k, then v) and `feed_forward.w_gate_hidden` with gate and up rows
interleaved, as v1.4.0-beta2 and later read them; `--qkv_layout contiguous` gives v1.3's [q; k; v] and
[gate; up]. The reverse splits either fused layout back, with or without the flag.
"""

from mindformers_conv.mapping import (ModelSpec, config_heads, drop_hf, equal_parts, interleave_rows, invert,
                                      qkv_grouped, rename, split, transform)
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



def contiguous(cfg) -> bool:
    return cfg.get("qkv_layout") == "contiguous"


def qkv_rows(cfg, rows: int) -> list[int]:
    n_heads, n_kv, head_dim = config_heads(cfg)
    return [n_heads * head_dim, n_kv * head_dim, n_kv * head_dim]


def fused(layout) -> tuple:
    """w_qkv and w_gate_hidden (weight, and bias where there is one) for a layout condition."""
    hf_qkv = [f"{LAYER}.self_attn.{x}_proj.{{p}}" for x in "qkv"]
    hf_mlp = [f"{LAYER}.mlp.gate_proj.{{p}}", f"{LAYER}.mlp.up_proj.{{p}}"]
    w_qkv, w_gate_hidden = f"{LAYER}.attention.w_qkv.{{p}}", f"{LAYER}.feed_forward.w_gate_hidden.{{p}}"
    return (
        transform(hf_qkv, w_qkv, invert(qkv_grouped(config_heads)), when=lambda cfg: layout(cfg) and not contiguous(cfg)),
        transform(hf_qkv, w_qkv, invert(split(qkv_rows)), when=lambda cfg: layout(cfg) and contiguous(cfg)),
        transform(hf_mlp, w_gate_hidden, interleave_rows(2), when=lambda cfg: layout(cfg) and not contiguous(cfg)),
        transform(hf_mlp, w_gate_hidden, invert(split(equal_parts(2))), when=lambda cfg: layout(cfg) and contiguous(cfg)),
    )


# First match wins: the forward fuses only under --qkv_concat (FUSED_IF_ASKED), else renames; the reverse
# knows the fused MindSpore names whatever the flag (FUSED_ANY, after the renames).
FUSED_IF_ASKED = fused(lambda cfg: bool(cfg.get("qkv_concat")))
FUSED_ANY = fused(lambda cfg: True)

LLAMA = register(ModelSpec(
    key="llama",
    description="Llama, Llama 2/3/3.1, CodeLlama",
    model_types=("llama",),
    architectures=("LlamaForCausalLM",),
    forward_dtype="F32",  # v1.3.2 loads through transformers 4.x, which materialises fp32 (§4.1 dtype)
    tied=("lm_head.weight", "model.embed_tokens.weight"),
    lora_style="tk_delta_lora",  # MindFormers' llama LoRA parameters (§4.1 reverse)
    rules=(EMBEDDING, *FUSED_IF_ASKED, *ATTENTION_QKV, *BODY, *FUSED_ANY),
))

register(LLAMA.variant("yi", "Yi-6B/34B (Llama architecture)", model_types=("Yi", "yi"),
                       architectures=("YiForCausalLM",)))
# MindFormers' guide lists DeepSeek-V2 under `--model deepseek` too: the input decides (registry.resolve).
register(LLAMA.variant("deepseek", "DeepSeek-LLM / DeepSeek-Coder v1 (Llama architecture)",
                       model_types=(), architectures=(), covers=("deepseek2",)))
