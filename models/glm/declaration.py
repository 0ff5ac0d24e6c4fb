"""glm: ChatGLM-6B (remote code `ChatGLMForConditionalGeneration`, v1.3.2 to v1.4.0-beta2).

Facts: spec/mindformers_other.md §2.1 (names kept except LayerNorm weight/bias → gamma/beta and the
embedding → embedding_table; the per-head interleaved query_key_value copied as is; no transposes) and
§7 (every tensor float16 without --dtype: the converter `.half()`s the model).

Differences from MindFormers: the HF folder is read as given (its `dirname(input_path)` loads the parent
folder unless the path ends in `/`, §5.3); the rotary inv_freq buffers are left out (§5.11); under an
explicit --dtype input_layernorm follows it (MindFormers forces it back to float16 whatever --dtype says).
"""

from models.vit.declaration import layer_norm

from mindformers_conv.mapping import ModelSpec, drop_hf, rename
from mindformers_conv.registry import register

LAYER = "transformer.layers.{i}"

GLM = register(ModelSpec(
    key="glm",
    description="ChatGLM-6B",
    model_types=("chatglm",),  # shared with glm-n: the tensor names decide (registry.detect)
    architectures=("ChatGLMModel", "ChatGLMForConditionalGeneration"),
    forward_dtype="F16",  # AutoModel.from_pretrained(...).half() (§7)
    tied=("lm_head.weight", "transformer.word_embeddings.weight"),
    lora_style="tk_delta_lora",  # the glm reverse maps tk_delta_lora_a/_b (§2.1 reverse)
    rules=(
        rename("transformer.word_embeddings.weight", "transformer.word_embeddings.embedding_table"),
        *layer_norm(f"{LAYER}.input_layernorm", f"{LAYER}.input_layernorm", ms_dtype="F16"),  # forced fp16 (§2.1)
        # [3H, H] rows ordered (head, q/k/v, head_dim) on both sides: no re-layout.
        rename(f"{LAYER}.attention.query_key_value.{{p}}", f"{LAYER}.attention.query_key_value.{{p}}"),
        rename(f"{LAYER}.attention.dense.{{p}}", f"{LAYER}.attention.dense.{{p}}"),
        *layer_norm(f"{LAYER}.post_attention_layernorm", f"{LAYER}.post_attention_layernorm"),
        rename(f"{LAYER}.mlp.dense_h_to_4h.{{p}}", f"{LAYER}.mlp.dense_h_to_4h.{{p}}"),
        rename(f"{LAYER}.mlp.dense_4h_to_h.{{p}}", f"{LAYER}.mlp.dense_4h_to_h.{{p}}"),
        *layer_norm("transformer.final_layernorm", "transformer.final_layernorm"),
        rename("lm_head.weight", "lm_head.weight"),
        drop_hf(f"{LAYER}.attention.rotary_emb.inv_freq", "rotary inv_freq buffer, recomputed at load"),
    ),
))
