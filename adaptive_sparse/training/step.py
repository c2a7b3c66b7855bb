"""The two halves of an honest gated step.

1. `score_batch`: one forward over the whole batch under `torch.inference_mode()` (no
   autograd graph, no activations kept), only for gates that need scores.
2. `train_on_subset`: forward and backward on the selected rows only. Skipped samples
   never enter the graph, so they cost nothing in the backward pass; masking the loss of
   a full-batch backward would pay for them all. The same step serves torchrun's ranks.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from adaptive_sparse.attention import auxiliary_loss
from adaptive_sparse.gating.gates import gated_loss
from adaptive_sparse.gating.scorers import autocast_context
from adaptive_sparse.gating.significance import BatchScores
from adaptive_sparse.training.data.text import IGNORE_INDEX
from adaptive_sparse.training.distributed import Distributed


class NonFiniteLossError(FloatingPointError):
    """A NaN or infinite training loss; raised before the optimiser step, so the weights (and
    the last checkpoint on disk) are still the last good ones."""

    def __init__(self, epoch: int, step: int, losses: torch.Tensor | None = None):
        detail = (" (on another rank)" if losses is None
                  else f" ({int((~torch.isfinite(losses)).sum())} of {len(losses)} samples)")
        super().__init__(f"non-finite training loss at epoch {epoch}, step {step}{detail}; "
                         "stopped before the optimiser step, so none of it was applied")
        self.epoch, self.step = epoch, step


def forward_scores(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                   precision: str = "fp32", label_smoothing: float = 0.0) -> BatchScores:
    """The training forward: per-sample loss (with autograd) and entropy, empty for no rows."""
    if not len(targets):
        empty = torch.zeros(0, device=inputs.device)
        return BatchScores(empty, empty)
    with autocast_context(inputs.device, precision):
        logits = model(inputs)  # [k, C] or [k, T, V]
    return BatchScores.from_logits(logits, targets, label_smoothing)


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


def train_on_subset(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
                    targets: torch.Tensor, precision: str = "fp32", *, weights: torch.Tensor | None = None,
                    epoch: int = 0, step: int = 0, indexer_losses: list[torch.Tensor] | None = None,
                    ranks: Distributed | None = None, scaler: torch.amp.GradScaler | None = None,
                    label_smoothing: float = 0.0, grad_clip: float | None = None,
                    summed_over: int | None = None) -> BatchScores:
    """One optimiser step on exactly these samples, for one process and for torchrun's ranks
    alike (a single process is world size 1); returns their detached per-sample loss and
    entropy (what memory scoring remembers, at no extra cost), possibly empty on a rank that
    selected nothing.

    Unweighted, the objective is the mean loss over every rank's selected samples: each rank
    backpropagates its sum divided by the global count, and the gradients are summed over
    ranks. With a gate's `weights` ([k], `Selection.weight` or a packed step's `step_weight`),
    each rank's sum(weights * loss) is its own step's loss (`gated_loss`: InfoBatch's mean(w * loss)
    over the step's samples, sundew's unbiased estimate of its batch's mean), and the objective is
    their mean over ranks, as DDP averages InfoBatch's per-rank means. A non-finite loss on any rank raises
    NonFiniteLossError (naming epoch and step) on every rank before any update. `scaler`
    (fp16) scales the loss and skips steps whose gradients overflow. `grad_clip` rescales the
    summed gradient to at most that global norm before the update (nanoGPT's recipe: 1.0).
    `summed_over` N (unweighted only) divides the summed loss by N per rank instead of by the
    selected count: airbench's summed loss at a full batch's scale, in which a half batch takes
    half a step, where the mean gives each selected sample twice the weight it has in a full one.
    """
    ranks = ranks or Distributed()
    optimizer.zero_grad(set_to_none=True)
    scores = forward_scores(model, inputs, targets, precision, label_smoothing)
    finite = bool(torch.isfinite(scores.loss).all())
    global_count, non_finite_ranks = ranks.all_reduce([len(targets), 0.0 if finite else 1.0])
    if non_finite_ranks:
        raise NonFiniteLossError(epoch, step, scores.loss if not finite else None)
    if not global_count:
        return scores.detach()
    mean_over = global_count if summed_over is None else summed_over * ranks.world_size
    objective, share, divisor = ((scores.loss.sum(), len(targets), mean_over) if weights is None
                                 else (gated_loss(scores.loss, weights), 1.0, ranks.world_size))
    if len(targets):
        loss = add_indexer_loss(objective, model, indexer_losses, scale=share) / divisor
        (scaler.scale(loss) if scaler is not None else loss).backward()
    ranks.sum_gradients(model)  # torchrun: every rank joins, one that selected nothing with zeros
    if grad_clip:  # after the all-reduce: every rank clips the same global gradient alike
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return scores.detach()


Views = Callable[[nn.Module, torch.Tensor], list[torch.Tensor]]  # (model, inputs) -> logits at each level


def plain_view(model: nn.Module, inputs: torch.Tensor) -> list[torch.Tensor]:
    """The model's logits on the inputs alone: one level, no test-time augmentation."""
    return [model(inputs).float()]


def evaluation_sums(model: nn.Module, loader, precision: str = "fp32", views: Views = plain_view) -> tuple[float, int, int]:
    """(summed cross-entropy, correct predictions, predictions) over what the loader yields:
    one per image (logits [B, C]), or one per scored position of a window (logits [B, T, V];
    targets of IGNORE_INDEX are not scored). Sums rather than means so that ranks' shares of the
    validation set add up exactly. `views` gives the logits (a task's test-time augmentation)."""
    return evaluation_sums_by_level(model, loader, precision, views)[-1]


@torch.inference_mode()
def evaluation_sums_by_level(model: nn.Module, loader, precision: str = "fp32",
                             views: Views = plain_view) -> list[tuple[float, int, int]]:
    """`evaluation_sums` at every level `views` returns, from one set of forwards: a run with
    test-time augmentation is its own TTA ablation."""
    was_training = model.training
    model.eval()
    sums: list[list[float]] = []
    count = 0
    for inputs, targets, *_ in loader:
        with autocast_context(inputs.device, precision):
            by_level = views(model, inputs)  # each [B, C] or [B, T, V]
        targets = targets.reshape(-1)
        scored = targets != IGNORE_INDEX
        sums = sums or [[0.0, 0] for _ in by_level]
        for level, logits in enumerate(by_level):
            logits = logits.reshape(-1, logits.shape[-1])
            sums[level][0] += F.cross_entropy(logits, targets, reduction="sum").double().item()  # ignored: not summed
            sums[level][1] += int(((logits.argmax(1) == targets) & scored).sum())
        count += int(scored.sum())
    model.train(was_training)
    return [(loss, correct, count) for loss, correct in sums]
