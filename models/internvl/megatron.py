"""internvl: InternVL 2.5 / 3 (remote-code `InternVLChatModel`) ↔ MindSpeed-MM's Megatron layout.

Facts: spec/megatron_layout.md §6.5 (names: InternViT under `vision_model.`, the `mlp1` projector, the
LLM under `language_model.` as Llama, Qwen2 or InternLM2 by `llm_config.architectures[0]`), §3.3 (TP:
vocab rows and ViT heads dealt out unevenly, ViT qkv kept [Q; K; V] and cut per third, the projector
replicated), §4.1 (vision schema). The input names are the remote-code checkpoint's (what the
published OpenGVLab folders hold), not transformers' later native `InternVLForConditionalGeneration`.
"""

from dataclasses import replace

from models.llama.megatron import GATE_UP, gpt_modality, gpt_rules, gpt_tp

from mindformers_conv.mapping import ModelSpec, attention_heads, config_section, rename, transform
from mindformers_conv.megatron.layout import MegatronLayout, Modality
from mindformers_conv.megatron.tensor_parallel import COL, ROW, UNEVEN, uneven_col, uneven_qkv
from mindformers_conv.registry import register_megatron

HF_LAYER, VIT = "vision_model.encoder.layers.{i}", "image_encoder.encoder.encoder.layers.{i}"
TEXT = "text_decoder."
LLM, MG = "language_model.model.layers.{i}", f"{TEXT}decoder.layers.{{i}}"
VIT_HEADS = attention_heads("vision_config", kv=None)
LLM_HEADS = attention_heads("llm_config")


def _internlm2(cfg) -> bool:
    return (config_section(cfg, "llm_config").get("architectures") or [""])[0] == "InternLM2ForCausalLM"


VISION = (
    rename("vision_model.embeddings.{x*}", "image_encoder.encoder.embeddings.{x*}"),
    rename(f"{HF_LAYER}.attn.qkv.{{p}}", f"{VIT}.self_attention.linear_qkv.{{p}}"),  # [Q; K; V] kept
    rename(f"{HF_LAYER}.attn.q_norm.{{p}}", f"{VIT}.self_attention.q_layernorm.{{p}}"),
    rename(f"{HF_LAYER}.attn.k_norm.{{p}}", f"{VIT}.self_attention.k_layernorm.{{p}}"),
    rename(f"{HF_LAYER}.attn.proj.{{p}}", f"{VIT}.self_attention.linear_proj.{{p}}"),
    rename(f"{HF_LAYER}.mlp.fc1.{{p}}", f"{VIT}.mlp.linear_fc1.{{p}}"),
    rename(f"{HF_LAYER}.mlp.fc2.{{p}}", f"{VIT}.mlp.linear_fc2.{{p}}"),
    rename(f"{HF_LAYER}.norm1.{{p}}", f"{VIT}.input_layernorm.{{p}}"),
    rename(f"{HF_LAYER}.norm2.{{p}}", f"{VIT}.pre_mlp_layernorm.{{p}}"),
    rename(f"{HF_LAYER}.ls1", f"{VIT}.ls1"),
    rename(f"{HF_LAYER}.ls2", f"{VIT}.ls2"),
    rename("mlp1.0.{p}", "image_encoder.projector.norm.{p}"),
    rename("mlp1.1.{p}", "image_encoder.projector.linear_fc1.{p}"),
    rename("mlp1.3.{p}", "image_encoder.projector.linear_fc2.{p}"),
)

# InternLM2's `wqkv` is already Megatron's grouped layout (spec §6.5): renamed, not re-fused.
INTERNLM2 = tuple(replace(r, when=_internlm2) for r in (
    rename("language_model.model.tok_embeddings.weight", f"{TEXT}embedding.word_embeddings.weight"),
    rename(f"{LLM}.attention.wqkv.weight", f"{MG}.self_attention.linear_qkv.weight"),
    rename(f"{LLM}.attention.wo.weight", f"{MG}.self_attention.linear_proj.weight"),
    transform([f"{LLM}.feed_forward.w1.weight", f"{LLM}.feed_forward.w3.weight"], f"{MG}.mlp.linear_fc1.weight",
              GATE_UP),
    rename(f"{LLM}.feed_forward.w2.weight", f"{MG}.mlp.linear_fc2.weight"),
    rename(f"{LLM}.attention_norm.weight", f"{MG}.input_layernorm.weight"),
    rename(f"{LLM}.ffn_norm.weight", f"{MG}.pre_mlp_layernorm.weight"),
    rename("language_model.model.norm.weight", f"{TEXT}decoder.final_layernorm.weight"),
    rename("language_model.output.weight", f"{TEXT}output_layer.weight"),
))
# Llama and Qwen2 (q/k/v biases through {p}) share the llama names.
LLAMA_OR_QWEN2 = tuple(replace(r, when=lambda cfg: not _internlm2(cfg)) for r in gpt_rules(
    LLM_HEADS, hf="language_model.model.", mg=TEXT, head="language_model.lm_head.weight"))

VISION_TP = (
    (f"{VIT}.self_attention.linear_qkv.{{p}}", uneven_qkv(VIT_HEADS)),
    (f"{VIT}.self_attention.linear_proj.weight", uneven_col(VIT_HEADS)),
    (f"{VIT}.mlp.linear_fc1.{{p}}", ROW),
    (f"{VIT}.mlp.linear_fc2.weight", COL),
)
# Vocab rows are dealt out unevenly, not padded (spec §3.3, §3.4): first match wins over gpt_tp's VOCAB.
VOCAB_TP = ((f"{TEXT}embedding.word_embeddings.weight", UNEVEN), (f"{TEXT}output_layer.weight", UNEVEN))

INTERNVL = register_megatron(ModelSpec(
    key="internvl",
    description="InternVL 2.5 / 3, remote-code checkpoints (MindSpeed-MM Megatron layout only)",
    model_types=("internvl_chat",),
    architectures=("InternVLChatModel",),
    rules=VISION + INTERNLM2 + LLAMA_OR_QWEN2,
    extra_rules=(),
    megatron=MegatronLayout(
        modalities=(Modality("vit", firsts=("image_encoder.encoder.embeddings.",), lasts=("image_encoder.projector.",),
                             layers="image_encoder.encoder.encoder.layers."),
                    gpt_modality(TEXT)),
        tp_rules=VISION_TP + VOCAB_TP + gpt_tp(LLM_HEADS, TEXT),
        vocab_size=lambda cfg: config_section(cfg, "llm_config").get("vocab_size"),
    ),
))
