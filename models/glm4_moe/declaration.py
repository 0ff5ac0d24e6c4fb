"""glm4-moe: GLM-4.5 / 4.6 (`Glm4MoeForCausalLM`) in MindFormers 2.x mcore (GPTModel) names.

Facts: spec/mindformers_other.md §3.3 (glm4_moe weight_mapping: router weight and e_score_correction_bias,
shared experts; routed experts as GroupedMLP weight1 / weight2; fused training layouts, models/mcore/rules.py).
Dense layers (i < first_k_dense_replace) take the dense MLP rules. MindFormers' table has no rule for the
`use_qk_norm` norms; they get qwen3's mcore names here. The MTP layer (`num_nextn_predict_layers`) is not mapped.
"""

from models.mcore.rules import DENSE_LAYER, HEAD, QK_NORMS, ROUTED_EXPERTS, ROUTER, SHARED_EXPERTS

from mindformers_conv.mapping import ModelSpec
from mindformers_conv.registry import register

GLM4_MOE = register(ModelSpec(
    key="glm4-moe",
    description="GLM-4.5 / 4.6 (Glm4MoeForCausalLM), MindFormers 2.x mcore names (GroupedMLP experts)",
    model_types=("glm4_moe",),
    architectures=("Glm4MoeForCausalLM",),
    ms_names_of="qwen2-mcore",  # a checkpoint of dense layers only has qwen2-mcore's names
    rules=(*HEAD, *DENSE_LAYER, *QK_NORMS, *ROUTER, *ROUTED_EXPERTS, *SHARED_EXPERTS),
))
