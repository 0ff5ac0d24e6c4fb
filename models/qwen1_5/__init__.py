"""Qwen1.5 through MindFormers' research/qwen1_5 scripts: qwen2's declaration, Float16 default."""
