"""The ChatGLM-6B family (glm)."""
