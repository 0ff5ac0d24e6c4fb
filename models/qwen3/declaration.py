"""qwen3: Qwen3 dense models (`Qwen3ForCausalLM`) in MindFormers 2.x mcore (GPTModel) names.

Facts: spec/mindformers_other.md §3.3 (qwen3 weight_mapping: q_norm/k_norm → q_layernorm/k_layernorm;
fused training layouts, models/mcore/rules.py). head_dim comes from config.json (≠ hidden / heads).
"""

from models.mcore.rules import DENSE_LAYER, HEAD, QK_NORMS

from mindformers_conv.mapping import ModelSpec
from mindformers_conv.registry import register

QWEN3 = register(ModelSpec(
    key="qwen3",
    description="Qwen3 dense, MindFormers 2.x mcore names (fused linear_qkv / linear_fc1)",
    model_types=("qwen3",),
    architectures=("Qwen3ForCausalLM",),
    ms_names_of="qwen2-mcore",  # without q/k layernorms the MindSpore names are qwen2-mcore's
    rules=(*HEAD, *DENSE_LAYER, *QK_NORMS),
))
