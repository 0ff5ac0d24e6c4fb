"""knowlm: KnowLM-13B (LLaMA-based, `LlamaForCausalLM`) is llama's declaration under its own key.

Facts: spec/mindformers_llm.md §4.14 (llama's name_replace; no transforms; pt2ms, so Float32 without
--dtype under transformers 4.x; reverse is the exact inverse). MindFormers v1.3.2's map names
research.knowlm, which that tag does not ship. KnowLM's config says `llama`, so no model_types here.
"""

from models.llama.declaration import LLAMA

from mindformers_conv.registry import register

register(LLAMA.variant("knowlm", "KnowLM-13B (LLaMA-based)", model_types=(), architectures=()))
