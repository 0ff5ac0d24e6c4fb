"""qwen2_5_omni: the thinker of Qwen2.5-Omni ↔ MindSpeed-MM's Megatron layout (vision, text, audio).

Facts: spec/megatron_layout.md §6.4 (Qwen2.5-VL's ViT with separate q / k / v fused per head, the
Qwen2 text decoder, the Whisper-style audio tower under `audio_encoder.encoder.`: q / k / v per head
into `linear_qkv`, its bias with a zero k part since Whisper's k has none), §3.3 (Qwen2.5-VL's TP
plus the audio rows / columns), §4.1 (audio schema; stages vision, text, audio). Input: the full
model (`Qwen2_5OmniForConditionalGeneration`, names under `thinker.`; the talker and token2wav are
left out, and listed) or the thinker alone (`Qwen2_5OmniThinkerForConditionalGeneration`, no
prefix); the reverse writes the names of the model config.json describes.
"""

from dataclasses import replace

from models.llama.megatron import gpt_modality, gpt_rules, gpt_tp
from models.qwen2_5_vl.declaration import QKV, VISION_25, VISION_TP_25, hf_prefixed
from models.qwen2_vl.declaration import HF_BLOCK, QWEN2_VL_LAYOUT, TEXT

from mindformers_conv.mapping import (ModelSpec, Op, attention_heads, compose, config_section, drop_hf, invert,
                                      qkv_grouped, rename, transform)
from mindformers_conv.megatron.layout import Modality
from mindformers_conv.megatron.tensor_parallel import COL, ROW, qkv
from mindformers_conv.registry import register_megatron

AUDIO_ENC = "audio_encoder.encoder."
AUDIO_HF, AUDIO = "audio_tower.layers.{i}", f"{AUDIO_ENC}blocks.layers.{{i}}"


def _thinker(cfg) -> dict:
    """The thinker's config: `thinker_config` of the full model's config.json, else the top level."""
    return cfg.get("thinker_config") or cfg


def _full_model(cfg) -> bool:
    return "thinker_config" in cfg


def _heads(section: str, **names):
    read = attention_heads(section, **names)
    return lambda cfg: read(_thinker(cfg))


TEXT_HEADS = _heads("text_config")
VIT_HEADS = _heads("vision_config", heads=("num_heads",), kv=None, hidden="hidden_size")
AUDIO_HEADS = _heads("audio_config", heads=("encoder_attention_heads",), kv=None, hidden="d_model")
# Whisper's k has no bias; Megatron's fused bias gets zeros there (spec §2.3 QVToQKVMergeOp). A k bias
# adds q·b_k to every score of a query alike, which softmax ignores: dropping it back loses nothing.
ZERO_K = Op("zero_k_bias", lambda xs, cfg: [xs[0], xs[0].new_zeros(xs[0].shape), xs[1]],
            lambda xs, cfg: [xs[0], xs[2]])

VISION = (
    *(r for r in VISION_25 if r.ms[0].text != QKV),
    transform([f"{HF_BLOCK}.attn.{x}.{{p}}" for x in "qkv"], QKV, invert(qkv_grouped(VIT_HEADS))),  # per head
)
AUDIO_RULES = (
    transform([f"{AUDIO_HF}.self_attn.{x}_proj.weight" for x in "qkv"], f"{AUDIO}.self_attention.linear_qkv.weight",
              invert(qkv_grouped(AUDIO_HEADS))),
    transform([f"{AUDIO_HF}.self_attn.q_proj.bias", f"{AUDIO_HF}.self_attn.v_proj.bias"],
              f"{AUDIO}.self_attention.linear_qkv.bias", compose(ZERO_K, invert(qkv_grouped(AUDIO_HEADS)))),
    rename(f"{AUDIO_HF}.self_attn.out_proj.{{p}}", f"{AUDIO}.self_attention.linear_proj.{{p}}"),
    rename(f"{AUDIO_HF}.fc1.{{p}}", f"{AUDIO}.mlp.linear_fc1.{{p}}"),
    rename(f"{AUDIO_HF}.fc2.{{p}}", f"{AUDIO}.mlp.linear_fc2.{{p}}"),
    rename(f"{AUDIO_HF}.self_attn_layer_norm.{{p}}", f"{AUDIO}.input_layernorm.{{p}}"),
    rename(f"{AUDIO_HF}.final_layer_norm.{{p}}", f"{AUDIO}.pre_mlp_layernorm.{{p}}"),
    *(rename(f"audio_tower.{x}.{{p}}", f"{AUDIO_ENC}{x}.{{p}}")
      for x in ("conv1", "conv2", "ln_post", "proj", "audio_bos_eos_token")),
)
THINKER = VISION + gpt_rules(TEXT_HEADS, mg=TEXT) + AUDIO_RULES
RULES = (
    *(replace(r, when=lambda cfg: not _full_model(cfg)) for r in THINKER),
    *(replace(r, when=_full_model) for r in hf_prefixed(THINKER, "", "thinker.")),
    replace(drop_hf("talker.{x*}", "the talker (MindSpeed-MM converts the thinker only)"), when=_full_model),
    replace(drop_hf("token2wav.{x*}", "token2wav (MindSpeed-MM converts the thinker only)"), when=_full_model),
)
TP = (
    (QKV, qkv(VIT_HEADS)),
    *((p, s) for p, s in VISION_TP_25 if p != QKV),
    (f"{AUDIO}.self_attention.linear_qkv.{{p}}", qkv(AUDIO_HEADS)),
    (f"{AUDIO}.self_attention.linear_proj.weight", COL),
    (f"{AUDIO}.mlp.linear_fc1.{{p}}", ROW),
    (f"{AUDIO}.mlp.linear_fc2.weight", COL),
    *gpt_tp(TEXT_HEADS, TEXT),
)

QWEN2_5_OMNI = register_megatron(ModelSpec(
    key="qwen2_5_omni",
    description="Qwen2.5-Omni thinker (MindSpeed-MM Megatron layout only)",
    model_types=("qwen2_5_omni", "qwen2_5_omni_thinker"),
    architectures=("Qwen2_5OmniForConditionalGeneration", "Qwen2_5OmniThinkerForConditionalGeneration"),
    rules=RULES,
    extra_rules=(),
    megatron=replace(
        QWEN2_VL_LAYOUT,
        modalities=(*QWEN2_VL_LAYOUT.modalities[:1], gpt_modality(TEXT),
                    Modality("audio", firsts=(f"{AUDIO_ENC}conv", f"{AUDIO_ENC}audio_bos_eos_token"),
                             lasts=(f"{AUDIO_ENC}proj", f"{AUDIO_ENC}ln_post"), layers=f"{AUDIO_ENC}blocks.layers.")),
        tp_rules=TP,
        vocab_size=lambda cfg: config_section(_thinker(cfg), "text_config").get("vocab_size"),
    ),
))
