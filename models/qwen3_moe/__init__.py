"""The qwen3-moe key: MindFormers 2.x mcore (GPTModel) names."""
