"""Qwen2-MoE (Qwen2-57B-A14B): llama's names plus stacked routed experts and a gated shared expert."""
