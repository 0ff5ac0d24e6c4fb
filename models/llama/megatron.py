"""llama as a Megatron-core GPT model (MindSpeed / Megatron-LM names, local layer spec).

Facts: spec/megatron_layout.md §6.2 (the LLM half of Qwen2-VL: q/k/v fused per KV group into
`linear_qkv`, `[gate; up]` into `linear_fc1`, norms renamed) and §3.3 (TP: qkv whole KV groups, fc1
gate/up halves, proj and fc2 columns, vocab rows). `gpt_rules` / `gpt_tp` serve every GPT-style
family (qwen2 with its q/k/v biases, mixtral with experts, the Qwen2-VL text decoder under a prefix).
"""

from mindformers_conv.mapping import (ModelSpec, config_heads, drop_hf, equal_parts, invert, qkv_grouped, rename, split,
                                      transform)
from mindformers_conv.megatron.layout import MegatronLayout, Modality
from mindformers_conv.megatron.tensor_parallel import COL, GLU, VOCAB, qkv
from mindformers_conv.registry import register_megatron

from .declaration import LLAMA

GATE_UP = invert(split(equal_parts(2)))  # [gate; up] (spec §2.3 UpGateMergeOp)


def gpt_rules(heads, hf: str = "model.", mg: str = "", head: str = "lm_head.weight") -> tuple:
    """HF llama-style names under `hf` ↔ Megatron GPT names under `mg`; {p} = weight and bias if any."""
    layer, m = f"{hf}layers.{{i}}", f"{mg}decoder.layers.{{i}}"
    return (
        rename(f"{hf}embed_tokens.weight", f"{mg}embedding.word_embeddings.weight"),
        transform([f"{layer}.self_attn.{x}_proj.{{p}}" for x in "qkv"], f"{m}.self_attention.linear_qkv.{{p}}",
                  invert(qkv_grouped(heads))),
        rename(f"{layer}.self_attn.o_proj.weight", f"{m}.self_attention.linear_proj.weight"),
        transform([f"{layer}.mlp.gate_proj.weight", f"{layer}.mlp.up_proj.weight"], f"{m}.mlp.linear_fc1.weight",
                  GATE_UP),
        rename(f"{layer}.mlp.down_proj.weight", f"{m}.mlp.linear_fc2.weight"),
        rename(f"{layer}.input_layernorm.weight", f"{m}.input_layernorm.weight"),
        rename(f"{layer}.post_attention_layernorm.weight", f"{m}.pre_mlp_layernorm.weight"),
        rename(f"{hf}norm.weight", f"{mg}decoder.final_layernorm.weight"),
        rename(head, f"{mg}output_layer.weight"),
        drop_hf(f"{layer}.self_attn.rotary_emb.inv_freq", "rotary inv_freq buffer, recomputed at load"),
    )


def gpt_modality(mg: str = "") -> Modality:
    """The text decoder's pipeline schema (spec §4.1 `text`)."""
    return Modality("llm", firsts=(f"{mg}embedding.",), lasts=(f"{mg}decoder.final_layernorm.", f"{mg}output_layer."),
                    layers=f"{mg}decoder.layers.")


def gpt_tp(heads, mg: str = "") -> tuple:
    """TP splits of the GPT names (spec §3.3, LLM rows; experts as in Qwen3-VL)."""
    m = f"{mg}decoder.layers.{{i}}"
    return (
        (f"{mg}embedding.word_embeddings.weight", VOCAB),
        (f"{mg}output_layer.weight", VOCAB),
        (f"{m}.self_attention.linear_qkv.{{p}}", qkv(heads)),
        (f"{m}.self_attention.linear_proj.weight", COL),
        (f"{m}.mlp.linear_fc1.weight", GLU),
        (f"{m}.mlp.linear_fc2.weight", COL),
        (f"{m}.mlp.experts.local_experts.{{e}}.linear_fc1.weight", GLU),
        (f"{m}.mlp.experts.local_experts.{{e}}.linear_fc2.weight", COL),
    )


GPT_LAYOUT = MegatronLayout(modalities=(gpt_modality(),), tp_rules=gpt_tp(config_heads),
                            tied=("output_layer.weight", "embedding.word_embeddings.weight"))

LLAMA_MEGATRON = register_megatron(ModelSpec(
    key="llama",
    description="Llama 1/2/3 as Megatron-core GPT",
    model_types=LLAMA.model_types,
    architectures=LLAMA.architectures,
    tied=LLAMA.tied,
    rules=gpt_rules(config_heads),
    extra_rules=(),
    megatron=GPT_LAYOUT,
))
