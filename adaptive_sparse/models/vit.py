"""A small ViT for CIFAR-sized images, built with timm (`pip install timm`), with its attention
swappable for this package's dense or sparse layers."""
from __future__ import annotations

from typing import Callable

from timm.models.vision_transformer import VisionTransformer
from torch import nn


def build_vit(num_classes: int = 10, img_size: int = 32, patch_size: int = 4, embed_dim: int = 192,
              depth: int = 6, num_heads: int = 3, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
              attention: Callable[..., nn.Module] | None = None) -> nn.Module:
    """A timm VisionTransformer for small images (patch 4 on 32x32: 64 patches + class token).

    `attention` is a factory `(dim, num_heads, qkv_bias) -> module`; when given, it replaces
    every block's `attn`, so attention variants plug in without forking timm's model code.
    """
    model = VisionTransformer(img_size=img_size, patch_size=patch_size, num_classes=num_classes,
                              embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                              mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate,
                              class_token=True, global_pool="token")
    if attention is not None:
        for block in model.blocks:
            block.attn = attention(dim=embed_dim, num_heads=num_heads, qkv_bias=True)
    return model
