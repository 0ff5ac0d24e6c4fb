"""Qwen2.5 dense models: qwen2's declaration under MindFormers' qwen2_5 key (bf16, plain LoRA names)."""
