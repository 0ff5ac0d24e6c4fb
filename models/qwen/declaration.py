"""qwen: Qwen v1 (Qwen-7B/14B/72B, remote code `QWenLMHeadModel`).

Facts: spec/mindformers_llm.md §4.5 (GPT-2-style names, `transformer.` prefix kept, c_attn split 3-way,
HF mlp.w2 → MS w3, no transposes) and §8 (Float32 without --dtype).
"""

from mindformers_conv.mapping import ModelSpec, drop_hf, equal_parts, rename, split, transform
from mindformers_conv.registry import register

LAYER, MS_LAYER = "transformer.h.{i}", "transformer.layers.{i}"

QWEN = register(ModelSpec(
    key="qwen",
    description="Qwen v1 (Qwen-7B/14B/72B)",
    model_types=("qwen",),
    architectures=("QWenLMHeadModel",),
    covers=("qwen2", "qwen2-moe"),  # the guide's `--model qwen` is also Qwen1.5/Qwen2: the input decides
    forward_dtype="F32",  # the remote-code loader materialises fp32 under transformers 4.x (§8)
    tied=("lm_head.weight", "transformer.wte.weight"),  # state_dict() emits a tied head
    rules=(
        rename("transformer.wte.weight", "transformer.wte.embedding_weight"),
        rename(f"{LAYER}.ln_1.{{p}}", f"{MS_LAYER}.attention_norm.{{p}}"),
        # Qwen v1 is MHA: [3H, H] weight and [3H] bias are q, k, v in equal thirds (array_split(·, 3)).
        # The reverse re-fuses the weight as well as the bias (MindFormers v1.3.2 re-fuses only the bias).
        transform(f"{LAYER}.attn.c_attn.{{p}}",
                  [f"{MS_LAYER}.attention.wq.{{p}}", f"{MS_LAYER}.attention.wk.{{p}}",
                   f"{MS_LAYER}.attention.wv.{{p}}"],
                  split(equal_parts(3))),
        rename(f"{LAYER}.attn.c_proj.{{p}}", f"{MS_LAYER}.attention.wo.{{p}}"),
        rename(f"{LAYER}.ln_2.{{p}}", f"{MS_LAYER}.ffn_norm.{{p}}"),
        # HF computes w1(x) * silu(w2(x)); MS QwenFeedForward w1(x) * silu(w3(x)): HF w2 is MS w3.
        rename(f"{LAYER}.mlp.w1.{{p}}", f"{MS_LAYER}.feed_forward.w1.{{p}}"),
        rename(f"{LAYER}.mlp.w2.{{p}}", f"{MS_LAYER}.feed_forward.w3.{{p}}"),
        rename(f"{LAYER}.mlp.c_proj.{{p}}", f"{MS_LAYER}.feed_forward.w2.{{p}}"),
        rename("transformer.ln_f.weight", "transformer.ln_f.weight"),
        rename("lm_head.weight", "lm_head.weight"),
        drop_hf("transformer.rotary_emb.inv_freq", "rotary inv_freq buffer, recomputed at load"),
    ),
))
