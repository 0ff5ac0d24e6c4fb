"""phi3: Phi-3 / Phi-3.5-mini (HF `Phi3ForCausalLM`) into MindFormers' llama layout.

Phi-3 is a llama with two fused projections: `qkv_proj` = [q; k; v] rows and `gate_up_proj` = [gate; up]
rows. Split, they are llama's wq/wk/wv and w1/w3, so MindFormers' llama model loads the result; the
q/k/v row counts are llama's `qkv_rows` (heads and head_dim from config.json).
Not a MindFormers key: the source dtype is kept unless --dtype is given.
"""

from models.llama.declaration import BODY, EMBEDDING, LAYER, LLAMA, qkv_rows

from mindformers_conv.mapping import ModelSpec, equal_parts, split, transform
from mindformers_conv.registry import register


register(ModelSpec(
    key="phi3",
    ms_names_of="llama",  # the MindSpore side is llama's layout
    description="Phi-3 / Phi-3.5-mini (into MindFormers' llama layout)",
    model_types=("phi3",),
    architectures=("Phi3ForCausalLM",),
    tied=LLAMA.tied,
    lora_style=LLAMA.lora_style,
    rules=(
        EMBEDDING,
        transform(f"{LAYER}.self_attn.qkv_proj.weight",
                  [f"{LAYER}.attention.wq.weight", f"{LAYER}.attention.wk.weight", f"{LAYER}.attention.wv.weight"],
                  split(qkv_rows)),
        transform(f"{LAYER}.mlp.gate_up_proj.weight",
                  [f"{LAYER}.feed_forward.w1.weight", f"{LAYER}.feed_forward.w3.weight"],
                  split(equal_parts(2))),
        *BODY,
    ),
))
