"""The glm4-moe key: MindFormers 2.x mcore (GPTModel) names."""
