"""qwen2_vl: Qwen2-VL (`Qwen2VLForConditionalGeneration`) ↔ MindSpeed-MM's Megatron layout.

Facts: spec/megatron_layout.md §6.1 (vision tower and merger: renames, the fused ViT qkv relocated to
per-head [q_h; k_h; v_h]), §6.2 (text decoder: Megatron GPT names under `text_decoder.`), §3.3 (TP
patterns), §4.1 (pipeline schemas: vision before text). There is no MindFormers layout for this key:
it converts with `--target megatron` (and back from a Megatron folder) only.
"""

from models.llama.megatron import gpt_modality, gpt_rules, gpt_tp

from mindformers_conv.mapping import (ModelSpec, attention_heads, compose, config_section, equal_parts, invert, qkv_grouped,
                                      rename, split, transform)
from mindformers_conv.megatron.layout import MegatronLayout, Modality
from mindformers_conv.megatron.tensor_parallel import COL, ROW, qkv
from mindformers_conv.registry import register_megatron

HF_BLOCK, VIT = "visual.blocks.{i}", "image_encoder.encoder.blocks.layers.{i}"
TEXT_HEADS = attention_heads("text_config")
# ViT attention is per head: as many "KV groups" as heads, one query head each (spec §2.4 RelocateOp).
VIT_HEADS = attention_heads("vision_config", heads=("num_heads",), kv=None, hidden="embed_dim")
# HF [Q; K; V] → per-head [q_h; k_h; v_h].
VIT_QKV = compose(split(equal_parts(3)), invert(qkv_grouped(VIT_HEADS)))

VISION = (
    rename("visual.patch_embed.proj.weight", "image_encoder.encoder.patch_embed.proj.weight"),
    rename(f"{HF_BLOCK}.norm1.{{p}}", f"{VIT}.input_layernorm.{{p}}"),
    rename(f"{HF_BLOCK}.norm2.{{p}}", f"{VIT}.pre_mlp_layernorm.{{p}}"),
    transform(f"{HF_BLOCK}.attn.qkv.{{p}}", f"{VIT}.self_attention.linear_qkv.{{p}}", VIT_QKV),
    rename(f"{HF_BLOCK}.attn.proj.{{p}}", f"{VIT}.self_attention.linear_proj.{{p}}"),
    rename(f"{HF_BLOCK}.mlp.fc1.{{p}}", f"{VIT}.mlp.linear_fc1.{{p}}"),
    rename(f"{HF_BLOCK}.mlp.fc2.{{p}}", f"{VIT}.mlp.linear_fc2.{{p}}"),
    rename("visual.merger.ln_q.{p}", "image_encoder.projector.layernorm.{p}"),
    rename("visual.merger.mlp.0.{p}", "image_encoder.projector.encoder.linear_fc1.{p}"),
    rename("visual.merger.mlp.2.{p}", "image_encoder.projector.encoder.linear_fc2.{p}"),
)

VISION_TP = (
    (f"{VIT}.self_attention.linear_qkv.{{p}}", qkv(VIT_HEADS)),
    (f"{VIT}.self_attention.linear_proj.weight", COL),
    (f"{VIT}.mlp.linear_fc1.{{p}}", ROW),
    (f"{VIT}.mlp.linear_fc2.weight", COL),
    ("image_encoder.projector.encoder.linear_fc1.{p}", ROW),
    ("image_encoder.projector.encoder.linear_fc2.weight", COL),
)

TEXT = "text_decoder."
QWEN2_VL_LAYOUT = MegatronLayout(
    modalities=(Modality("vit", firsts=("image_encoder.encoder.patch_embed.",), lasts=("image_encoder.projector.",),
                         layers="image_encoder.encoder.blocks.layers."),
                gpt_modality(TEXT)),
    tp_rules=VISION_TP + gpt_tp(TEXT_HEADS, TEXT),
    tied=(f"{TEXT}output_layer.weight", f"{TEXT}embedding.word_embeddings.weight"),
    vocab_size=lambda cfg: config_section(cfg, "text_config").get("vocab_size"),
)

QWEN2_VL = register_megatron(ModelSpec(
    key="qwen2_vl",
    description="Qwen2-VL (MindSpeed-MM Megatron layout only)",
    model_types=("qwen2_vl",),
    architectures=("Qwen2VLForConditionalGeneration",),
    tied=("lm_head.weight", "model.embed_tokens.weight"),
    rules=VISION + gpt_rules(TEXT_HEADS, mg=TEXT),
    extra_rules=(),
    megatron=QWEN2_VL_LAYOUT,
))
