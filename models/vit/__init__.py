"""ViT (MAE-finetuned ViT-B/16 classification, timm-style `.pth`); owns the ViT block and layer-norm helpers."""
