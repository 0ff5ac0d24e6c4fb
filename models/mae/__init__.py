"""MAE ViT pre-training (Facebook MAE `.pth`), encoder plus optional decoder."""
