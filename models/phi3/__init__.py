"""Phi-3: HF Phi3ForCausalLM into MindFormers' llama layout (a walk-through family: docs/adding-a-model.md)."""
