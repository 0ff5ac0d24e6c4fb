"""glm4-mcore: GLM-4-0414 (`Glm4ForCausalLM`) in MindFormers 2.x mcore (GPTModel) names.

Facts: spec/mindformers_other.md §3.3 (glm4 weight_mapping: HF `mlp.gate_up_proj` is already [gate; up];
sandwich norms `post_self_attn_layernorm` / `post_mlp_layernorm` keep their names; fused training layouts,
models/mcore/rules.py). `--model glm4` stays the alias of glm-n (the ChatGLM-architecture GLM-4-9B).
"""

from models.mcore.rules import ATTENTION, FC1_INTERLEAVED, HEAD, HF, MS, NORMS, either, interleaved_mlp

from mindformers_conv.mapping import IDENTITY, ModelSpec, compose, equal_parts, rename, split
from mindformers_conv.registry import register

GLM4_MCORE = register(ModelSpec(
    key="glm4-mcore",
    description="GLM-4-0414 (Glm4ForCausalLM), MindFormers 2.x mcore names (fused linear_qkv / linear_fc1)",
    model_types=("glm4",),
    architectures=("Glm4ForCausalLM",),
    ms_names_of="qwen2-mcore",  # without the sandwich norms the MindSpore names are qwen2-mcore's
    rules=(
        *HEAD, *NORMS, *ATTENTION,
        *either(f"{HF}.mlp.gate_up_proj.{{p}}", f"{MS}.mlp.linear_fc1.{{p}}", interleaved_mlp,
                compose(split(equal_parts(2)), FC1_INTERLEAVED), IDENTITY),
        rename(f"{HF}.mlp.down_proj.{{p}}", f"{MS}.mlp.linear_fc2.{{p}}"),
        *(rename(f"{HF}.{norm}.weight", f"{MS}.{norm}.weight") for norm in
          ("post_self_attn_layernorm", "post_mlp_layernorm")),
    ),
))
