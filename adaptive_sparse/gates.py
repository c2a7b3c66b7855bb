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

    def start_epoch(self, epoch: int) -> None:
        """Called before each epoch (1-based)."""

    def epoch_metrics(self) -> dict[str, float]:
        """Gate-specific figures for the epoch record."""
        return {}

    def observe(self, trained_idx: torch.Tensor, trained: BatchScores) -> None:
        """Called after the training forward with the trained samples' losses and entropies."""

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
        k = stochastic_round(self.target_rate * len(idx), self.generator)
        chosen = torch.randperm(len(idx), generator=self.generator)[:k].sort().values
        return Selection(chosen.to(idx.device))


class SundewGate(Gate):
    """Significance gating, with the activation rate held on target by a PI controller.

    scoring=forward: every sample is scored by one inference-mode forward. Scores are
    standardised with running (EMA) batch statistics, so the threshold lives in units of
    standard deviations and the controller's gains do not depend on the loss scale or its
    drift. A sample is kept when its z-score exceeds the threshold (with temperature > 0:
    with probability sigmoid((z - threshold) / temperature)).

    scoring=memory: no scoring forward. Significance comes from what each sample's last
    training forward left in the memory. Stale losses of different ages are no common
    scale for a threshold, so here the controller sets each batch's budget (the fraction to
    train) and the budget is filled by priority: first an exploration share drawn uniformly
    from the batch (so a sample is trained with probability >= exploration * target_rate
    per epoch, whatever its remembered score), then samples never seen (maximally
    significant), then the highest remembered significance. With refresh_every_epochs=N,
    every N-th epoch scores all samples with a forward pass to renew the memory.
    """

    def __init__(self, target_rate: float = 0.06, num_samples: int = 0, num_classes: int = 10,
                 weights: dict[str, float] | None = None, controller: dict | None = None,
                 scoring: str = "forward", exploration: float = 0.1, refresh_every_epochs: int = 0,
                 temperature: float = 1.0, min_selected: int = 1, norm_momentum: float = 0.05,
                 seed: int = 0):
        super().__init__(target_rate, num_samples, num_classes, seed)
        if scoring not in ("forward", "memory"):
            raise ValueError(f"gate.scoring={scoring!r} is not allowed: forward or memory")
        if not 0.0 <= exploration <= 1.0:
            raise ValueError(f"gate.exploration={exploration} is not allowed: a fraction in [0, 1]")
        self.scoring, self.exploration = scoring, float(exploration)
        self.refresh_every_epochs = int(refresh_every_epochs)
        self.significance = SignificanceModel(weights or {"loss": 1.0}, num_classes)
        self.memory = SampleMemory(num_samples)
        self.temperature, self.min_selected = float(temperature), int(min_selected)
        self.controller = self._make_controller(dict(controller or {}))
        self.norm_momentum = float(norm_momentum)
        self.score_mean: float | None = None
        self.score_var = 1.0
        self.refreshing = False

    def _make_controller(self, gains: dict) -> PIController:
        if self.scoring == "forward":  # output: a z-score threshold, fed forward from a normal guess
            start = normal_threshold(self.target_rate, self.temperature)
            return PIController(self.target_rate, init_threshold=start, **gains)
        # output: the batch budget. Too many trained lowers it, hence the negative gains; its
        # only job is to offset the min_selected floor, so it is integral-only and slow.
        return PIController(self.target_rate, kp=0.0, ki=-0.01, ema=gains.get("ema", 0.1),
                            init_threshold=self.target_rate, min_threshold=0.0, max_threshold=1.0)

    @property
    def needs_scores(self) -> bool:
        return self.scoring == "forward" or self.refreshing

    @property
    def threshold(self) -> float | None:
        return self.controller.threshold if self.scoring == "forward" else None

    def epoch_metrics(self) -> dict[str, float]:
        return {"budget": self.controller.threshold} if self.scoring == "memory" else {}

    def start_epoch(self, epoch: int) -> None:
        n = self.refresh_every_epochs
        self.refreshing = self.scoring == "memory" and n > 0 and epoch > 1 and (epoch - 1) % n == 0

    def select(self, idx: torch.Tensor, scores: BatchScores | None) -> Selection:
        memory = self.memory.to(idx.device)
        if self.scoring == "forward":
            keep = self._keep_above_threshold(self.significance.fresh(idx, scores, memory))
            memory.record(idx, scores)
        else:
            if scores is not None:  # a refresh epoch
                memory.record(idx, scores)
            keep = self._keep_by_priority(self.significance.remembered(idx, memory))
        self.controller.update(self.rate_reducer(keep))
        return Selection(keep.nonzero().squeeze(1))

    def _keep_above_threshold(self, score: torch.Tensor) -> torch.Tensor:
        z = self.standardise(score)  # [B]
        if self.temperature > 0:
            keep_prob = torch.sigmoid((z - self.threshold) / self.temperature)
            keep = torch.rand(len(z), generator=self.generator).to(z.device) < keep_prob
        else:
            keep = z > self.threshold
        if int(keep.sum()) < self.min_selected:  # the floor: the top scores train anyway
            keep[z.topk(min(self.min_selected, len(z))).indices] = True
        return keep

    def _keep_by_priority(self, score: torch.Tensor) -> torch.Tensor:
        b = len(score)
        budget = stochastic_round(self.controller.threshold * b, self.generator)
        budget = min(max(budget, self.min_selected), b)
        n_explore = stochastic_round(self.exploration * budget, self.generator)
        order = torch.randperm(b, generator=self.generator).to(score.device)
        keep = torch.zeros(b, dtype=torch.bool, device=score.device)
        keep[order[:n_explore]] = True
        # unseen (NaN) first, then by remembered significance; random order breaks ties
        priority = torch.nan_to_num(score, nan=float("inf")).masked_fill(keep, float("-inf"))
        ranked = order[priority[order].argsort(descending=True, stable=True)]
        keep[ranked[:budget - n_explore]] = True
        return keep

    def standardise(self, score: torch.Tensor) -> torch.Tensor:
        mean, var = score.mean().item(), score.var().item() if len(score) > 1 else 0.0
        if self.score_mean is None:
            self.score_mean, self.score_var = mean, var
        else:
            self.score_mean += self.norm_momentum * (mean - self.score_mean)
            self.score_var += self.norm_momentum * (var - self.score_var)
        return (score - self.score_mean) / (self.score_var ** 0.5 + 1e-8)

    def observe(self, trained_idx: torch.Tensor, trained: BatchScores) -> None:
        self.memory.record_trained(trained_idx)
        if self.scoring == "memory" and not self.refreshing:
            self.memory.record(trained_idx, trained)  # the training forward's losses, for free

    def state_dict(self) -> dict:
        return {**super().state_dict(), "controller": self.controller.state_dict(),
                "memory": self.memory.state_dict(),
                "score_norm": (self.score_mean, self.score_var)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.controller.load_state_dict(state["controller"])
        self.memory.load_state_dict(state["memory"])
        self.score_mean, self.score_var = state["score_norm"]


def normal_threshold(rate: float, temperature: float) -> float:
    """The threshold that keeps `rate` of standard-normal scores: hard, z > threshold; soft,
    kept with probability sigmoid((z - threshold) / temperature). Solved by bisection over a
    quadrature of the normal density; only the controller's starting point depends on it."""
    if rate >= 1.0:
        return -6.0
    if temperature <= 0:
        return statistics.NormalDist().inv_cdf(1.0 - rate)
    z = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    density = torch.exp(-0.5 * z * z)
    density /= density.sum()
    low, high = -20.0, 20.0
    for _ in range(60):
        mid = (low + high) / 2
        kept = float((torch.sigmoid((z - mid) / temperature) * density).sum())
        low, high = (mid, high) if kept > rate else (low, mid)
    return (low + high) / 2


def stochastic_round(x: float, generator: torch.Generator) -> int:
    """floor(x), plus one with probability frac(x): unbiased, so E[result] == x."""
    whole = int(x)
    return whole + int(torch.rand((), generator=generator).item() < x - whole)
