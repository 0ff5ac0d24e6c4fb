"""bloom: BLOOM (`BloomForCausalLM`; bloom-560m … bloom-7b1, bloomz).

Facts: spec/mindformers_other.md §2.9 (names; the per-head interleaved query_key_value [(head, q/k/v,
head_dim), H] de-interleaved into dense1/2/3; attention dense and both MLP weights transposed to the
`transpose_b=False` [in, out]; `lm_head` → `head.weight`, which the tied BloomHead does not load) and §7
(the stored dtype is kept).

Input names: the hub's unprefixed BloomModel keys (what MindFormers reads) or `transformer.`-prefixed
ones (what `BloomForCausalLM.save_pretrained` writes today). The reverse writes the unprefixed names, as
MindFormers does; `from_pretrained` loads either.

Differences from MindFormers (its bugs, §2.9, §5.7, §5.12): prefixed input gives the loadable MS names
(MindFormers writes `transformer.`-prefixed ones, which `BloomLMHeadModel` does not have); the head count
comes from config.json (`n_head`), the CLI flags only filling gaps (MindFormers takes `--n_head`, default
32, and a wrong one silently scrambles q/k/v).
"""

from models.vit.declaration import layer_norm, linear_in_out

from mindformers_conv.mapping import ModelSpec, qkv_grouped, rename, transform
from mindformers_conv.registry import register

BLOCK = "blocks.{i}"


def heads(cfg) -> tuple[int, int, int]:
    """(heads, heads, head_dim): BLOOM's fused rows are per head [q, k, v], i.e. one group per head."""
    n_heads = cfg.get("n_head") or cfg.get("num_attention_heads")
    hidden = cfg.get("hidden_size") or cfg.get("n_embed")
    if not n_heads or not hidden:
        raise ValueError("config.json has no n_head/hidden_size; pass --config_path or --n_head and --hidden_size")
    return n_heads, n_heads, hidden // n_heads


QKV_PER_HEAD = qkv_grouped(heads)


def bloom_rules(prefix: str) -> tuple:
    """The table for HF keys under `prefix` ("" for the hub files, "transformer." for save_pretrained)."""
    layer = f"{prefix}h.{{i}}"
    return (
        rename(f"{prefix}word_embeddings.weight", "embedding.word_embedding.embedding_table"),
        *layer_norm(f"{prefix}word_embeddings_layernorm", "embedding.norm"),
        *layer_norm(f"{layer}.input_layernorm", f"{BLOCK}.layernorm1"),
        transform(f"{layer}.self_attention.query_key_value.{{p}}",
                  [f"{BLOCK}.attention.dense{k}.{{p}}" for k in (1, 2, 3)], QKV_PER_HEAD),
        *linear_in_out(f"{layer}.self_attention.dense", f"{BLOCK}.attention.projection"),
        *layer_norm(f"{layer}.post_attention_layernorm", f"{BLOCK}.layernorm2"),
        *linear_in_out(f"{layer}.mlp.dense_h_to_4h", f"{BLOCK}.output.mapping"),
        *linear_in_out(f"{layer}.mlp.dense_4h_to_h", f"{BLOCK}.output.projection"),
        *layer_norm(f"{prefix}ln_f", "ln_f"),
    )


BLOOM = register(ModelSpec(
    key="bloom",
    description="BLOOM / BLOOMZ",
    model_types=("bloom",),
    architectures=("BloomForCausalLM", "BloomModel"),
    forward_dtype=None,  # torch.load + pt2ms(v, None) keeps the stored dtype (§7)
    rules=(
        *bloom_rules(""),  # first: the reverse writes the hub's (and MindFormers') unprefixed names
        *bloom_rules("transformer."),
        rename("lm_head.{p}", "head.{p}"),  # kept as MindFormers does; its tied BloomHead loads nothing
    ),
))
