"""qwen2-moe: Qwen2-MoE (Qwen2-57B-A14B, `Qwen2MoeForCausalLM`): qwen2's names plus routed and shared experts.

Facts: spec/mindformers_llm.md §4.7 (attention with q/k/v biases, norms, embedding and head as qwen2;
router `mlp.gate` → `feed_forward.routed_experts.router.dense`; experts gate/down/up stacked per layer on
axis 0 in numeric expert order into `routed_experts.ffn.w1/w2/w3` [E, out, in], or [E, in, out] under
--use_gmm; the shared expert → `shared_experts.w1/w2/w3`, its gate → `shared_experts_gate`; Float32
without --dtype). The routed experts are named as deepseek2's (MoE v2), so its rules serve here.
MindFormers hard-codes 64 experts (Qwen1.5-MoE-A2.7B's 60 are mis-grouped) and has no reverse; here the
count is config.json's num_experts (or what the input has) and the reverse is the exact inverse.
Dense MLP layers (`mlp_only_layers`, empty in the released models) are not mapped: the run stops naming them.
"""

from models.deepseek2.declaration import experts
from models.llama.declaration import ATTENTION_QKV, EMBEDDING, LAYER, LLAMA
from models.mixtral.declaration import BODY_WITHOUT_MLP

from mindformers_conv.mapping import ModelSpec, rename
from mindformers_conv.registry import register

SHARED, MS_FFN = f"{LAYER}.mlp.shared_expert", f"{LAYER}.feed_forward"

QWEN2_MOE = register(ModelSpec(
    key="qwen2-moe",
    description="Qwen2-MoE (Qwen2-57B-A14B; --use_gmm for [E, in, out] experts)",
    model_types=("qwen2_moe",),
    architectures=("Qwen2MoeForCausalLM",),
    forward_dtype="F32",  # every tensor goes through fp32 numpy at v1.3.2; no --dtype keeps that (§4.7, 4)
    tied=LLAMA.tied,  # MindFormers reads the files, so it never sees a tied head; we emit it as qwen2 does
    lora_style=LLAMA.lora_style,  # MindFormers runs it as its Llama model (with moe_config)
    rules=(
        EMBEDDING, *ATTENTION_QKV, *BODY_WITHOUT_MLP,
        rename(f"{LAYER}.mlp.gate.weight", f"{MS_FFN}.routed_experts.router.dense.weight"),
        *experts("gate_proj", "w1", hidden_axis=2),
        *experts("down_proj", "w2", hidden_axis=1),
        *experts("up_proj", "w3", hidden_axis=2),
        rename(f"{SHARED}.gate_proj.weight", f"{MS_FFN}.shared_experts.w1.weight"),
        rename(f"{SHARED}.down_proj.weight", f"{MS_FFN}.shared_experts.w2.weight"),
        rename(f"{SHARED}.up_proj.weight", f"{MS_FFN}.shared_experts.w3.weight"),
        rename(f"{SHARED}_gate.weight", f"{MS_FFN}.shared_experts_gate.weight"),
    ),
))
