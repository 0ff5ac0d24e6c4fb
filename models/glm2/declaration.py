"""glm-n: ChatGLM2-6B, ChatGLM3-6B(-32K), GLM-4-9B (THUDM remote code `ChatGLMForConditionalGeneration`);
`glm4` is an alias, as MindFormers v1.6+ rewrites `--model glm4` to glm-n.

Facts: spec/mindformers_other.md §2.2.a (v1.3.2: one rename, word_embeddings.weight → embedding_weight;
fused query_key_value [q all heads; k all groups; v] and dense_h_to_4h [gate; up] copied as is) and §7
(parameters float32 without --dtype).

MindFormers HEAD's yaml switches (§2.2.c) are read from the config (config.json or --config_path), with
MindFormers' names and defaults:
- `qkv_concat: false` splits query_key_value into `self_attention.wq/wk/wv` (sizes from num_attention_heads,
  kv_channels; the k/v group count from the tensor itself); `--qkv_concat` (or the default) keeps it fused;
- `mlp_concat: false` splits dense_h_to_4h into `mlp.dense_left` (gate) / `mlp.dense_right` (up);
- `use_rearrange_rope: true` permutes the q and k rows of every head from GLM's interleaved rotary pairs
  (2i, 2i+1) to the halves (i, d/2 + i) MindFormers' rotary rotates (`ROPE_REARRANGE`).
The reverse is the exact inverse under the same config, and reads either MS layout whatever the switches.

Differences from MindFormers (its bugs, §5.3–§5.5, §5.11): the HF folder is read as given (no dirname
pitfall); the reverse maps `embedding_weight` back to `word_embeddings.weight` (v1.3.2 maps a stale name
and keeps the MS one); the reverse undoes the rope permutation only when the forward applied it (HEAD's
reverse always applies the inverse, corrupting q/k of every default GLM4 checkpoint); the inv_freq buffer
is left out.
"""

from dataclasses import replace

from mindformers_conv.mapping import ModelSpec, Op, compose, drop_hf, equal_parts, invert, rename, split, transform
from mindformers_conv.registry import register

LAYER = "transformer.encoder.layers.{i}"
QKV, MLP = f"{LAYER}.self_attention.query_key_value.{{p}}", f"{LAYER}.mlp.dense_h_to_4h.{{p}}"


def heads_and_dim(cfg) -> tuple[int, int]:
    """(query heads, head_dim): num_attention_heads and kv_channels, or --n_head and --hidden_size / n_head."""
    n_heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    hidden = cfg.get("hidden_size")
    if not n_heads or not (cfg.get("kv_channels") or hidden):
        raise ValueError("config.json has no num_attention_heads/kv_channels; pass --config_path or "
                         "--n_head and --hidden_size")
    return n_heads, cfg.get("kv_channels") or hidden // n_heads


def qkv_rows(cfg, rows: int) -> list[int]:
    """[q; k; v] rows: n_heads·d query rows, the rest k and v halves (g·d each, g = multi_query_group_num)."""
    n_heads, d = heads_and_dim(cfg)
    kv, odd = divmod(rows - n_heads * d, 2)
    if kv <= 0 or odd or kv % d:
        raise ValueError(f"{rows} rows are not {n_heads} query heads of {d} plus k and v groups of {d}")
    return [n_heads * d, kv, kv]


