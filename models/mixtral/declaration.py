"""mixtral: Mixtral-8x7B / 8x22B (`MixtralForCausalLM`): llama's names plus stacked experts, MoE v1 naming.

Facts: spec/mindformers_llm.md §4.8 (attention, norms, embedding and head as llama; router
`block_sparse_moe.gate` → `feed_forward.router.dense`; experts w1/w2/w3 (gate/down/up, as MS) stacked per
layer on axis 0 in expert order into `feed_forward.ffn.wX` [E, out, in], or [E, in, out] under --use_gmm;
Float32 without --dtype). MindFormers hard-codes 8 experts both ways and its reverse does not transpose
gmm experts back; here the count is config.json's num_local_experts (or what the input has) and the
reverse is the exact inverse of either layout.
"""

from models.llama.declaration import ATTENTION_QKV, BODY, EMBEDDING, LAYER, LLAMA

from mindformers_conv.mapping import ModelSpec, expert_stacks, rename
from mindformers_conv.registry import register


MOE = f"{LAYER}.block_sparse_moe"
# llama's o_proj, norms and head without its dense MLP: with it, any llama `.ckpt` would also fit a MoE key
# under `--model auto`.
BODY_WITHOUT_MLP = tuple(rule for rule in BODY if ".mlp." not in rule.hf[0].text)

MIXTRAL = register(ModelSpec(
    key="mixtral",
    description="Mixtral-8x7B / 8x22B (--use_gmm for [E, in, out] experts)",
    model_types=("mixtral",),
    architectures=("MixtralForCausalLM",),
    forward_dtype="F32",  # every tensor goes through fp32 numpy; no --dtype keeps that (§4.8, 4)
    tied=LLAMA.tied,  # MindFormers reads the files, so it never sees a tied head; we emit it as llama does
    lora_style=LLAMA.lora_style,  # MindFormers runs it as its Llama model (with moe_config)
    rules=(
        EMBEDDING, *ATTENTION_QKV, *BODY_WITHOUT_MLP,
        rename(f"{MOE}.gate.weight", f"{LAYER}.feed_forward.router.dense.weight"),
        *expert_stacks(f"{MOE}.experts.{{e}}.w1.weight", f"{LAYER}.feed_forward.ffn.w1.weight", hidden_axis=2),
        *expert_stacks(f"{MOE}.experts.{{e}}.w2.weight", f"{LAYER}.feed_forward.ffn.w2.weight", hidden_axis=1),
        *expert_stacks(f"{MOE}.experts.{{e}}.w3.weight", f"{LAYER}.feed_forward.ffn.w3.weight", hidden_axis=2),
    ),
))
