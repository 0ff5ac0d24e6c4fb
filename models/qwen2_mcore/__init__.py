"""The qwen2-mcore key: MindFormers 2.x mcore (GPTModel) names."""
