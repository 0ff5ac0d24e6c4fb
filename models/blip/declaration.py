"""blip: BLIP-2 stage-1 `Blip2Qformer`, Salesforce LAVIS `.pth` (a state dict or `{"model": state_dict}`).

Facts: spec/mindformers_other.md §2.7 and §7. EVA ViT (`visual_encoder`): cls_token → cls_tokens; blocks as
MindFormers' ViT (vit's `block`), qkv.weight split in three; q_bias/v_bias → dense1/dense3 bias with an
all-zero dense2 bias added (EVA has no k bias). Q-Former: `Qformer.` → `qformer.`, `self` → `self_att`,
`LayerNorm` → `layernorm` gamma/beta, embeddings `weight` → `embedding_table`; buffers (position_ids,
int64) and the 0-d `temp` pass through. Source dtype kept; the reverse pickle is `{"model": …}`.

Corrected MindFormers bugs (§5.9): it crosses the EVA MLP weights (fc2 → mapping, fc1 → projection, so
EVA-g's [1408, 6144] shapes do not load); here fc1 → mapping, fc2 → projection as in vit. Its reverse
never re-fuses dense1/2/3 into `attn.qkv.weight`; here it does, and gives back q_bias / v_bias.
"""


from models.vit.declaration import block, layer_norm

from mindformers_conv.mapping import ModelSpec, Op, rename, transform
from mindformers_conv.registry import register
from mindformers_conv.lazy import torch

# [q_bias, v_bias] ↔ [dense1.bias, dense2.bias = 0, dense3.bias]; backward leaves the zero k bias out.
EVA_QKV_BIAS = Op("zero k bias", lambda xs, cfg: [xs[0], torch.zeros_like(xs[0]), xs[1]],
                  lambda xs, cfg: [xs[0], xs[2]])

EVA, BERT, LAYER = "visual_encoder", "Qformer.bert", "Qformer.bert.encoder.layer.{i}"
MS_BERT, MS_LAYER = "qformer.bert", "qformer.bert.encoder.layer.{i}"

register(ModelSpec(
    key="blip",
    description="BLIP-2 stage 1 (Blip2Qformer, Salesforce LAVIS .pth)",
    forward_dtype=None,  # pt2ms(v, None) keeps the stored dtype (§7)
    pickle_wrap="model",  # the reverse writes {"model": state_dict} (§1.5)
    rules=(
        rename(f"{EVA}.cls_token", f"{EVA}.cls_tokens"),
        rename(f"{EVA}.pos_embed", f"{EVA}.pos_embed"),
        rename(f"{EVA}.patch_embed.proj.{{p}}", f"{EVA}.patch_embed.proj.{{p}}"),
        transform([f"{EVA}.blocks.{{i}}.attn.q_bias", f"{EVA}.blocks.{{i}}.attn.v_bias"],
                  [f"{EVA}.blocks.{{i}}.attention.dense{k}.bias" for k in (1, 2, 3)], EVA_QKV_BIAS),
        *block(f"{EVA}.blocks.{{i}}", f"{EVA}.blocks.{{i}}", qkv=("weight",)),
        *layer_norm(f"{EVA}.fc_norm", f"{EVA}.fc_norm"),  # unused by BLIP-2 (penultimate layer), kept
        *layer_norm("ln_vision", "ln_vision"),
        rename("query_tokens", "query_tokens"),
        rename(f"{BERT}.embeddings.{{x}}_embeddings.weight", f"{MS_BERT}.embeddings.{{x}}_embeddings.embedding_table"),
        *layer_norm(f"{BERT}.embeddings.LayerNorm", f"{MS_BERT}.embeddings.layernorm"),
        rename(f"{BERT}.embeddings.position_ids", f"{MS_BERT}.embeddings.position_ids"),
        # {a}: attention, and crossattention on every cross_attention_freq-th layer
        rename(f"{LAYER}.{{a}}.self.{{x}}.{{p}}", f"{MS_LAYER}.{{a}}.self_att.{{x}}.{{p}}"),
        rename(f"{LAYER}.{{a}}.output.dense.{{p}}", f"{MS_LAYER}.{{a}}.output.dense.{{p}}"),
        *layer_norm(f"{LAYER}.{{a}}.output.LayerNorm", f"{MS_LAYER}.{{a}}.output.layernorm"),
        # {x}: intermediate, output, and the query-token branch intermediate_query, output_query
        rename(f"{LAYER}.{{x}}.dense.{{p}}", f"{MS_LAYER}.{{x}}.dense.{{p}}"),
        *layer_norm(f"{LAYER}.{{x}}.LayerNorm", f"{MS_LAYER}.{{x}}.layernorm"),
        rename("Qformer.cls.predictions.bias", "qformer.cls.predictions.bias"),
        rename("Qformer.cls.predictions.decoder.{p}", "qformer.cls.predictions.decoder.{p}"),
        rename("Qformer.cls.predictions.transform.dense.{p}", "qformer.cls.predictions.transform.dense.{p}"),
        *layer_norm("Qformer.cls.predictions.transform.LayerNorm", "qformer.cls.predictions.transform.layernorm"),
        *(rename(f"{x}.{{p}}", f"{x}.{{p}}") for x in ("vision_proj", "text_proj", "itm_head")),
        rename("temp", "temp"),
    ),
))
