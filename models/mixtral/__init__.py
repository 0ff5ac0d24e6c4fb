"""Mixtral-8x7B / 8x22B: llama's names plus stacked experts (MoE v1 naming)."""
