"""GLM-4.1V: HF ↔ MindSpeed-MM Megatron layout."""
