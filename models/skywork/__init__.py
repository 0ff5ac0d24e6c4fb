"""Skywork-13B: the llama declaration under its own key (MindFormers' files are deepseek's)."""
