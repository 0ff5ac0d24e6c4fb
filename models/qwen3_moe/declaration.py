"""qwen3-moe: Qwen3-MoE (`Qwen3MoeForCausalLM`) in MindFormers 2.x mcore (GPTModel) names.

Facts: spec/mindformers_other.md §3.3 (qwen3_moe weight_mapping: `mlp.gate` → `mlp.router`; routed experts
as GroupedMLP weight1 [E·H, 2Fm] / weight2 [E·Fm, H]; fused training layouts, models/mcore/rules.py).
Dense layers (`mlp_only_layers`) take the dense MLP rules.
"""

from models.mcore.rules import DENSE_LAYER, HEAD, QK_NORMS, ROUTED_EXPERTS, ROUTER

from mindformers_conv.mapping import ModelSpec
from mindformers_conv.registry import register

QWEN3_MOE = register(ModelSpec(
    key="qwen3-moe",
    description="Qwen3-MoE, MindFormers 2.x mcore names (fused linear_qkv, GroupedMLP experts)",
    model_types=("qwen3_moe",),
    architectures=("Qwen3MoeForCausalLM",),
    ms_names_of="qwen2-mcore",  # a checkpoint of dense layers only has qwen2-mcore's names
    rules=(*HEAD, *DENSE_LAYER, *QK_NORMS, *ROUTER, *ROUTED_EXPERTS),
))
