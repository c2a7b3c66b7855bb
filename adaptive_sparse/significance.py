"""Per-sample significance: the report's named signals, computed from what a step already has.

Signals (each scaled to roughly [0, 1] so the weights in conf/gate/sundew.yaml compare):
- loss (difficulty): cross-entropy / log(C)
- entropy (uncertainty): prediction entropy / log(C)
- learning_value: how far the sample's loss moved since its previous visit, / log(C)
- novelty: 1 / sqrt(1 + times the sample was trained)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SIGNALS = ("loss", "entropy", "learning_value", "novelty")


@dataclass
class BatchScores:
    """What a scoring forward pass tells about each sample of a batch."""
    loss: torch.Tensor     # [B] cross-entropy
    entropy: torch.Tensor  # [B] prediction entropy (nats)

    @classmethod
    def from_logits(cls, logits: torch.Tensor, labels: torch.Tensor) -> "BatchScores":
        logits = logits.float()
        log_probs = F.log_softmax(logits, dim=1)  # [B, C]
        loss = F.nll_loss(log_probs, labels, reduction="none")
        entropy = -(log_probs.exp() * log_probs).sum(dim=1)
        return cls(loss, entropy)


class SampleMemory:
    """State kept per dataset index: the last loss seen and how often a sample was trained."""

    def __init__(self, num_samples: int, device: torch.device | str = "cpu"):
        self.last_loss = torch.full((num_samples,), float("nan"), device=device)
        self.times_trained = torch.zeros(num_samples, dtype=torch.long, device=device)

    def to(self, device: torch.device | str) -> "SampleMemory":
        self.last_loss = self.last_loss.to(device)
        self.times_trained = self.times_trained.to(device)
        return self

    def record_losses(self, idx: torch.Tensor, loss: torch.Tensor) -> None:
        self.last_loss[idx] = loss.detach().float()

    def record_trained(self, idx: torch.Tensor) -> None:
        self.times_trained[idx] += 1

    def state_dict(self) -> dict:
        return {"last_loss": self.last_loss, "times_trained": self.times_trained}

    def load_state_dict(self, state: dict) -> None:
        self.last_loss.copy_(state["last_loss"])
        self.times_trained.copy_(state["times_trained"])


class SignificanceModel:
    """A weighted sum of signals; the weights come from the gate's config."""

    def __init__(self, weights: dict[str, float], num_classes: int):
        unknown = set(weights) - set(SIGNALS)
        if unknown:
            raise ValueError(f"gate.weights: unknown signal(s) {sorted(unknown)}; known: {list(SIGNALS)}")
        self.weights = {name: float(weights.get(name, 0.0)) for name in SIGNALS}
        self.log_classes = math.log(num_classes)

    def components(self, idx: torch.Tensor, scores: BatchScores, memory: SampleMemory) -> dict[str, torch.Tensor]:
        previous = memory.last_loss[idx]
        moved = (scores.loss - previous).abs()
        return {
            "loss": scores.loss / self.log_classes,
            "entropy": scores.entropy / self.log_classes,
            "learning_value": torch.nan_to_num(moved, nan=0.0) / self.log_classes,
            "novelty": (1.0 + memory.times_trained[idx].float()).rsqrt(),
        }

    def score(self, idx: torch.Tensor, scores: BatchScores, memory: SampleMemory) -> torch.Tensor:
        parts = self.components(idx, scores, memory)
        return sum(w * parts[name] for name, w in self.weights.items() if w)  # [B]
