"""The ChatGLM2/3 and GLM-4 family (glm-n, its alias glm4; codegeex2 lives in models/codegeex2)."""
