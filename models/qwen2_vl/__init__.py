"""Qwen2-VL: HF ↔ MindSpeed-MM Megatron layout."""
