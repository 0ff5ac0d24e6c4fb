"""Qwen3-VL-MoE: HF ↔ MindSpeed-MM Megatron layout."""
