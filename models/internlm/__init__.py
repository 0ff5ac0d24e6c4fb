"""InternLM v1: the llama declaration under its own key."""
