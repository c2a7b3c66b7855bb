"""The report's SimpleCNN for 32x32 images."""
from __future__ import annotations

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
