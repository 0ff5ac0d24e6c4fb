"""gpt: GPT-2 (`GPT2LMHeadModel`; HF `Conv1D` weights are [in, out]).

Facts: spec/mindformers_other.md §2.8 (`backbone.*` names; LayerNorm gamma/beta; c_attn split in thirds
on its last axis, each part transposed to the [out, in] dense1/2/3; c_proj and c_fc copied, already the
[in, out] of MindFormers' `transpose_b=False` layers; the head tied to `wte`, no parameter) and §7 (the
stored dtype is kept).

Input names: the hub's unprefixed GPT2Model keys (`h.{i}.…`, `wte.weight`, what MindFormers reads) or
`transformer.`-prefixed ones (what `GPT2LMHeadModel.save_pretrained` writes today). The reverse writes the
unprefixed names, as MindFormers does; `GPT2LMHeadModel.from_pretrained` loads either.

Differences from MindFormers (its bugs, §5.7, §5.11, §5.12): every block is converted unless --layers N
is given (MindFormers converts `--layers`, default 12, and silently drops deeper blocks); prefixed input
converts (MindFormers silently drops every key it does not know, i.e. all of them); the causal-mask
buffers `attn.bias` / `attn.masked_bias` are left out (MindFormers copies them as `attention.beta` /
`masked_beta`, which nothing loads); an untied `lm_head.weight` stops the run (MindFormers' GPT-2 has no
head parameter, and it would drop it silently).
"""

from dataclasses import replace

from models.vit.declaration import layer_norm

from mindformers_conv.mapping import TRANSPOSE, ModelSpec, compose, drop_hf, equal_parts, rename, split, transform
from mindformers_conv.registry import register

BLOCK = "backbone.blocks.{i}"
# c_attn [H, 3H] → q, k, v [H, H] each as [out, in]: the transpose's rows split in thirds.
C_ATTN_WEIGHT = compose(TRANSPOSE, split(equal_parts(3)))


def gpt2_rules(prefix: str) -> tuple:
    """The table for HF keys under `prefix` ("" for the hub files, "transformer." for save_pretrained)."""
    layer = f"{prefix}h.{{i}}"
    dense = [f"{BLOCK}.attention.dense{k}" for k in (1, 2, 3)]
    return (
        *layer_norm(f"{layer}.ln_1", f"{BLOCK}.layernorm1"),
        *layer_norm(f"{layer}.ln_2", f"{BLOCK}.layernorm2"),
        transform(f"{layer}.attn.c_attn.weight", [f"{d}.weight" for d in dense], C_ATTN_WEIGHT),
        transform(f"{layer}.attn.c_attn.bias", [f"{d}.bias" for d in dense], split(equal_parts(3))),
        rename(f"{layer}.attn.c_proj.{{p}}", f"{BLOCK}.attention.projection.{{p}}"),
        rename(f"{layer}.mlp.c_fc.{{p}}", f"{BLOCK}.output.mapping.{{p}}"),
        rename(f"{layer}.mlp.c_proj.{{p}}", f"{BLOCK}.output.projection.{{p}}"),
        *layer_norm(f"{prefix}ln_f", "backbone.layernorm"),
        rename(f"{prefix}wte.weight", "backbone.embedding.word_embedding.embedding_table"),
        rename(f"{prefix}wpe.weight", "backbone.embedding.position_embedding.embedding_table"),
        *(drop_hf(f"{layer}.attn.{b}", "causal-mask buffers, rebuilt at load") for b in ("bias", "masked_bias")),
    )


GPT = register(ModelSpec(
    key="gpt",
    description="GPT-2",
    model_types=("gpt2",),
    architectures=("GPT2LMHeadModel", "GPT2Model"),
    forward_dtype=None,  # torch.load + pt2ms(v, None) keeps the stored dtype (§7)
    layers_flag=True,
    rules=(
        *gpt2_rules(""),  # first: the reverse writes the hub's (and MindFormers') unprefixed names
        *gpt2_rules("transformer."),
        replace(drop_hf("lm_head.weight", "tied to wte (MindFormers' GPT-2 head has no parameter)"),
                when=lambda cfg: cfg.get("tie_word_embeddings", True) is not False),
    ),
))
