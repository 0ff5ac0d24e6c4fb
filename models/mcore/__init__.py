"""Shared HF ↔ MindFormers 2.x "mcore" (GPTModel) rules; no model key of its own."""
