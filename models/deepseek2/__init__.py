"""DeepSeek-V2 / V2-Chat / V2-Lite (MLA + MoE)."""
