"""Qwen v1 (Qwen-7B/14B/72B, remote code)."""
