"""Selection rules: how sundew turns a batch's significance [B] into a keep mask.

Each rule owns the controller that holds its rate on target and answers
`keep(score, generator) -> (keep mask [B], keep probabilities [B] or None)`; the gate feeds
the achieved rate back with `controller.update`. Significance may hold NaN for samples never
seen (memory scoring): every rule treats them as the most significant.

A PI controller that moves a gate's threshold so its activation rate tracks a target.
"""
from __future__ import annotations

import statistics

import torch

from adaptive_sparse.gating.significance import ScoreHistory


class PercentileRule:
    """Keep with probability proportional to (1 - exploration) (power + 1) pct^power +
    exploration, pct the significance's percentile among the last `history_size` scores,
    capped at 1 and scaled so each batch's expected rate is the budget exactly. The budget
    starts at the target; a slow integral controller moves it only to offset the
    min_selected floor and the capping."""

    def __init__(self, rate: float, power: float = 1.0, exploration: float = 0.1, history_size: int = 4096,
                 min_selected: int = 1, ema: float = 0.1, device: torch.device | str = "cpu"):
        if power < 0:
            raise ValueError(f"SundewGate: power={power} is not allowed: a number >= 0")
        self.power, self.exploration, self.min_selected = float(power), float(exploration), int(min_selected)
        self.history = ScoreHistory(history_size, device)
        # output: the batch budget. Too many trained lowers it, hence the negative gain
        self.controller = PIController(rate, kp=0.0, ki=-0.01, ema=ema, init_threshold=rate,
                                       min_threshold=0.0, max_threshold=1.0)

    def keep(self, score: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        seen = ~score.isnan()
        self.history.add(score[seen])
        pct = torch.where(seen, self.history.percentile(torch.nan_to_num(score)), 1.0)  # [B]
        shape = (self.power + 1.0) * pct ** self.power  # mean 1 over uniform percentiles
        prob = probabilities_with_mean((1.0 - self.exploration) * shape + self.exploration,
                                       self.controller.threshold)
        keep = torch.rand(len(score), generator=generator).to(score.device) < prob
        if int(keep.sum()) < self.min_selected:  # the floor: the likeliest samples train anyway
            keep[prob.topk(min(self.min_selected, len(prob))).indices] = True
        return keep, prob

    def state_dict(self) -> dict:
        return {"controller": self.controller.state_dict(), "history": self.history.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state["controller"])
        self.history.load_state_dict(state["history"])


class ThresholdRule:
    """Fresh scores only: a sample's significance is standardised with running batch
    statistics and kept with probability sigmoid((z - threshold) / temperature) (temperature
    0: z > threshold). A PI controller on the EMA of the achieved rate moves the threshold,
    starting from the one that keeps the target share of normal scores."""

    def __init__(self, rate: float, temperature: float = 1.0, min_selected: int = 1, norm_momentum: float = 0.05,
                 gains: dict | None = None):
        self.temperature, self.min_selected = float(temperature), int(min_selected)
        self.norm_momentum = float(norm_momentum)
        gains = {"kp": 2.0, "ki": 0.5, **(gains or {})}
        self.controller = PIController(rate, init_threshold=normal_threshold(rate, self.temperature), **gains)
        self.score_mean: float | None = None
        self.score_var = 1.0

    def keep(self, score: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, None]:
        z = self.standardise(score)  # [B]
        if self.temperature > 0:
            keep_prob = torch.sigmoid((z - self.controller.threshold) / self.temperature)
            keep = torch.rand(len(z), generator=generator).to(z.device) < keep_prob
        else:
            keep = z > self.controller.threshold
        if int(keep.sum()) < self.min_selected:  # the floor: the top scores train anyway
            keep[z.topk(min(self.min_selected, len(z))).indices] = True
        return keep, None

    def standardise(self, score: torch.Tensor) -> torch.Tensor:
        mean, var = score.mean().item(), score.var().item() if len(score) > 1 else 0.0
        if self.score_mean is None:
            self.score_mean, self.score_var = mean, var
        else:
            self.score_mean += self.norm_momentum * (mean - self.score_mean)
            self.score_var += self.norm_momentum * (var - self.score_var)
        return (score - self.score_mean) / (self.score_var ** 0.5 + 1e-8)

    def state_dict(self) -> dict:
        return {"controller": self.controller.state_dict(), "score_norm": (self.score_mean, self.score_var)}

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state["controller"])
        self.score_mean, self.score_var = state["score_norm"]


