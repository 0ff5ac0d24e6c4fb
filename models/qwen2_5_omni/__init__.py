"""Qwen2.5-Omni (thinker): HF ↔ MindSpeed-MM Megatron layout."""
