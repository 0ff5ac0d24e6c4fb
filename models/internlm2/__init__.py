"""InternLM2 (InternLM2-7B/20B, remote code)."""
