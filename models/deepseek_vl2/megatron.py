"""deepseek_vl2: DeepSeek-VL2 (remote-code `DeepseekVLV2ForCausalLM`) ↔ MindSpeed-MM's Megatron layout.

Facts: spec/megatron_layout.md §6.7 (names: the SigLIP ViT under `vision.` with its inner names kept,
the projector, the DeepSeek-V2 MLA + MoE language model under `language.`; MLA's q (`q_proj`, or
`q_a_proj` with a q LoRA rank) and `kv_a_proj_with_mqa` concatenated into a replicated `linear_qkv`),
§3.3 (TP: vocab, `linear_qb` / `linear_kvb` rows, `linear_proj` and fc2 columns, dense, shared and
routed experts' fc1 [gate; up]; the ViT replicated), §4.1 (vision schema; `image_newline` and
`view_seperator` keep their names and sit on every stage). MindSpeed-MM has no reverse for this model:
this declaration is walked backwards (the qkv split sizes come from `language_config`).
"""

from dataclasses import replace

from models.llama.megatron import GATE_UP, gpt_modality, gpt_rules, gpt_tp

from mindformers_conv.mapping import ModelSpec, config_section, invert, rename, split, transform
from mindformers_conv.megatron.layout import MegatronLayout, Modality
from mindformers_conv.megatron.tensor_parallel import COL, GLU, ROW
from mindformers_conv.registry import register_megatron

TEXT, ENC = "text_decoder.", "image_encoder.encoder."
LLM, MG = "language.model.layers.{i}", f"{TEXT}decoder.layers.{{i}}"
ATTN, MLP = f"{MG}.self_attention", f"{MG}.mlp"


def _language(cfg) -> dict:
    return config_section(cfg, "language_config")


def _q_lora(cfg) -> bool:
    return bool(_language(cfg).get("q_lora_rank"))


def _q_and_kv_a(cfg, rows: int) -> list[int]:
    """linear_qkv = [q (or q_a); kv_a]: kv_a has kv_lora_rank + qk_rope_head_dim rows."""
    c = _language(cfg)
    kv = c["kv_lora_rank"] + c["qk_rope_head_dim"]
    return [rows - kv, kv]


QKV_CONCAT = invert(split(_q_and_kv_a))

VISION = (
    rename("vision.{x*}", f"{ENC}{{x*}}"),  # SigLIP: blocks.{i}.attn.qkv, norm, attn_pool, … as they are
    rename("projector.layers.{k}.{p}", "image_encoder.projector.layers.{k}.{p}"),
    rename("image_newline", "image_newline"),
    rename("view_seperator", "view_seperator"),
)
MLA = (
    replace(transform([f"{LLM}.self_attn.q_a_proj.weight", f"{LLM}.self_attn.kv_a_proj_with_mqa.weight"],
                      f"{ATTN}.linear_qkv.weight", QKV_CONCAT), when=_q_lora),
    replace(transform([f"{LLM}.self_attn.q_proj.weight", f"{LLM}.self_attn.kv_a_proj_with_mqa.weight"],
                      f"{ATTN}.linear_qkv.weight", QKV_CONCAT), when=lambda cfg: not _q_lora(cfg)),
    rename(f"{LLM}.self_attn.q_a_layernorm.weight", f"{ATTN}.q_layernorm.weight"),
    rename(f"{LLM}.self_attn.q_b_proj.weight", f"{ATTN}.linear_qb.weight"),
    rename(f"{LLM}.self_attn.kv_a_layernorm.weight", f"{ATTN}.k_layernorm.weight"),
    rename(f"{LLM}.self_attn.kv_b_proj.{{p}}", f"{ATTN}.linear_kvb.{{p}}"),
)
MOE = (
    rename(f"{LLM}.mlp.gate.weight", f"{MLP}.router.weight"),
    rename(f"{LLM}.mlp.gate.e_score_correction_bias", f"{MLP}.router.expert_bias"),
    transform([f"{LLM}.mlp.experts.{{e}}.gate_proj.weight", f"{LLM}.mlp.experts.{{e}}.up_proj.weight"],
              f"{MLP}.experts.local_experts.{{e}}.linear_fc1.weight", GATE_UP),
    rename(f"{LLM}.mlp.experts.{{e}}.down_proj.weight", f"{MLP}.experts.local_experts.{{e}}.linear_fc2.weight"),
    transform([f"{LLM}.mlp.shared_experts.gate_proj.weight", f"{LLM}.mlp.shared_experts.up_proj.weight"],
              f"{MLP}.shared_experts.linear_fc1.weight", GATE_UP),
    rename(f"{LLM}.mlp.shared_experts.down_proj.weight", f"{MLP}.shared_experts.linear_fc2.weight"),
)
_QKV = f"{ATTN}.linear_qkv.{{p}}"
# Llama's names for the rest (embedding, o_proj, dense MLP, norms, head); MLA replaces its q/k/v rule.
DENSE = tuple(r for r in gpt_rules(None, hf="language.model.", mg=TEXT, head="language.lm_head.weight")
              if r.ms and r.ms[0].text != _QKV)
TP = (
    *((p, s) for p, s in gpt_tp(None, TEXT) if p != _QKV),  # MLA's linear_qkv is replicated
    (f"{ATTN}.linear_qb.weight", ROW),
    (f"{ATTN}.linear_kvb.{{p}}", ROW),
    (f"{MLP}.shared_experts.linear_fc1.weight", GLU),
    (f"{MLP}.shared_experts.linear_fc2.weight", COL),
)

DEEPSEEK_VL2 = register_megatron(ModelSpec(
    key="deepseek_vl2",
    description="DeepSeek-VL2, remote-code checkpoints (MindSpeed-MM Megatron layout only)",
    model_types=("deepseek_vl_v2",),
    architectures=("DeepseekVLV2ForCausalLM",),
    rules=VISION + MLA + MOE + DENSE,
    extra_rules=(),
    megatron=MegatronLayout(
        modalities=(Modality("vit", firsts=(f"{ENC}patch_embed.", f"{ENC}pos_embed"),
                             lasts=(f"{ENC}norm", f"{ENC}attn_pool", "image_encoder.projector."),
                             layers=f"{ENC}blocks.", everywhere=("image_newline", "view_seperator")),
                    gpt_modality(TEXT)),
        tp_rules=TP,
        tied=(f"{TEXT}output_layer.weight", f"{TEXT}embedding.word_embeddings.weight"),
        vocab_size=lambda cfg: _language(cfg).get("vocab_size"),
    ),
))
