"""DeepSeek-VL2: HF (remote code) ↔ MindSpeed-MM Megatron layout."""
