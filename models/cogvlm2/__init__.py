"""CogVLM2 (remote code): CogVLM2-Video-Llama3-Chat and CogVLM2-Llama3-Chat-19B (image)."""
