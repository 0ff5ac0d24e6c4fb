"""qwen2-mcore: Qwen2 / Qwen2.5 dense models in MindFormers 2.x mcore (GPTModel) names.

Facts: spec/mindformers_other.md §3.3 (qwen2 weight_mapping; fused training layouts, models/mcore/rules.py).
q/k/v biases fuse into `linear_qkv.bias` in the same layout as the weight. `--model qwen2` stays the
v1.x llama-style layout; this key is chosen by name only (config.json says qwen2 for both).
"""

from models.mcore.rules import DENSE_LAYER, HEAD

from mindformers_conv.mapping import ModelSpec
from mindformers_conv.registry import register

QWEN2_MCORE = register(ModelSpec(
    key="qwen2-mcore",
    description="Qwen2 / Qwen2.5 dense, MindFormers 2.x mcore names (fused linear_qkv / linear_fc1)",
    ms_names_of="llama",  # its HF names are llama's: from HF names alone, llama is the plain reading
    rules=(*HEAD, *DENSE_LAYER),
))
