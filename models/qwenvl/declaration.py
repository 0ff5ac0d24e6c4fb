"""qwenvl: Qwen-VL / Qwen-VL-Chat (remote code `QWenLMHeadModel` with `transformer.visual`).

Facts: spec/mindformers_other.md §2.4 and §7. LLM: qwen's table (models/qwen) under `llm_model.`. Vision
(`transformer.visual.` → `vision_encoder.`): ViT in_proj de-interleaved per head ((head, {q,k,v}, head_dim)
rows → dense1/2/3), attention out_proj transposed to `projection`, `ln*` gamma/beta; resampler
(`attn_pool`) in_proj split in three contiguous blocks, out_proj transposed. Float32 without --dtype
(from_pretrained on a CPU host).

MindFormers has no reverse; this one is the exact inverse. Differences from MindFormers: the ViT head
count comes from config.json `visual.heads` (MindFormers' `vit_num_head` argument, default 16, arrives as
a string from its CLI, §5.2); `--qkv_concat` writes the fused c_attn as `attention.w_qkv` (MindFormers'
`use_qkv_concat` writes `attention.w`, which the v1.3.2 attention does not have, §5.9); the vocab padding
of `enable_emb_opt` is not offered.
"""

from dataclasses import replace

from models.qwen.declaration import LAYER, MS_LAYER, QWEN
from models.vit.declaration import QKV_THIRDS, layer_norm, linear_in_out

from mindformers_conv.mapping import ModelSpec, Pattern, Rule, qkv_grouped, rename, transform
from mindformers_conv.registry import register


def under(prefix: str, rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """The same rules with every MindSpore name moved under `prefix` (e.g. a LLM inside a multimodal model)."""
    return tuple(replace(r, ms=tuple(Pattern(prefix + p.text) for p in r.ms)) for r in rules)


def vit_heads(cfg) -> tuple[int, int, int]:
    """(heads, heads, head_dim) of the visual tower, from config.json `visual` (heads, width)."""
    visual = cfg.get("visual") or {}
    heads, width = visual.get("heads"), visual.get("width")
    if not isinstance(heads, int) or not isinstance(width, int):
        raise ValueError("config.json has no visual.heads / visual.width; pass --config_path")
    return heads, heads, width // heads


def qkv_concat(cfg) -> bool:
    return bool(cfg.get("qkv_concat"))


VIS, MS_VIS = "transformer.visual", "vision_encoder"
BLOCK, MS_BLOCK = f"{VIS}.transformer.resblocks.{{i}}", f"{MS_VIS}.transformer.resblocks.{{i}}"
POOL, MS_POOL = f"{VIS}.attn_pool", f"{MS_VIS}.attn_pool"

VISION = (
    rename(f"{VIS}.conv1.weight", f"{MS_VIS}.conv1.weight"),
    rename(f"{VIS}.positional_embedding", f"{MS_VIS}.positional_embedding"),
    *layer_norm(f"{VIS}.ln_pre", f"{MS_VIS}.ln_pre"),
    *layer_norm(f"{BLOCK}.ln_1", f"{MS_BLOCK}.ln_1"),
    *layer_norm(f"{BLOCK}.ln_2", f"{MS_BLOCK}.ln_2"),
    transform(f"{BLOCK}.attn.in_proj.{{p}}", [f"{MS_BLOCK}.attn.dense{k}.{{p}}" for k in (1, 2, 3)],
              qkv_grouped(vit_heads)),  # per-head interleave = grouped with one query head per group
    *linear_in_out(f"{BLOCK}.attn.out_proj", f"{MS_BLOCK}.attn.projection"),
    rename(f"{BLOCK}.mlp.{{x}}.{{p}}", f"{MS_BLOCK}.mlp.{{x}}.{{p}}"),  # c_fc, c_proj: [out, in] Linears
    rename(f"{POOL}.query", f"{MS_POOL}.query"),
    rename(f"{POOL}.pos_embed", f"{MS_POOL}.pos_embed"),
    rename(f"{POOL}.kv_proj.weight", f"{MS_POOL}.kv_proj.weight"),
    *(transform(f"{POOL}.attn.in_proj_{p}", [f"{MS_POOL}.attn.dense{k}.{p}" for k in (1, 2, 3)], QKV_THIRDS)
      for p in ("weight", "bias")),  # torch nn.MultiheadAttention: contiguous q, k, v
    *linear_in_out(f"{POOL}.attn.out_proj", f"{MS_POOL}.attn.projection"),
    *layer_norm(f"{POOL}.ln_q", f"{MS_POOL}.ln_q"),
    *layer_norm(f"{POOL}.ln_kv", f"{MS_POOL}.ln_kv"),
    *layer_norm(f"{VIS}.ln_post", f"{MS_VIS}.ln_post"),
    rename(f"{VIS}.proj", f"{MS_VIS}.proj"),  # both sides compute x @ proj
)

register(ModelSpec(
    key="qwenvl",
    description="Qwen-VL / Qwen-VL-Chat (remote code; LLM, ViT and resampler)",
    forward_dtype=QWEN.forward_dtype,  # from_pretrained materialises fp32 on a CPU host (§7)
    tied=QWEN.tied,
    rules=(
        *VISION,  # before the LLM rules: `transformer.visual.*` would otherwise meet qwen's patterns first
        rename(f"{LAYER}.attn.c_attn.{{p}}", f"llm_model.{MS_LAYER}.attention.w_qkv.{{p}}", when=qkv_concat),
        *under("llm_model.", QWEN.rules),
    ),
))
