"""qwen2_5: MindFormers' research/qwen2_5 converter (v1.4.0-beta1 … HEAD) is qwen2's renames with bf16 as
the default dtype and the plain `lora_a` / `lora_b` LoRA names of `--is_lora`.

Facts: spec/mindformers_other.md §3.1, spec/mindformers_llm.md §5. MindFormers materialises the model in
fp32 and casts; ours casts each tensor on its own (the same values). Its reverse writes one safetensors
file per layer; ours writes the hub's shards (`--max_shard_size`) with an index. `--qkv_concat` fuses,
from HF or from an existing MindSpore checkpoint, as llama's declaration describes.
"""

from models.qwen2.declaration import QWEN2

from mindformers_conv.registry import register

QWEN2_5 = register(QWEN2.variant("qwen2_5", "Qwen2.5 dense models (MindFormers' qwen2_5: bf16 by default)",
                                 model_types=(), architectures=(), forward_dtype="BF16", lora_style="lora"))
