"""Models named by the `model` config group (built with Hydra's `_target_`)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class SimpleCNN(nn.Module):
    """The report's SimpleCNN for 32x32 RGB images (about 2.2M parameters at width 1).

    `width` scales every layer's channels and hidden units (c = 32 * width): 0.25 makes the
    proxy scorer of `gate.scoring=proxy`, about 7% of the full model's forward FLOPs.
    """

    def __init__(self, num_classes: int = 10, dropout: float = 0.5, width: float = 1.0):
        super().__init__()
        c = max(1, round(32 * width))
        self.features = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.ReLU(),           # [B, c, 32, 32]
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(),       # [B, 2c, 32, 32]
            nn.MaxPool2d(2),                                    # [B, 2c, 16, 16]
            nn.Conv2d(2 * c, 4 * c, 3, padding=1), nn.ReLU(),   # [B, 4c, 16, 16]
            nn.MaxPool2d(2),                                    # [B, 4c, 8, 8]
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),                                       # [B, 4c * 64]
            nn.Linear(4 * c * 8 * 8, 8 * c), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(8 * c, num_classes),                      # [B, classes]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_vit(num_classes: int = 10, img_size: int = 32, patch_size: int = 4, embed_dim: int = 192,
              depth: int = 6, num_heads: int = 3, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
              attention: Callable[..., nn.Module] | None = None) -> nn.Module:
    """A timm VisionTransformer for small images (patch 4 on 32x32: 64 patches + class token).

    `attention` is a factory `(dim, num_heads, qkv_bias) -> module`; when given, it replaces
    every block's `attn`, so attention variants plug in without forking timm's model code.
    """
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=img_size, patch_size=patch_size, num_classes=num_classes,
                              embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                              mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate,
                              class_token=True, global_pool="token")
    if attention is not None:
        for block in model.blocks:
            block.attn = attention(dim=embed_dim, num_heads=num_heads, qkv_bias=True)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

