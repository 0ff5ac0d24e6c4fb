"""Swin Transformer (Microsoft classification `.pth`, or SimMIM pre-training with --is_pretrain)."""
