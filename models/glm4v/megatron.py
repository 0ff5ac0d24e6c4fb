"""glm4v: GLM-4.1V (`Glm4vForConditionalGeneration`) ↔ MindSpeed-MM's Megatron layout.

Facts: spec/megatron_layout.md §6.8 (names: the ViT qkv / proj renamed to `self_attention.qkv` /
`.proj` and kept [Q; K; V], the ViT gate + up fused into `linear_fc1`, the LLM's fused `gate_up_proj`
renamed to `linear_fc1`, the extra `post_self_attn_layernorm` / `post_mlp_layernorm`, the merger kept
under `image_encoder.projector.`) and §4.1 (vision schema). TP (§3.3): MindSpeed-MM has no patterns,
so at TP > 1 it writes full replicas that Megatron's parallel layers cannot load; here the LLM splits
as Qwen2-VL's and the ViT MLP (a Megatron MLP) as [gate; up] rows / columns, while the ViT attention
and the merger (plain `nn.Linear`s in MindSpeed-MM's GLM ViT) stay replicated.
"""

from dataclasses import replace

from models.llama.megatron import GATE_UP, gpt_modality, gpt_rules, gpt_tp
from models.qwen2_vl.declaration import QWEN2_VL_LAYOUT, TEXT, TEXT_HEADS

from mindformers_conv.mapping import ModelSpec, rename, transform
from mindformers_conv.megatron.layout import Modality
from mindformers_conv.megatron.tensor_parallel import COL, GLU
from mindformers_conv.registry import register_megatron

HF, ENC = "model.visual.", "image_encoder.encoder."
HF_BLOCK, VIT = f"{HF}blocks.{{i}}", f"{ENC}blocks.layers.{{i}}"
LLM, MG = "model.language_model.layers.{i}", f"{TEXT}decoder.layers.{{i}}"

VISION = (
    *(rename(f"{HF}{x}.{{p}}", f"{ENC}{x}.{{p}}")
      for x in ("patch_embed.proj", "post_conv_layernorm", "embeddings.position_embedding", "downsample")),
    rename(f"{HF}post_layernorm.{{p}}", f"{ENC}blocks.final_layernorm.{{p}}"),
    rename(f"{HF_BLOCK}.attn.qkv.{{p}}", f"{VIT}.self_attention.qkv.{{p}}"),  # [Q; K; V] kept
    rename(f"{HF_BLOCK}.attn.proj.{{p}}", f"{VIT}.self_attention.proj.{{p}}"),
    transform([f"{HF_BLOCK}.mlp.gate_proj.{{p}}", f"{HF_BLOCK}.mlp.up_proj.{{p}}"], f"{VIT}.mlp.linear_fc1.{{p}}",
              GATE_UP),
    rename(f"{HF_BLOCK}.mlp.down_proj.{{p}}", f"{VIT}.mlp.linear_fc2.{{p}}"),
    rename(f"{HF_BLOCK}.norm1.{{p}}", f"{VIT}.input_layernorm.{{p}}"),
    rename(f"{HF_BLOCK}.norm2.{{p}}", f"{VIT}.pre_mlp_layernorm.{{p}}"),
    rename(f"{HF}merger.{{x}}.{{p}}", "image_encoder.projector.{x}.{p}"),
)
# Before gpt_rules: its separate gate/up rule would otherwise claim `linear_fc1` in the reverse.
TEXT_RULES = (
    rename(f"{LLM}.mlp.gate_up_proj.weight", f"{MG}.mlp.linear_fc1.weight"),
    rename(f"{LLM}.post_self_attn_layernorm.weight", f"{MG}.post_self_attn_layernorm.weight"),
    rename(f"{LLM}.post_mlp_layernorm.weight", f"{MG}.post_mlp_layernorm.weight"),
    *gpt_rules(TEXT_HEADS, hf="model.language_model.", mg=TEXT),
)

GLM4V = register_megatron(ModelSpec(
    key="glm4v",
    description="GLM-4.1V (MindSpeed-MM Megatron layout only)",
    model_types=("glm4v",),
    architectures=("Glm4vForConditionalGeneration",),
    tied=("lm_head.weight", "model.language_model.embed_tokens.weight"),
    rules=VISION + TEXT_RULES,
    extra_rules=(),
    megatron=replace(
        QWEN2_VL_LAYOUT,
        modalities=(Modality("vit", firsts=(f"{ENC}patch_embed.", f"{ENC}post_conv_layernorm.",
                                            f"{ENC}embeddings.position_embedding"),
                             lasts=("image_encoder.projector.", f"{ENC}blocks.final_layernorm", f"{ENC}downsample"),
                             layers=f"{ENC}blocks.layers."),
                    gpt_modality(TEXT)),
        tp_rules=((f"{VIT}.mlp.linear_fc1.{{p}}", GLU), (f"{VIT}.mlp.linear_fc2.weight", COL),
                  *gpt_tp(TEXT_HEADS, TEXT)),
    ),
))
