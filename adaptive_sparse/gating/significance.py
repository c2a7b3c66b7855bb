"""Per-sample significance: the report's named signals, computed from what a step already has.

Signals (each scaled to roughly [0, 1] so the weights in conf/gate/sundew.yaml compare):
- loss (difficulty): cross-entropy / log(C)
- entropy (uncertainty): prediction entropy / log(C)
- learning_value: how far the sample's loss moved between its two latest visits, / log(C)

C is the number of classes, or for a language model the vocabulary: a sequence's loss and
entropy are the means over its tokens (`BatchScores.from_logits`), so log(V) scales them alike.
- novelty: 1 / sqrt(1 + times the sample was trained)

With forward scoring the loss and entropy are fresh from the scoring pass; with memory
scoring they are the values recorded at the sample's last training forward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

SIGNALS = ("loss", "entropy", "learning_value", "novelty")


@dataclass
class BatchScores:
    """What a forward pass tells about each sample of a batch."""
    loss: torch.Tensor     # [B] cross-entropy (a sequence: the mean over its tokens)
    entropy: torch.Tensor  # [B] prediction entropy in nats (a sequence: the mean over its tokens)

    @classmethod
    def from_logits(cls, logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> "BatchScores":
        """Per-sample cross-entropy (against targets smoothed by `label_smoothing`, as the
        training loss may be) and prediction entropy. Logits [B, C] with a class per sample
        [B], or [B, T, V] with a target per position [B, T]: then each sample's loss and
        entropy are the means over its T tokens."""
        b = len(targets)
        log_probs = F.log_softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)  # [B*T, C]
        loss = F.nll_loss(log_probs, targets.reshape(-1), reduction="none")
        if label_smoothing:  # (1 - s) * CE(label) + s * mean over classes of CE(class)
            loss = (1.0 - label_smoothing) * loss - label_smoothing * log_probs.mean(dim=-1)
        return cls(per_sample_mean(loss, b), per_sample_mean(-(log_probs.exp() * log_probs).sum(dim=-1), b))

    def detach(self) -> "BatchScores":
        return BatchScores(self.loss.detach(), self.entropy.detach())


def per_sample_mean(values: torch.Tensor, num_samples: int) -> torch.Tensor:
    """[B*T] per-position values -> [B] per-sample means (T = 1 for a class per sample)."""
    per_sample = values.numel() // num_samples if num_samples else 1
    return values.view(num_samples, per_sample).mean(1)


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """[B] each sample's prediction entropy in nats from logits [B, C] (or [B, T, V]: the mean over T)."""
    log_probs = F.log_softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)
    return per_sample_mean(-(log_probs.exp() * log_probs).sum(dim=-1), len(logits))


class SampleMemory:
    """State kept per dataset index: the two latest losses, the latest entropy, and how often
    a sample was trained. NaN loss means never seen."""

    def __init__(self, num_samples: int, device: torch.device | str = "cpu"):
        self.last_loss = torch.full((num_samples,), float("nan"), device=device)
        self.prev_loss = torch.full((num_samples,), float("nan"), device=device)
        self.last_entropy = torch.zeros(num_samples, device=device)
        self.times_trained = torch.zeros(num_samples, dtype=torch.long, device=device)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"last_loss": self.last_loss, "prev_loss": self.prev_loss,
                "last_entropy": self.last_entropy, "times_trained": self.times_trained}

    def to(self, device: torch.device | str) -> "SampleMemory":
        for name, tensor in self.tensors().items():
            setattr(self, name, tensor.to(device))
        return self

    def record(self, idx: torch.Tensor, scores: BatchScores) -> None:
        self.prev_loss[idx] = self.last_loss[idx]
        self.last_loss[idx] = scores.loss.float()
        self.last_entropy[idx] = scores.entropy.float()

    def record_trained(self, idx: torch.Tensor) -> None:
        self.times_trained[idx] += 1

    def seen(self, idx: torch.Tensor) -> torch.Tensor:
        return ~self.last_loss[idx].isnan()

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of every tensor, to merge the ranks' changes against at epoch end."""
        return {name: tensor.clone() for name, tensor in self.tensors().items()}

    def merge_ranks(self, start: dict[str, torch.Tensor], all_reduce: Callable[[torch.Tensor], Any]) -> None:
        """Under torchrun, make every rank's memory the same at epoch end. Each sample was served
        to at most one rank this epoch, so that rank's losses and entropy win, and the trained
        counts add up. `all_reduce` sums a tensor over ranks in place; every rank calls this."""
        changed = self.last_loss.ne(start["last_loss"]) & ~self.last_loss.isnan()
        changed_anywhere = changed.double()
        all_reduce(changed_anywhere)
        for name in ("last_loss", "prev_loss", "last_entropy"):
            tensor = getattr(self, name)
            part = torch.where(changed, tensor, torch.zeros_like(tensor)).double()
            all_reduce(part)  # zeros elsewhere: the sum is the visiting rank's value
            tensor.copy_(torch.where(changed_anywhere > 0, part.to(tensor.dtype), tensor))
        trained = self.times_trained - start["times_trained"]
        all_reduce(trained)
        self.times_trained.copy_(start["times_trained"] + trained)

    def state_dict(self) -> dict:
        return dict(self.tensors())

    def load_state_dict(self, state: dict) -> None:
        for name, tensor in self.tensors().items():
            tensor.copy_(state[name])


