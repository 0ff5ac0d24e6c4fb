"""mae: MAE ViT pre-training, Facebook `{"model": state_dict}` `.pth` (encoder only, or with decoder).

Facts: spec/mindformers_other.md §2.11 (vit's rules; the final `norm` stays `vit.norm`) and §7 (decoder
blocks named as encoder blocks; decoder_embed / decoder_pred not transposed; source dtype kept).

Corrected MindFormers bugs (§5.1, §5.9): v1.3.2's `convert_pt_to_ms` takes no `**kwargs`, so its CLI raises
TypeError; and it prefixes `vit.` to the decoder keys too, while `ViTMAEForPreTraining` holds the decoder
(`decoder_embed`, `mask_tokens`, `decoder_pos_embed`, `decoder_blocks`, `decoder_norm`, `decoder_pred`) at
the top level: those are written at the top level here, so the decoder loads.
"""

from models.vit.declaration import ENCODER, VIT, block, layer_norm

from mindformers_conv.mapping import ModelSpec, rename
from mindformers_conv.registry import register

register(ModelSpec(
    key="mae",
    description="MAE ViT pre-training (Facebook MAE .pth, encoder and decoder)",
    forward_dtype=VIT.forward_dtype,
    pickle_wrap=VIT.pickle_wrap,
    rules=(
        *ENCODER,
        *layer_norm("norm", "vit.norm"),  # ViTMAEModel.norm
        rename("mask_token", "mask_tokens"),
        rename("decoder_embed.{p}", "decoder_embed.{p}"),  # a transpose_b=True Linear: no transpose
        rename("decoder_pos_embed", "decoder_pos_embed"),
        *block("decoder_blocks.{i}", "decoder_blocks.{i}"),
        *layer_norm("decoder_norm", "decoder_norm"),
        rename("decoder_pred.{p}", "decoder_pred.{p}"),
    ),
))
