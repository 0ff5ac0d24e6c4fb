"""The qwen3 key: MindFormers 2.x mcore (GPTModel) names."""
