"""FastNet: airbench94's network (Keller Jordan's CIFAR-10 speedrun), as `model=fastnet` builds it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FastNet(nn.Module):
    """A fast CIFAR-10 convnet written from the description of airbench94 (Jordan, "94% on
    CIFAR-10 in 3.29 seconds on a single GPU", arXiv 2404.00498):

    - a first 2x2 convolution whose filters are fixed to whiten 2x2 image patches (the
      eigenvectors of the training patches' covariance, scaled by 1/sqrt(eigenvalue), and
      their negatives), set from data by `fit_to_data`, without bias, followed by GELU;
    - three blocks of conv3x3 -> max-pool 2 -> BatchNorm -> GELU -> conv3x3 -> BatchNorm ->
      GELU, widths 64, 256, 256, their filters initialised to pass their input through
      (identity / Dirac init on the first input-width outputs);
    - BatchNorm without a learnable scale and with fast running statistics (torch momentum
      0.4: each batch makes up 0.4 of the running mean; the paper states it as 0.6 kept);
    - a final 3x3 max-pool, a bias-free linear layer, and logits scaled down by 1/9.

    BatchNorm normalises with the statistics of the batch it sees: under a gate that is the
    selected (packed) batch, so gating changes what BatchNorm averages over; evaluation uses
    the running statistics.
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (64, 256, 256),
                 whiten_kernel: int = 2, logit_scale: float = 1 / 9, bn_momentum: float = 0.4,
                 whiten_bias_epochs: int = 0):
        super().__init__()
        k = whiten_kernel
        whiten_width = 2 * 3 * k * k
        # airbench94 trains the whitening layer's bias for its first 3 epochs, then freezes it;
        # 0 leaves the layer without a bias
        self.whiten_bias_epochs = whiten_bias_epochs
        self.whiten = nn.Conv2d(3, whiten_width, k, padding=0, bias=whiten_bias_epochs > 0)  # [B, 24, 31, 31]
        self.whiten.weight.requires_grad_(False)  # set from data, never trained
        if self.whiten.bias is not None:
            self.whiten.bias.base_lr = True  # not a BatchNorm shift: no bias_lr_scale (optim.sgd_with_scaled_biases)
        layers, width_in = [], whiten_width
        for width in widths:
            layers += [nn.Conv2d(width_in, width, 3, padding=1, bias=False), nn.MaxPool2d(2),
                       self._norm(width, bn_momentum), nn.GELU(),
                       nn.Conv2d(width, width, 3, padding=1, bias=False), self._norm(width, bn_momentum), nn.GELU()]
            width_in = width
        self.blocks = nn.Sequential(*layers)  # [B, 256, 3, 3]
        self.head = nn.Sequential(nn.MaxPool2d(3), nn.Flatten(), nn.Linear(widths[-1], num_classes, bias=False))
        self.logit_scale = logit_scale
        for conv in (m for m in self.blocks if isinstance(m, nn.Conv2d)):
            nn.init.dirac_(conv.weight[:conv.in_channels])  # the first in_channels outputs pass their input on

    @staticmethod
    def _norm(width: int, momentum: float) -> nn.BatchNorm2d:
        norm = nn.BatchNorm2d(width, momentum=momentum, eps=1e-12)
        norm.weight.requires_grad_(False)  # scale fixed at 1; the bias learns
        return norm

    @torch.no_grad()
    def fit_to_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from normalised training images [N, 3, H, W]."""
        k = self.whiten.kernel_size[0]
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # [N, 3, H-k+1, W-k+1, k, k]
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * k * k)  # [P, 12]
        patches = patches - patches.mean(0)
        covariance = patches.T @ patches / len(patches)  # [12, 12]
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors.T / (eigenvalues + eps).sqrt()[:, None]).view(-1, 3, k, k)  # [12, 3, k, k]
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight))

    def start_epoch(self, epoch: int) -> None:
        """Epoch `epoch` (1-based) begins: the whitening bias trains in the first whiten_bias_epochs only."""
        if self.whiten.bias is not None:
            self.whiten.bias.requires_grad_(epoch <= self.whiten_bias_epochs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.whiten(x))
        return self.head(self.blocks(x)) * self.logit_scale
