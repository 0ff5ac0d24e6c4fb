"""Whisper (HF `WhisperForConditionalGeneration`, e.g. whisper-large-v3); owns the insert-axis op."""
