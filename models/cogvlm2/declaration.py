"""cogvlm2: CogVLM2-Video-Llama3-Chat (video) and CogVLM2-Llama3-Chat-19B (image), raw safetensors.

Facts: spec/mindformers_other.md §2.5 and §7. Vision (EVA2-CLIP) → `vision_encoder.*` (cls_embedding and
position_embedding get a leading axis), adapter `model.vision.*` → `mlp_adapter.*`, one layer's rotary
`inv_freq` → `llm_model.model.freqs_mgr.freqs` (the others are dropped). LLM under `llm_model.`:
- video (`CogVLMVideoForCausalLM`, MindFormers' default `--modal video`): llama-style names, the fused
  language-expert QKV split into wq/wk/wv;
- image (`CogVLMForCausalLM`, MindFormers' `--modal image`): expert names kept, MLP gate/up/down → w1/w3/w2.
The mode comes from `--modal` (as MindFormers' flag), else config.json `architectures`. Source dtype kept.

MindFormers has no reverse; this one is the exact inverse (only layer 0's inv_freq comes back). Difference
from MindFormers: the video QKV split sizes come from config.json `hidden_size` (q rows; k and v share the
rest), where MindFormers hard-codes 4096/1024/1024 (Llama3-8B only, §5.9). `--sft lora` is not offered.
"""

from models.vit.declaration import layer_norm
from models.whisper.declaration import insert_axis

from mindformers_conv.mapping import ModelSpec, drop_hf, rename, split, transform
from mindformers_conv.registry import register


def image(cfg) -> bool:
    modal = cfg.get("modal")  # --modal, else config.json
    return modal == "image" if modal else "CogVLMForCausalLM" in (cfg.get("architectures") or ())


def video(cfg) -> bool:
    return not image(cfg)


def layout(cfg) -> str:
    source = "--modal" if cfg.get("modal") else "config.json architectures"
    return f"{'image' if image(cfg) else 'video'} model, from {source}"


def qkv_rows(cfg, rows: int) -> list[int]:
    """[q; k; v] rows: q has hidden_size rows (heads × head_dim), k and v split the rest (multi-query heads)."""
    hidden = cfg.get("hidden_size")
    if not isinstance(hidden, int):
        raise ValueError("config.json has no hidden_size; pass --config_path or --hidden_size")
    if rows <= hidden or (rows - hidden) % 2:
        raise ValueError(f"{rows} fused rows cannot be q of {hidden} rows plus equal k and v")
    return [hidden, (rows - hidden) // 2, (rows - hidden) // 2]


LEADING_AXIS = insert_axis(0)
VIS, EVA = "model.vision.transformer.layers.{i}", "vision_encoder.blocks.{i}"
LAYER, MS_LAYER = "model.layers.{i}", "llm_model.model.layers.{i}"
GATE_UP_DOWN = (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))

VISION = (
    transform("model.vision.patch_embedding.cls_embedding", "vision_encoder.cls_token", LEADING_AXIS),
    transform("model.vision.patch_embedding.position_embedding.weight", "vision_encoder.pos_embed", LEADING_AXIS),
    rename("model.vision.patch_embedding.proj.{p}", "vision_encoder.patch_embed.proj.{p}"),
    rename(f"{VIS}.attention.query_key_value.{{p}}", f"{EVA}.attn.qkv.{{p}}"),  # kept fused
    rename(f"{VIS}.attention.dense.{{p}}", f"{EVA}.attn.proj.{{p}}"),
    *layer_norm(f"{VIS}.input_layernorm", f"{EVA}.norm1"),
    *layer_norm(f"{VIS}.post_attention_layernorm", f"{EVA}.norm2"),
    rename(f"{VIS}.mlp.{{x}}.{{p}}", f"{EVA}.mlp.{{x}}.{{p}}"),  # fc1, fc2
    *layer_norm("model.vision.linear_proj.norm1", "mlp_adapter.linear_proj.norm1"),
    rename("model.vision.linear_proj.{x}.weight", "mlp_adapter.linear_proj.{x}.weight"),  # GLU linears
    rename("model.vision.conv.{p}", "mlp_adapter.conv.{p}"),
    rename("model.vision.{x}", "mlp_adapter.{x}"),  # boi, eoi
)

LLM = (
    rename("model.embed_tokens.weight", "llm_model.model.tok_embeddings.embedding_weight"),
    rename("model.norm.weight", "llm_model.model.norm_out.weight"),
    rename("lm_head.weight", "llm_model.lm_head.weight"),
    rename("model.layers.0.self_attn.rotary_emb.inv_freq", "llm_model.model.freqs_mgr.freqs"),
    drop_hf(f"{LAYER}.self_attn.rotary_emb.inv_freq", "rotary inv_freq of layers past the first (all equal)"),
)

VIDEO_LAYER = (
    transform(f"{LAYER}.self_attn.language_expert_query_key_value.weight",
              [f"{MS_LAYER}.attention.w{x}.weight" for x in "qkv"], split(qkv_rows), when=video),
    rename(f"{LAYER}.self_attn.language_expert_dense.weight", f"{MS_LAYER}.attention.wo.weight", when=video),
    rename(f"{LAYER}.input_layernorm.weight", f"{MS_LAYER}.attention_norm.weight", when=video),
    rename(f"{LAYER}.post_attention_layernorm.weight", f"{MS_LAYER}.ffn_norm.weight", when=video),
    *(rename(f"{LAYER}.mlp.language_mlp.{hf}.weight", f"{MS_LAYER}.feed_forward.{ms}.weight", when=video)
      for hf, ms in GATE_UP_DOWN),
)

IMAGE_LAYER = (
    # language/vision expert query_key_value and dense, kept as CogVLMDecoderLayer names them
    rename(f"{LAYER}.self_attn.{{x}}.{{p}}", f"{MS_LAYER}.self_attn.{{x}}.{{p}}", when=image),
    rename(f"{LAYER}.{{x}}_layernorm.weight", f"{MS_LAYER}.{{x}}_layernorm.weight", when=image),
    *(rename(f"{LAYER}.mlp.{{m}}_mlp.{hf}.weight", f"{MS_LAYER}.mlp.{{m}}_mlp.{ms}.weight", when=image)
      for hf, ms in GATE_UP_DOWN),  # {m}: language, vision
)

register(ModelSpec(
    key="cogvlm2",
    description="CogVLM2-Video-Llama3-Chat and CogVLM2-Llama3-Chat-19B (image), raw safetensors",
    architectures=("CogVLMVideoForCausalLM", "CogVLMForCausalLM"),
    forward_dtype=None,  # pt2ms(v, None) keeps the stored dtype (bfloat16 checkpoints, §7)
    layout_of=layout,
    rules=(*VISION, *LLM, *VIDEO_LAYER, *IMAGE_LAYER),
))
