"""Models the `model` config group builds: SimpleCNN, FastNet, a char GPT, and a timm ViT
(`adaptive_sparse.models.vit`, which needs timm)."""
from adaptive_sparse.models.cnn import SimpleCNN
from adaptive_sparse.models.fastnet import FastNet
from adaptive_sparse.models.gpt import GPT

__all__ = ["FastNet", "GPT", "SimpleCNN"]
