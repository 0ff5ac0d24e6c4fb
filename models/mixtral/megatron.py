"""mixtral as a Megatron-core GPT MoE model (SequentialMLP experts, spec §5).

Router `block_sparse_moe.gate` → `mlp.router.weight` (replicated); expert e's w1/w3 (gate/up) →
`mlp.experts.local_experts.{e}.linear_fc1.weight` = [gate; up] (GLU split), w2 → `linear_fc2.weight`
(column split). Experts are placed over EP ranks and renumbered locally by the layout.
"""

from dataclasses import replace

from models.llama.megatron import GATE_UP, LLAMA_MEGATRON

from mindformers_conv.mapping import rename, transform
from mindformers_conv.registry import register_megatron

from .declaration import MIXTRAL

MOE, M = "model.layers.{i}.block_sparse_moe", "decoder.layers.{i}.mlp"

MIXTRAL_MEGATRON = register_megatron(replace(
    LLAMA_MEGATRON,  # llama's GPT names and layout, plus the router and experts
    key="mixtral",
    description="Mixtral as Megatron-core GPT MoE (SequentialMLP experts)",
    model_types=MIXTRAL.model_types,
    architectures=MIXTRAL.architectures,
    rules=(
        *LLAMA_MEGATRON.rules,  # the dense-MLP rules match nothing here
        rename(f"{MOE}.gate.weight", f"{M}.router.weight"),
        transform([f"{MOE}.experts.{{e}}.w1.weight", f"{MOE}.experts.{{e}}.w3.weight"],
                  f"{M}.experts.local_experts.{{e}}.linear_fc1.weight", GATE_UP),
        rename(f"{MOE}.experts.{{e}}.w2.weight", f"{M}.experts.local_experts.{{e}}.linear_fc2.weight"),
    ),
))
