"""skywork: Skywork-13B (remote code, Llama architecture) is llama's declaration under its own key.

Facts: spec/mindformers_llm.md §4.3 and §4.13 (MindFormers' skywork files are byte-identical to deepseek's,
loaded through LlamaForCausalLM; final names are llama's table; no transforms; Float32 without --dtype).
MindFormers v1.3.2's map names research.skywork, which that tag does not ship (ModuleNotFoundError).
"""

from models.llama.declaration import LLAMA

from mindformers_conv.registry import register

register(LLAMA.variant("skywork", "Skywork-13B (Llama architecture)", model_types=("skywork",),
                       architectures=("SkyworkForCausalLM",)))