def _per_head(x, cfg, forward: bool):
    """Rows of each d-row head: interleaved pairs (2i, 2i+1) → halves (i, d/2 + i), or back."""
    d = heads_and_dim(cfg)[1]
    if d % 2 or x.shape[0] % d:
        raise ValueError(f"{x.shape[0]} rows are not heads of an even head_dim {d}")
    order = (d // 2, 2) if forward else (2, d // 2)
    return x.reshape(x.shape[0] // d, *order, *x.shape[1:]).transpose(1, 2).reshape(x.shape)


# HEAD `use_rearrange_rope` on [q, k, v]: q and k permuted inside every head, v untouched.
ROPE_REARRANGE = Op("glm_rope_rearrange",
                    lambda xs, cfg: [_per_head(xs[0], cfg, True), _per_head(xs[1], cfg, True), xs[2]],
                    lambda xs, cfg: [_per_head(xs[0], cfg, False), _per_head(xs[1], cfg, False), xs[2]])
QKV_SPLIT = split(qkv_rows)


def rearranged(cfg) -> bool:
    return bool(cfg.get("use_rearrange_rope"))


def qkv_rules(rope: bool) -> tuple:
    """query_key_value ↔ fused (when qkv_concat) or wq/wk/wv, with or without the rope permutation.

    First match wins: forward keeps it fused unless `qkv_concat: false`; the reverse reads both MS layouts.
    """
    when = rearranged if rope else (lambda cfg: not rearranged(cfg))
    fused = (transform(QKV, QKV, compose(QKV_SPLIT, ROPE_REARRANGE, invert(QKV_SPLIT)), when=when) if rope
             else rename(QKV, QKV, when=when))
    parts = [f"{LAYER}.self_attention.w{q}.{{p}}" for q in "qkv"]
    split_rule = transform(QKV, parts, compose(QKV_SPLIT, ROPE_REARRANGE) if rope else QKV_SPLIT, when=when)
    return replace(fused, when=lambda cfg: when(cfg) and cfg.get("qkv_concat", True)), split_rule, fused


MLP_FUSED = rename(MLP, MLP)
MLP_RULES = (  # dense_h_to_4h: fused unless `mlp_concat: false`; the reverse reads both layouts
    replace(MLP_FUSED, when=lambda cfg: cfg.get("mlp_concat", True)),
    transform(MLP, [f"{LAYER}.mlp.dense_left.{{p}}", f"{LAYER}.mlp.dense_right.{{p}}"], split(equal_parts(2))),
    MLP_FUSED,
)

def generation(cfg) -> str:
    """Which GLM the config describes (one conversion serves all of them; this only says which it saw)."""
    if (cfg.get("padded_vocab_size") or 0) >= 151552 or (cfg.get("rope_ratio") or 0) >= 500:
        return "GLM-4 (from config.json padded_vocab_size / rope_ratio)"
    if "rope_ratio" in cfg:
        return "ChatGLM3-6B-32K (from config.json rope_ratio)"
    if cfg.get("seq_length") == 8192:
        return "ChatGLM3-6B (from config.json seq_length)"
    return "ChatGLM2-6B layout" if cfg else "no config.json: the ChatGLM2-6B layout"


GLM_N = register(ModelSpec(
    key="glm-n",
    description="ChatGLM2-6B, ChatGLM3-6B(-32K), GLM-4-9B",
    model_types=("chatglm",),
    architectures=("ChatGLMModel", "ChatGLMForConditionalGeneration"),
    forward_dtype="F32",  # AutoModel.from_pretrained without torch_dtype materialises fp32 (§2.2.a, §7)
    tied=("transformer.output_layer.weight", "transformer.embedding.word_embeddings.weight"),
    layout_of=generation,
    lora_style="tk_delta_lora",  # the glm2 reverse maps tk_delta_lora_a/_b (§2.2.a reverse)
    rules=(
        rename("transformer.embedding.word_embeddings.weight", "transformer.embedding.embedding_weight"),
        # Reverse only (the forward matched above): MindFormers' codegeex2 writes this stale name (§2.3).
        rename("transformer.embedding.word_embeddings.weight", "transformer.embedding.embedding_table"),
        rename(f"{LAYER}.input_layernorm.weight", f"{LAYER}.input_layernorm.weight"),
        *qkv_rules(rope=False),
        *qkv_rules(rope=True),
        rename(f"{LAYER}.self_attention.dense.{{p}}", f"{LAYER}.self_attention.dense.{{p}}"),
        rename(f"{LAYER}.post_attention_layernorm.weight", f"{LAYER}.post_attention_layernorm.weight"),
        *MLP_RULES,
        rename(f"{LAYER}.mlp.dense_4h_to_h.{{p}}", f"{LAYER}.mlp.dense_4h_to_h.{{p}}"),
        rename("transformer.encoder.final_layernorm.weight", "transformer.encoder.final_layernorm.weight"),
        rename("transformer.output_layer.weight", "transformer.output_layer.weight"),
        drop_hf("transformer.rotary_pos_emb.inv_freq", "rotary inv_freq buffer, recomputed at load"),
    ),
))

register(GLM_N.variant("glm4", "GLM-4-9B (alias of glm-n, as MindFormers v1.6+ maps --model glm4)"))
