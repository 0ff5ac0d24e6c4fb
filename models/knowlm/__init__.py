"""KnowLM-13B (LLaMA-based): the llama declaration under its own key."""
