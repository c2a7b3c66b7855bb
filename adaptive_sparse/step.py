"""The two halves of an honest gated step.

1. `score_batch`: one forward over the whole batch under `torch.inference_mode()` (no
   autograd graph, no activations kept), only for gates that need scores.
2. `train_on_subset`: forward and backward on the selected rows only. Skipped samples
   never enter the graph, so they cost nothing in the backward pass; masking the loss of
   a full-batch backward would pay for them all. The same step serves torchrun's ranks.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from adaptive_sparse.attention import auxiliary_loss
from adaptive_sparse.distributed import Distributed
from adaptive_sparse.significance import BatchScores


class NonFiniteLossError(FloatingPointError):
    """A NaN or infinite training loss; raised before the optimiser step, so the weights (and
    the last checkpoint on disk) are still the last good ones."""

    def __init__(self, epoch: int, step: int, losses: torch.Tensor | None = None):
        detail = (" (on another rank)" if losses is None
                  else f" ({int((~torch.isfinite(losses)).sum())} of {len(losses)} samples)")
        super().__init__(f"non-finite training loss at epoch {epoch}, step {step}{detail}; "
                         "stopping before the optimiser step, the last checkpoint is untouched")
        self.epoch, self.step = epoch, step


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


def forward_scores(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                   precision: str = "fp32", label_smoothing: float = 0.0) -> BatchScores:
    """The training forward: per-sample loss (with autograd) and entropy, empty for no rows."""
    if not len(labels):
        empty = torch.zeros(0, device=images.device)
        return BatchScores(empty, empty)
    with autocast_context(images.device, precision):
        logits = model(images)  # [k, C]
    return BatchScores.from_logits(logits, labels, label_smoothing)


def add_indexer_loss(loss: torch.Tensor, model: nn.Module, indexer_losses: list[torch.Tensor] | None,
                     scale: float = 1.0) -> torch.Tensor:
    """A sparse attention's indexer loss (see `auxiliary_loss`) joins `loss` with its weight
    (times `scale`); its unweighted value is appended to `indexer_losses` when a list is given."""
    aux = auxiliary_loss(model)
    if aux is None:
        return loss
    if indexer_losses is not None:
        indexer_losses.append(aux.mean_kl)
    return loss + scale * aux.weighted


def weighted_loss(losses: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The training objective of the selected rows: their mean, or sum(weights * losses) when a
    gate supplies weights (see `Selection.weight`)."""
    return losses.mean() if weights is None else (weights.to(losses.dtype) * losses).sum()


def train_on_subset(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                    labels: torch.Tensor, precision: str = "fp32", *, weights: torch.Tensor | None = None,
                    epoch: int = 0, step: int = 0, indexer_losses: list[torch.Tensor] | None = None,
                    ranks: Distributed | None = None, scaler: torch.amp.GradScaler | None = None,
                    label_smoothing: float = 0.0) -> BatchScores:
    """One optimiser step on exactly these samples, for one process and for torchrun's ranks
    alike (a single process is world size 1); returns their detached per-sample loss and
    entropy (what memory scoring remembers, at no extra cost), possibly empty on a rank that
    selected nothing.

    Unweighted, the objective is the mean loss over every rank's selected samples: each rank
    backpropagates its sum divided by the global count, and the gradients are summed over
    ranks. With a gate's `weights`, each rank's weighted sum estimates its own batch's mean
    loss, and the objective is their mean over ranks. A non-finite loss on any rank raises
    NonFiniteLossError (naming epoch and step) on every rank before any update. `scaler`
    (fp16) scales the loss and skips steps whose gradients overflow.
    """
    ranks = ranks or Distributed()
    optimizer.zero_grad(set_to_none=True)
    scores = forward_scores(model, images, labels, precision, label_smoothing)
    finite = bool(torch.isfinite(scores.loss).all())
    global_count, non_finite_ranks = ranks.all_reduce([len(labels), 0.0 if finite else 1.0])
    if non_finite_ranks:
        raise NonFiniteLossError(epoch, step, scores.loss if not finite else None)
    if not global_count:
        return scores.detach()
    objective, share, divisor = ((scores.loss.sum(), len(labels), global_count) if weights is None
                                 else (weighted_loss(scores.loss, weights), 1.0, ranks.world_size))
    if len(labels):
        loss = add_indexer_loss(objective, model, indexer_losses, scale=share) / divisor
        (scaler.scale(loss) if scaler is not None else loss).backward()
    ranks.sum_gradients(model)  # torchrun: every rank joins, one that selected nothing with zeros
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return scores.detach()


@torch.inference_mode()
def evaluation_sums(model: nn.Module, loader, precision: str = "fp32", flip_tta: bool = False) -> tuple[float, int, int]:
    """(summed cross-entropy, correct predictions, samples) over what the loader yields; sums
    rather than means so that ranks' shares of the validation set add up exactly. With
    `flip_tta` the logits are the mean of the image's and its mirror image's."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.long)
    count = 0
    for images, labels, _ in loader:
        with autocast_context(images.device, precision):
            logits = model(images).float()  # [B, C]
            if flip_tta:
                logits = (logits + model(images.flip(3)).float()) / 2
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double().cpu()
        correct += (logits.argmax(1) == labels).sum().cpu()
        count += len(labels)
    model.train(was_training)
    return loss_sum.item(), int(correct.item()), count


def inject_nan_at_step(model: nn.Module, at_step: int | None) -> None:
    """Test-only fault injection (`debug.inject_nan_at_step`): the `at_step`-th training forward
    (train mode with autograd on; scoring and evaluation forwards do not count) returns NaN logits."""
    if at_step is None:
        return
    forwards = 0

    def poison(module: nn.Module, inputs, output: torch.Tensor):
        nonlocal forwards
        if not (module.training and torch.is_grad_enabled()):
            return None
        forwards += 1
        return output * float("nan") if forwards == at_step else None

    model.register_forward_hook(poison)
