"""Qwen1.5 / Qwen2 dense models: the llama declaration under the key qwen2."""
