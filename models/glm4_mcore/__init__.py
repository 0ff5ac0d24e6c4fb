"""The glm4-mcore key: MindFormers 2.x mcore (GPTModel) names."""