class PriorityRule:
    """`selection=top` (and remembered scores with `selection=threshold`): the controller's
    batch budget is filled by priority: an exploration share uniformly at random, then
    never-seen samples, then the most significant (random order breaks ties). Deterministic
    top-k of each batch when exploration is 0 and every score is fresh."""

    def __init__(self, rate: float, exploration: float = 0.1, min_selected: int = 1, ema: float = 0.1):
        self.exploration, self.min_selected = float(exploration), int(min_selected)
        self.controller = PIController(rate, kp=0.0, ki=-0.01, ema=ema, init_threshold=rate,
                                       min_threshold=0.0, max_threshold=1.0)

    def keep(self, score: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, None]:
        b = len(score)
        budget = stochastic_round(self.controller.threshold * b, generator)
        budget = min(max(budget, self.min_selected), b)
        n_explore = stochastic_round(self.exploration * budget, generator)
        order = torch.randperm(b, generator=generator).to(score.device)
        keep = torch.zeros(b, dtype=torch.bool, device=score.device)
        keep[order[:n_explore]] = True
        priority = torch.nan_to_num(score, nan=float("inf")).masked_fill(keep, float("-inf"))
        ranked = order[priority[order].argsort(descending=True, stable=True)]
        keep[ranked[:budget - n_explore]] = True
        return keep, None

    def state_dict(self) -> dict:
        return {"controller": self.controller.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state["controller"])


def probabilities_with_mean(weights: torch.Tensor, mean: float) -> torch.Tensor:
    """p = min(1, c * weights) [B], with c chosen so that p.mean() == mean (water-filling):
    each batch's expected selection is exactly mean * B, whatever its scores."""
    target = mean * len(weights)
    capped = torch.zeros_like(weights, dtype=torch.bool)
    prob = weights
    for _ in range(len(weights)):  # each pass caps at least one more sample at 1
        free_mass = weights[~capped].sum()
        if free_mass <= 0:
            break
        prob = torch.where(capped, 1.0, (target - capped.sum()) / free_mass * weights)
        over = ~capped & (prob > 1.0)
        if not over.any():
            break
        capped |= over
    return prob.clamp(max=1.0)


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


class PIController:
    """Threshold = feed-forward + kp * error + ki * integral(error).

    The error is the EMA-smoothed achieved rate minus the target: too many samples
    selected raises the threshold. Anti-windup by conditional integration: while the
    threshold sits at a bound, the integral stops growing in the direction that pushes
    it further out, so it recovers at once when the score distribution comes back.
    """

    def __init__(self, target: float, kp: float = 1.0, ki: float = 0.1, ema: float = 0.2,
                 init_threshold: float = 0.0, min_threshold: float = -6.0, max_threshold: float = 6.0):
        if not 0.0 < target <= 1.0:
            raise ValueError(f"PIController: target={target} is not allowed: a rate in (0, 1]")
        self.target, self.kp, self.ki, self.ema = target, kp, ki, ema
        self.init_threshold = init_threshold
        self.min_threshold, self.max_threshold = min_threshold, max_threshold
        self.rate_ema = target
        self.integral = 0.0
        self.threshold = self.clamp(init_threshold)

    def clamp(self, threshold: float) -> float:
        return min(max(threshold, self.min_threshold), self.max_threshold)

    def update(self, achieved_rate: float) -> float:
        """Feed one batch's achieved rate; returns the threshold for the next batch."""
        self.rate_ema += self.ema * (achieved_rate - self.rate_ema)
        error = self.rate_ema - self.target
        integral = self.integral + error
        raw = self.init_threshold + self.kp * error + self.ki * integral
        clamped = self.clamp(raw)
        if raw == clamped:
            self.integral = integral  # integrate only while unsaturated
        self.threshold = clamped
        return self.threshold

    def state_dict(self) -> dict:
        return {"rate_ema": self.rate_ema, "integral": self.integral, "threshold": self.threshold}

    def load_state_dict(self, state: dict) -> None:
        self.rate_ema, self.integral = float(state["rate_ema"]), float(state["integral"])
        self.threshold = float(state["threshold"])

