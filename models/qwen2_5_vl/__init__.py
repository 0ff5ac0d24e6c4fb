"""Qwen2.5-VL: HF ↔ MindSpeed-MM Megatron layout."""
