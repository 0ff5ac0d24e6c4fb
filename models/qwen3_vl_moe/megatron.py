"""qwen3_vl_moe: Qwen3-VL-MoE (`Qwen3VLMoeForConditionalGeneration`) ↔ MindSpeed-MM's Megatron layout.

Qwen3-VL's declaration (models/qwen3_vl) plus the experts of spec/megatron_layout.md §5: the router
`mlp.gate` → `mlp.router.weight` (replicated); the stacked `mlp.experts.gate_up_proj` [E, H, 2I] →
per expert `local_experts.{e}.linear_fc1.weight` = its [2I, H] transpose ([gate; up], GLU split),
`down_proj` [E, I, H] → `linear_fc2.weight` [H, I] (column split); experts spread over --ep. Layers
listed in `mlp_only_layers` keep the dense MLP rules (MindSpeed-MM's converter stops on them).
"""

from dataclasses import replace

from models.qwen3_vl.megatron import LLM, MG, QWEN3_VL

from mindformers_conv.mapping import STACK, SWAP_LAST, compose, invert, rename, transform
from mindformers_conv.registry import register_megatron

PER_EXPERT = invert(compose(STACK, SWAP_LAST))  # [E, in, out] ↔ E × [out, in]

QWEN3_VL_MOE = register_megatron(replace(
    QWEN3_VL,
    key="qwen3_vl_moe",
    description="Qwen3-VL-MoE (MindSpeed-MM Megatron layout only; SequentialMLP experts)",
    model_types=("qwen3_vl_moe",),
    architectures=("Qwen3VLMoeForConditionalGeneration",),
    rules=(
        *QWEN3_VL.rules,
        rename(f"{LLM}.mlp.gate.weight", f"{MG}.mlp.router.weight"),
        transform(f"{LLM}.mlp.experts.gate_up_proj", f"{MG}.mlp.experts.local_experts.{{e}}.linear_fc1.weight",
                  PER_EXPERT, gather="e"),
        transform(f"{LLM}.mlp.experts.down_proj", f"{MG}.mlp.experts.local_experts.{{e}}.linear_fc2.weight",
                  PER_EXPERT, gather="e"),
    ),
))
