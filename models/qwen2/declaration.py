"""qwen2: Qwen1.5 and Qwen2 dense models (`Qwen2ForCausalLM`) are llama's declaration under their own key.

Facts: spec/mindformers_llm.md §4.6 (deepseek's renames, whose result is llama's table; q/k/v biases,
matched by llama's `{p}`; no transforms; state_dict() emits a tied head, Qwen2-0.5B/1.5B) and §8
(Float32 without --dtype: transformers 4.x materialises fp32). MindFormers' `.numpy()` raises on a model
loaded in bf16; ours reads bf16 as is. MindFormers has no qwen2 reverse; ours is the exact inverse.
"""

from models.llama.declaration import LLAMA

from mindformers_conv.registry import register

QWEN2 = register(LLAMA.variant("qwen2", "Qwen1.5 / Qwen2 dense models", model_types=("qwen2",),
                               architectures=("Qwen2ForCausalLM",)))
