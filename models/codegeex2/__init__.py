"""CodeGeeX2-6B (codegeex2), the ChatGLM2 architecture."""
