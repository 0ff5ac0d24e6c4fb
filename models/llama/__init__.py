"""The llama family (llama, yi, deepseek)."""
