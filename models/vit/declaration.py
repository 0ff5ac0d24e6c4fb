"""vit: MAE-finetuned ViT-B/16 classification, timm-style `{"model": state_dict}` `.pth`.

Facts: spec/mindformers_other.md §2.12 (cls_token → cls_tokens, `vit.` prefix on every non-head key,
norm → layernorm except fc_norm, LayerNorm gamma/beta, qkv split in three contiguous blocks, attention
projection and MLP weights transposed to the `transpose_b=False` [in, out] layout) and §7 (source dtype
kept; the reverse pickle is `{"model": …}`). MindFormers' v1.3.2 `convert_pt_to_ms` takes no `**kwargs`,
so its own CLI raises TypeError for `--model vit` (§5.1); this converter runs.

The helpers here (`layer_norm`, `linear_in_out`, `block`) are shared with mae, swin, blip, whisper,
qwenvl and cogvlm2.
"""

from mindformers_conv.mapping import TRANSPOSE, ModelSpec, equal_parts, rename, split, transform
from mindformers_conv.registry import register

QKV_THIRDS = split(equal_parts(3))  # contiguous [q; k; v] rows (timm, LAVIS EVA, nn.MultiheadAttention)


def layer_norm(hf: str, ms: str, **kw) -> tuple:
    """A LayerNorm: HF weight/bias ↔ MindSpore gamma/beta (spec §1.4)."""
    return rename(f"{hf}.weight", f"{ms}.gamma", **kw), rename(f"{hf}.bias", f"{ms}.beta", **kw)


def linear_in_out(hf: str, ms: str, **kw) -> tuple:
    """nn.Linear [out, in] ↔ a `transpose_b=False` MindFormers Linear, whose weight is [in, out] (spec §1.4)."""
    return transform(f"{hf}.weight", f"{ms}.weight", TRANSPOSE, **kw), rename(f"{hf}.bias", f"{ms}.bias", **kw)


def block(hf: str, ms: str, qkv=("weight", "bias"), **kw) -> tuple:
    """One timm-style pre-norm block ↔ a MindFormers ViT block (spec §2.12 rules 3–6).

    fc1 is the MLP's mapping [W, ffn] and fc2 its projection [ffn, W] once transposed.
    """
    return (
        *layer_norm(f"{hf}.norm1", f"{ms}.layernorm1", **kw),
        *layer_norm(f"{hf}.norm2", f"{ms}.layernorm2", **kw),
        *(transform(f"{hf}.attn.qkv.{p}", [f"{ms}.attention.dense{k}.{p}" for k in (1, 2, 3)], QKV_THIRDS, **kw)
          for p in qkv),
        *linear_in_out(f"{hf}.attn.proj", f"{ms}.attention.projection", **kw),
        *linear_in_out(f"{hf}.mlp.fc1", f"{ms}.output.mapping", **kw),
        *linear_in_out(f"{hf}.mlp.fc2", f"{ms}.output.projection", **kw),
    )


# The encoder as MindFormers' ViT and MAE models both name it (under `vit.`).
ENCODER = (
    rename("cls_token", "vit.cls_tokens"),
    rename("pos_embed", "vit.pos_embed"),
    rename("patch_embed.proj.{p}", "vit.patch_embed.proj.{p}"),
    *block("blocks.{i}", "vit.blocks.{i}"),
)

VIT = register(ModelSpec(
    key="vit",
    description="ViT-B/16 classification (MAE-finetuned, timm-style .pth)",
    forward_dtype=None,  # pt2ms(v, None) keeps the stored dtype (§7)
    pickle_wrap="model",  # the reverse writes {"model": state_dict} (§1.5)
    rules=(
        *ENCODER,
        rename("mask_token", "vit.mask_tokens"),
        *layer_norm("fc_norm", "vit.fc_norm"),  # global-pool head norm keeps its name
        *layer_norm("norm", "vit.layernorm"),  # final norm of a cls-token model: norm → layernorm
        rename("head.{p}", "head.{p}"),  # no prefix, no transpose
    ),
))
