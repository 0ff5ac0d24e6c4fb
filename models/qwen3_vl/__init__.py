"""Qwen3-VL: HF ↔ MindSpeed-MM Megatron layout."""
