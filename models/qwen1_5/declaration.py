"""qwen1_5: MindFormers' research/qwen1_5 scripts (not in its map): qwen2's conversion, Float16 by default.

Facts: spec/mindformers_llm.md §4.6, 7 (the Qwen1.5 README path: the same renames, every tensor forced
to Float16; its reverse is the llama inverse table). That script iterates named_parameters() and so
drops a tied head; ours emits it as qwen2 does (MindFormers' Llama has its own `lm_head.weight`).
No model_types: Qwen1.5 configs say `qwen2`, and `--model auto` picks the qwen2 key for them.
"""

from models.qwen2.declaration import QWEN2

from mindformers_conv.registry import register

register(QWEN2.variant("qwen1_5", "Qwen1.5 (research/qwen1_5 script: Float16 by default)", model_types=(),
                       architectures=(), forward_dtype="F16"))
