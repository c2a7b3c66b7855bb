"""Gates decide, batch by batch, which samples get a forward and backward pass.

Every gate answers `select(idx, scores)` with the batch positions to train. A gate with
`needs_scores = True` gets `BatchScores` from one inference-mode forward over the whole
batch; the others get None and cost nothing before selection.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

import torch

from adaptive_sparse.controller import PIController
from adaptive_sparse.significance import BatchScores, SampleMemory, SignificanceModel


def local_rate(keep: torch.Tensor) -> float:
    """Achieved rate of one batch from its keep mask (the distributed module swaps in a global one)."""
    return keep.float().mean().item()


@dataclass
class Selection:
    index: torch.Tensor  # [k] positions within the batch, ascending


class Gate:
    """Base gate: trains every sample. Subclasses override `select`."""

    needs_scores = False

    def __init__(self, target_rate: float = 1.0, num_samples: int = 0, num_classes: int = 10,
                 seed: int = 0):
        if not 0.0 < target_rate <= 1.0:
            raise ValueError(f"gate.target_rate must be in (0, 1], got {target_rate}")
        self.target_rate = float(target_rate)
        self.num_samples = num_samples
        self.generator = torch.Generator().manual_seed(seed)  # CPU: same draws on any device
        # keep mask -> achieved rate fed to a controller; under torchrun it is all-reduced so
        # every rank's controller sees the global rate and holds the same threshold
        self.rate_reducer: Callable[[torch.Tensor], float] = local_rate

    @property
    def threshold(self) -> float | None:
        return None

    def select(self, idx: torch.Tensor, scores: BatchScores | None) -> Selection:
        return Selection(torch.arange(len(idx), device=idx.device))

    def observe(self, trained_idx: torch.Tensor, losses: torch.Tensor) -> None:
        """Called after the training forward with the trained samples' losses."""

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class NoGate(Gate):
    """Full training: every sample of every batch."""


class RandomGate(Gate):
    """The control: a uniform random subset of each batch, of size target_rate * B.

    The size is rounded stochastically (floor, plus one with the fractional part's
    probability), so the expected rate equals the target exactly at any batch size.
    """

    def select(self, idx: torch.Tensor, scores: BatchScores | None) -> Selection:
        want = self.target_rate * len(idx)
        k = int(want) + int(torch.rand((), generator=self.generator).item() < want - int(want))
        chosen = torch.randperm(len(idx), generator=self.generator)[:k].sort().values
        return Selection(chosen.to(idx.device))


class SundewGate(Gate):
    """Significance gating with a PI-controlled threshold.

    Scores are standardised with running (EMA) batch statistics, so the threshold lives in
    units of standard deviations and the controller's gains do not depend on the loss scale
    or on how it drifts during training. With temperature > 0 selection is soft: a sample
    is kept with probability sigmoid((z - threshold) / temperature).
    """

    needs_scores = True

    def __init__(self, target_rate: float = 0.06, num_samples: int = 0, num_classes: int = 10,
                 weights: dict[str, float] | None = None, controller: dict | None = None,
                 temperature: float = 0.0, min_selected: int = 1, norm_momentum: float = 0.05,
                 seed: int = 0):
        super().__init__(target_rate, num_samples, num_classes, seed)
        self.significance = SignificanceModel(weights or {"loss": 1.0}, num_classes)
        self.memory = SampleMemory(num_samples)
        feed_forward = statistics.NormalDist().inv_cdf(1.0 - target_rate) if target_rate < 1 else -6.0
        self.controller = PIController(target_rate, init_threshold=feed_forward, **(controller or {}))
        self.temperature, self.min_selected = float(temperature), int(min_selected)
        self.norm_momentum = float(norm_momentum)
        self.score_mean: float | None = None
        self.score_var = 1.0

    @property
    def threshold(self) -> float:
        return self.controller.threshold

    def standardise(self, score: torch.Tensor) -> torch.Tensor:
        mean, var = score.mean().item(), score.var().item() if len(score) > 1 else 0.0
        if self.score_mean is None:
            self.score_mean, self.score_var = mean, var
        else:
            self.score_mean += self.norm_momentum * (mean - self.score_mean)
            self.score_var += self.norm_momentum * (var - self.score_var)
        return (score - self.score_mean) / (self.score_var ** 0.5 + 1e-8)

    def select(self, idx: torch.Tensor, scores: BatchScores | None) -> Selection:
        memory = self.memory.to(idx.device)
        z = self.standardise(self.significance.score(idx, scores, memory))  # [B]
        memory.record_losses(idx, scores.loss)
        if self.temperature > 0:
            keep_prob = torch.sigmoid((z - self.threshold) / self.temperature)
            keep = torch.rand(len(z), generator=self.generator).to(z.device) < keep_prob
        else:
            keep = z > self.threshold
        if int(keep.sum()) < self.min_selected:  # the floor: the top scores train anyway
            keep[z.topk(min(self.min_selected, len(z))).indices] = True
        self.controller.update(self.rate_reducer(keep))
        return Selection(keep.nonzero().squeeze(1))

    def observe(self, trained_idx: torch.Tensor, losses: torch.Tensor) -> None:
        self.memory.record_trained(trained_idx)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "controller": self.controller.state_dict(),
                "memory": self.memory.state_dict(),
                "score_norm": (self.score_mean, self.score_var)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.controller.load_state_dict(state["controller"])
        self.memory.load_state_dict(state["memory"])
        self.score_mean, self.score_var = state["score_norm"]
