"""Qwen-VL / Qwen-VL-Chat (remote code): Qwen LLM plus ViT and resampler."""
