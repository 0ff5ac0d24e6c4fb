"""swin: Swin-B p4w7, Microsoft `{"model": state_dict}` `.pth`; `--is_pretrain` for SimMIM checkpoints.

Facts: spec/mindformers_other.md §2.13 and §7. Finetuned (default): `encoder.` is prefixed to every
non-head key, `head.*` is kept. Pretrain (SimMIM, keys already under `encoder.`): no prefix, `decoder.0` →
`decoder`, `encoder.mask_token` kept. Both: patch_embed proj → projection; relative-position table and
index under `attn.relative_position_bias.`; LayerNorm gamma/beta; qkv split in three contiguous blocks
q/k/v; MLP fc1/fc2 → mapping/projection transposed; attn.proj, downsample.reduction and attn_mask kept.
The reverse takes `--is_pretrain` too, as MindFormers' does.

Differences from MindFormers (its bugs, §5.2, §5.7, §5.11): `--is_pretrain false` means false (its CLI
reads any value as True); an existing output is replaced (it silently writes nothing); and `--dtype` casts
floating tensors only, so `relative_position_index` stays an integer (it becomes float there and no longer
loads into the int32 Parameter).
"""

from models.vit.declaration import QKV_THIRDS, layer_norm, linear_in_out

from mindformers_conv.mapping import ModelSpec, rename, transform
from mindformers_conv.registry import register


def pretrain(cfg) -> bool:
    return bool(cfg.get("is_pretrain"))


def finetuned(cfg) -> bool:
    return not pretrain(cfg)


def encoder(hf: str, when) -> tuple:
    """The Swin encoder with HF keys under `hf` ("" or "encoder.") and MS keys under `encoder.`."""
    blk, ms_blk = f"{hf}layers.{{i}}.blocks.{{j}}", "encoder.layers.{i}.blocks.{j}"
    stage, ms_stage = f"{hf}layers.{{i}}.downsample", "encoder.layers.{i}.downsample"
    return (
        rename(f"{hf}patch_embed.proj.{{p}}", "encoder.patch_embed.projection.{p}", when=when),
        *layer_norm(f"{hf}patch_embed.norm", "encoder.patch_embed.norm", when=when),
        *layer_norm(f"{blk}.norm1", f"{ms_blk}.norm1", when=when),
        *layer_norm(f"{blk}.norm2", f"{ms_blk}.norm2", when=when),
        rename(f"{blk}.attn.relative_position_{{x}}", f"{ms_blk}.attn.relative_position_bias.relative_position_{{x}}",
               when=when),  # _bias_table, and the int64 _index buffer
        transform(f"{blk}.attn.qkv.{{p}}", [f"{ms_blk}.attn.{q}.{{p}}" for q in "qkv"], QKV_THIRDS, when=when),
        rename(f"{blk}.attn.proj.{{p}}", f"{ms_blk}.attn.proj.{{p}}", when=when),  # transpose_b=True Linear
        *linear_in_out(f"{blk}.mlp.fc1", f"{ms_blk}.mlp.mapping", when=when),
        *linear_in_out(f"{blk}.mlp.fc2", f"{ms_blk}.mlp.projection", when=when),
        rename(f"{blk}.attn_mask", f"{ms_blk}.attn_mask", when=when),  # shifted blocks only
        rename(f"{stage}.reduction.weight", f"{ms_stage}.reduction.weight", when=when),
        *layer_norm(f"{stage}.norm", f"{ms_stage}.norm", when=when),
        *layer_norm(f"{hf}norm", "encoder.norm", when=when),
    )


register(ModelSpec(
    key="swin",
    description="Swin Transformer (Microsoft .pth; SimMIM pre-training with --is_pretrain)",
    forward_dtype=None,  # pt2ms(v, None) keeps the stored dtype, int64 index included (§7)
    pickle_wrap="model",  # the reverse writes {"model": state_dict} (§1.5)
    rules=(
        *encoder("", finetuned),
        rename("head.{p}", "head.{p}", when=finetuned),
        *encoder("encoder.", pretrain),
        rename("encoder.mask_token", "encoder.mask_token", when=pretrain),
        rename("decoder.0.{p}", "decoder.{p}", when=pretrain),
    ),
))
