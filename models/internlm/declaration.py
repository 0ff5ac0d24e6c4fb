"""internlm: InternLM-7B/20B v1 (remote code `InternLMForCausalLM`) is llama's declaration under its own key.

Facts: spec/mindformers_llm.md §4.9 (llama's name table; q/k/v/o carry biases, matched by llama's `{p}`;
no transforms) and §8 (Float32 without --dtype, as llama).
"""

from models.llama.declaration import LLAMA

from mindformers_conv.registry import register

register(LLAMA.variant("internlm", "InternLM-7B/20B (v1)", model_types=("internlm",),
                       architectures=("InternLMForCausalLM",)))
