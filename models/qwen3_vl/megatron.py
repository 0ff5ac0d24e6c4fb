"""qwen3_vl: Qwen3-VL (`Qwen3VLForConditionalGeneration`) ↔ MindSpeed-MM's Megatron layout.

Facts: spec/megatron_layout.md §6.6 (MindSpeed-MM's `Qwen3VLMegatronConverter`: HF names under
`model.visual.`, `model.language_model.`, `lm_head`; the ViT qkv per head as Qwen2-VL's, a plain
(not gated) ViT MLP, `pos_embed` on the first ViT stage, deepstack merger j under ViT block
`deepstack_visual_indexes[j]` so it travels with that block through the pipeline; q/k norms of the
LLM as `q_layernorm` / `k_layernorm`), §3.3 (TP: Qwen2-VL's plus the deepstack mergers' fc1 rows /
fc2 columns), §4.1 (vision schema with `pos_embed`).
"""

from dataclasses import replace

from models.llama.megatron import gpt_modality, gpt_rules, gpt_tp
from models.qwen2_5_vl.declaration import VISION_25, VIT_HEADS, hf_prefixed
from models.qwen2_vl.declaration import HF_BLOCK, QWEN2_VL_LAYOUT, TEXT, TEXT_HEADS, VISION_TP, VIT

from mindformers_conv.mapping import ModelSpec, Renumber, config_section, rename
from mindformers_conv.megatron.layout import Modality
from mindformers_conv.megatron.tensor_parallel import COL, ROW, qkv
from mindformers_conv.registry import register_megatron

HF, LLM, MG = "model.visual.", "model.language_model.layers.{i}", f"{TEXT}decoder.layers.{{i}}"
DEEPSTACK, DEEPSTACK_HF = f"{VIT}.deepstack_layer", "model.visual.deepstack_merger_list.{i}"
# The ViT blocks' norms, per-head qkv and proj are Qwen2.5-VL's (widths from vision_config.hidden_size).
_KEPT = {f"{HF_BLOCK}.{x}.{{p}}" for x in ("norm1", "norm2", "attn.qkv", "attn.proj")}


def _deepstack_blocks(cfg) -> list[int]:
    return config_section(cfg, "vision_config").get("deepstack_visual_indexes") or []


def _deepstack(hf: str, mg: str):
    return rename(f"{DEEPSTACK_HF}.{hf}.{{p}}", f"{DEEPSTACK}.{mg}.{{p}}", renumber=Renumber("i", _deepstack_blocks))


VISION = (
    *hf_prefixed(tuple(r for r in VISION_25 if r.hf[0].text in _KEPT), "visual.", HF),
    rename(f"{HF}patch_embed.proj.{{p}}", "image_encoder.encoder.patch_embed.proj.{p}"),
    rename(f"{HF}pos_embed.weight", "image_encoder.encoder.pos_embed.weight"),
    rename(f"{HF}blocks.{{i}}.mlp.linear_fc1.{{p}}", f"{VIT}.mlp.linear_fc1.{{p}}"),
    rename(f"{HF}blocks.{{i}}.mlp.linear_fc2.{{p}}", f"{VIT}.mlp.linear_fc2.{{p}}"),
    rename(f"{HF}merger.norm.{{p}}", "image_encoder.projector.layernorm.{p}"),
    rename(f"{HF}merger.linear_fc1.{{p}}", "image_encoder.projector.encoder.linear_fc1.{p}"),
    rename(f"{HF}merger.linear_fc2.{{p}}", "image_encoder.projector.encoder.linear_fc2.{p}"),
    _deepstack("norm", "layernorm"),
    _deepstack("linear_fc1", "encoder.linear_fc1"),
    _deepstack("linear_fc2", "encoder.linear_fc2"),
)
TEXT_RULES = (
    *gpt_rules(TEXT_HEADS, hf="model.language_model.", mg=TEXT),
    rename(f"{LLM}.self_attn.q_norm.weight", f"{MG}.self_attention.q_layernorm.weight"),
    rename(f"{LLM}.self_attn.k_norm.weight", f"{MG}.self_attention.k_layernorm.weight"),
)
QKV = f"{VIT}.self_attention.linear_qkv.{{p}}"
TP = (
    (QKV, qkv(VIT_HEADS)),
    *((p, s) for p, s in VISION_TP if p != QKV),
    (f"{DEEPSTACK}.encoder.linear_fc1.{{p}}", ROW),
    (f"{DEEPSTACK}.encoder.linear_fc2.weight", COL),
    *gpt_tp(TEXT_HEADS, TEXT),
)
LAYOUT = replace(
    QWEN2_VL_LAYOUT,
    modalities=(Modality("vit", firsts=("image_encoder.encoder.patch_embed.", "image_encoder.encoder.pos_embed."),
                         lasts=("image_encoder.projector.",), layers="image_encoder.encoder.blocks.layers."),
                gpt_modality(TEXT)),
    tp_rules=TP,
)

QWEN3_VL = register_megatron(ModelSpec(
    key="qwen3_vl",
    description="Qwen3-VL (MindSpeed-MM Megatron layout only)",
    model_types=("qwen3_vl",),
    architectures=("Qwen3VLForConditionalGeneration",),
    tied=("lm_head.weight", "model.language_model.embed_tokens.weight"),
    rules=VISION + TEXT_RULES,
    extra_rules=(),
    megatron=LAYOUT,
))
