"""The two halves of an honest gated step.

1. `score_batch`: one forward over the whole batch under `torch.inference_mode()` (no
   autograd graph, no activations kept), only for gates that need scores.
2. `train_on_subset`: forward and backward on the selected rows only. Skipped samples
   never enter the graph, so they cost nothing in the backward pass; masking the loss of
   a full-batch backward would pay for them all.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from adaptive_sparse.attention import auxiliary_loss
from adaptive_sparse.significance import BatchScores


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast when asked for, otherwise a no-op."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def score_batch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                precision: str = "fp32") -> BatchScores:
    """Per-sample loss and entropy from one inference-mode forward (eval mode: no dropout noise)."""
    was_training = model.training
    model.eval()
    with torch.inference_mode(), autocast_context(images.device, precision):
        logits = model(images)  # [B, C]
    model.train(was_training)
    return BatchScores.from_logits(logits, labels)


def train_on_subset(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                    labels: torch.Tensor, precision: str = "fp32",
                    indexer_losses: list[torch.Tensor] | None = None) -> torch.Tensor:
    """One optimiser step on exactly these samples; returns their detached per-sample losses.

    A sparse attention's indexer loss (see `auxiliary_loss`) joins the loss with its weight, and
    its unweighted value is appended to `indexer_losses` when a list is given.
    """
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(images.device, precision):
        logits = model(images)  # [k, C]
    losses = F.cross_entropy(logits.float(), labels, reduction="none")  # [k]
    loss = losses.mean()
    aux = auxiliary_loss(model)
    if aux is not None:
        loss = loss + aux.weighted
        if indexer_losses is not None:
            indexer_losses.append(aux.mean_kl)
    loss.backward()
    optimizer.step()
    return losses.detach()


@torch.inference_mode()
def evaluate(model: nn.Module, loader, precision: str = "fp32") -> tuple[float, float]:
    """Mean cross-entropy and accuracy (percent) over every sample the loader yields."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.long)
    count = 0
    for images, labels, _ in loader:
        with autocast_context(images.device, precision):
            logits = model(images).float()  # [B, C]
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double().cpu()
        correct += (logits.argmax(1) == labels).sum().cpu()
        count += len(labels)
    model.train(was_training)
    return loss_sum.item() / count, 100.0 * correct.item() / count