class SignificanceModel:
    """A weighted sum of signals; the weights come from the gate's config."""

    def __init__(self, weights: dict[str, float], num_outputs: int | None = None):
        unknown = set(weights) - set(SIGNALS)
        if unknown:
            raise ValueError(f"weights: unknown signal(s) {sorted(unknown)}; known: {list(SIGNALS)}")
        self.weights = {name: float(weights.get(name, 0.0)) for name in SIGNALS}
        if num_outputs is None and self.weights["novelty"] and any(self.weights[s] for s in SIGNALS if s != "novelty"):
            raise ValueError("weights mix novelty (in [0, 1]) with loss-based signals: pass num_outputs (the classes "
                             "or vocabulary a loss is over) so that those are scaled to [0, 1] too")
        # loss, entropy and learning value over log(C): about [0, 1], like novelty
        self.log_classes = math.log(num_outputs) if num_outputs else 1.0

    def components(self, loss: torch.Tensor, entropy: torch.Tensor, previous_loss: torch.Tensor,
                   times_trained: torch.Tensor) -> dict[str, torch.Tensor]:
        moved = torch.nan_to_num((loss - previous_loss).abs(), nan=0.0)  # no previous visit: 0
        return {
            "loss": loss / self.log_classes,
            "entropy": entropy / self.log_classes,
            "learning_value": moved / self.log_classes,
            "novelty": (1.0 + times_trained.float()).rsqrt(),
        }

    def combine(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(w * parts[name] for name, w in self.weights.items() if w)  # [B]

    def fresh(self, idx: torch.Tensor, scores: BatchScores, memory: SampleMemory) -> torch.Tensor:
        """Significance from a scoring pass; the memory supplies the previous loss."""
        return self.combine(self.components(scores.loss, scores.entropy, memory.last_loss[idx],
                                            memory.times_trained[idx]))

    def remembered(self, idx: torch.Tensor, memory: SampleMemory) -> torch.Tensor:
        """Significance from memory alone (NaN for samples never seen)."""
        return self.combine(self.components(memory.last_loss[idx], memory.last_entropy[idx],
                                            memory.prev_loss[idx], memory.times_trained[idx]))


class ScoreHistory:
    """The latest `size` scores, to rank new ones by percentile (Selective-Backprop's loss
    history): a score's percentile is the share of the history below it, ties counting half."""

    def __init__(self, size: int, device: torch.device | str = "cpu"):
        if size < 1:
            raise ValueError(f"history_size={size} is not allowed: an integer >= 1")
        self.size = int(size)
        self.values = torch.empty(0, device=device)

    def add(self, scores: torch.Tensor) -> None:
        self.values = torch.cat([self.values.to(scores.device), scores.detach().float()])[-self.size:]

    def percentile(self, scores: torch.Tensor) -> torch.Tensor:
        """[B] in [0, 1]; 0.5 for all while the history is empty."""
        if not len(self.values):
            return torch.full_like(scores, 0.5, dtype=torch.float)
        values = self.values.to(scores.device)
        # on the CPU numpy sorts a few thousand floats ~6x faster than torch (0.01 against 0.06
        # ms on the AMD EPYC), and gated steps at a 10% rate are short enough for it to show
        ranked = (torch.from_numpy(np.sort(values.numpy())) if values.device.type == "cpu"
                  else values.sort().values)
        below = torch.searchsorted(ranked, scores.float(), right=False)
        at_or_below = torch.searchsorted(ranked, scores.float(), right=True)
        return (below + at_or_below).float() / (2 * len(ranked))

    def state_dict(self) -> dict:
        return {"values": self.values.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.values = state["values"].to(self.values.device)


# --------------------------------------------------------------------------- scoring sources
#
# Where a gate's significance comes from. Each source keeps the per-sample memory, says when it
# needs a scoring forward over the batch, turns a batch into significance [B] (NaN: never
# seen), and learns from what was trained.

class FreshScoring:
    """`scoring=forward` (the trained model) or `scoring=proxy` (a small model, `scorer`): a
    scoring forward over every batch gives fresh losses; the memory supplies the previous
    visit's loss for the learning-value signal."""

    def __init__(self, model: SignificanceModel, memory: SampleMemory, scorer: Any = None):
        self.model, self.memory, self.scorer = model, memory, scorer

    def start_epoch(self, epoch: int) -> None:
        """Fresh scoring does the same every epoch."""

    @property
    def needs_scores(self) -> bool:
        return True

    def significance(self, idx: torch.Tensor, scores: BatchScores) -> torch.Tensor:
        significance = self.model.fresh(idx, scores, self.memory)  # [B]
        self.memory.record(idx, scores)
        return significance

    def observe(self, trained_idx: torch.Tensor, trained: BatchScores) -> None:
        self.memory.record_trained(trained_idx)


class MemoryScoring:
    """`scoring=memory`: no scoring forward; each sample's significance comes from its last
    training forward (free), never-seen samples count as most significant (NaN). Every
    `refresh_every_epochs`-th epoch (0: never) a scoring forward renews every sample's memory."""

    def __init__(self, model: SignificanceModel, memory: SampleMemory, refresh_every_epochs: int = 0):
        self.model, self.memory, self.refresh_every = model, memory, int(refresh_every_epochs)
        self.refreshing = False
        self.scorer = None

    def start_epoch(self, epoch: int) -> None:
        n = self.refresh_every
        self.refreshing = n > 0 and epoch > 1 and (epoch - 1) % n == 0

    @property
    def needs_scores(self) -> bool:
        return self.refreshing

    def significance(self, idx: torch.Tensor, scores: BatchScores | None) -> torch.Tensor:
        if scores is not None:  # a refresh epoch
            self.memory.record(idx, scores)
        return self.model.remembered(idx, self.memory)  # [B], NaN: never seen

    def observe(self, trained_idx: torch.Tensor, trained: BatchScores) -> None:
        self.memory.record_trained(trained_idx)
        if not self.refreshing:
            self.memory.record(trained_idx, trained)  # the training forward's losses, for free
