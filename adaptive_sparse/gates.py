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
from adaptive_sparse.scorers import ProxyScorer
from adaptive_sparse.significance import BatchScores, SampleMemory, ScoreHistory, SignificanceModel


def local_rate(keep: torch.Tensor) -> float:
    """Achieved rate of one batch from its keep mask (the distributed module swaps in a global one)."""
    return keep.float().mean().item()


@dataclass
class Selection:
    """The batch positions to train, and optionally how much each one's loss counts.

    weight None: the training loss is the plain mean over the selected rows. Otherwise the
    loss is sum(weight * per-sample loss); gates that correct for unequal selection
    probabilities p give weight 1 / (B * p), so that, in expectation over their draws, the
    loss (and its gradient) equals the full batch's mean (inverse-probability weighting).
    """
    index: torch.Tensor                 # [k] positions within the batch, ascending
    weight: torch.Tensor | None = None  # [k] per-sample loss weights, or None


class Gate:
    """Base gate: trains every sample. Subclasses override `select`.

    `pack` (config `gate.pack`) is read by the training loop: selected samples accumulate into
    full training batches (adaptive_sparse/packing.py). `device` is where per-sample state
    lives, from construction on. `scorer` is None when scores come from the trained model.
    """

    needs_scores = False
    scorer: ProxyScorer | None = None

    def __init__(self, target_rate: float = 1.0, num_samples: int = 0, num_classes: int = 10,
                 seed: int = 0, total_epochs: int = 1, pack: bool = False,
                 device: torch.device | str = "cpu"):
        if not 0.0 < target_rate <= 1.0:
            raise ValueError(f"gate.target_rate must be in (0, 1], got {target_rate}")
        self.target_rate = float(target_rate)
        self.num_samples = num_samples
        self.total_epochs = int(total_epochs)
        self.pack, self.device = bool(pack), torch.device(device)
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
    """Full training: every sample of every batch. Its rate is 1 whatever `target_rate` says,
    so one sweep can set gate.target_rate for every gate (`gate=none,random,sundew
    gate.target_rate=0.25`) and keep the full-training baseline."""

    def __init__(self, target_rate: float = 1.0, num_samples: int = 0, num_classes: int = 10,
                 seed: int = 0, total_epochs: int = 1, pack: bool = False, device: torch.device | str = "cpu"):
        super().__init__(1.0, num_samples, num_classes, seed, total_epochs, pack, device)


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
    """Significance gating, with the activation rate held on target by a controller.

    Where significance comes from (`scoring`):
    - forward: one inference-mode forward scores every sample of the batch;
    - memory: no scoring forward; each sample's last training forward left its loss and
      entropy in the memory (never-seen samples count as most significant). With
      refresh_every_epochs=N, every N-th epoch scores all samples to renew the memory.

    How significance becomes a selection (`selection`):
    - percentile (default): a sample's significance is ranked against the last
      `history_size` scores, and it is kept with probability
      p proportional to (1 - exploration) * (power + 1) * percentile**power + exploration,
      at most 1, scaled so that the batch's expected rate is the budget exactly; a slow
      integral controller nudges the budget only to offset the min_selected floor. `exploration` is the share of the budget spread uniformly: every
      sample keeps p >= exploration * budget. With unbiased=True each kept sample's loss is
      weighted 1 / (B * p) (inverse-probability weighting), so the expected gradient is the
      full batch's: high-loss samples are trained more often, not counted more.
    - threshold: forward scoring keeps a sample with probability
      sigmoid((z - threshold) / temperature) of its running z-score, with a PI controller on
      the threshold (temperature 0: hard threshold); memory scoring fills the controller's
      batch budget by priority (an exploration share uniformly, then unseen samples, then
      the most significant). Neither corrects the gradient for the selection.

    With anneal_epochs=A > 0 the last A epochs train every sample (InfoBatch's annealing).
    target_rate stays the rate over the whole run: the other epochs aim at
    (target_rate * E - A) / (E - A), so sundew spends the same number of samples as a
    random gate at the same target.
    """

    def __init__(self, target_rate: float = 0.06, num_samples: int = 0, num_classes: int = 10,
                 weights: dict[str, float] | None = None, controller: dict | None = None,
                 scoring: str = "forward", selection: str = "percentile", power: float = 1.0,
                 unbiased: bool = False, history_size: int = 4096, exploration: float = 0.1,
                 refresh_every_epochs: int = 0, anneal_epochs: int = 0, temperature: float = 1.0,
                 min_selected: int = 1, norm_momentum: float = 0.05, seed: int = 0,
                 total_epochs: int = 1, proxy: Callable[..., torch.nn.Module] | None = None,
                 proxy_lr: float = 1e-3, pack: bool = False, device: torch.device | str = "cpu"):
        super().__init__(target_rate, num_samples, num_classes, seed, total_epochs, pack, device)
        for key, value, allowed in (("scoring", scoring, ("forward", "memory", "proxy")),
                                    ("selection", selection, ("percentile", "threshold"))):
            if value not in allowed:
                raise ValueError(f"gate.{key}={value!r} is not allowed: one of {allowed}")
        if not 0.0 <= exploration <= 1.0:
            raise ValueError(f"gate.exploration={exploration} is not allowed: a fraction in [0, 1]")
        if power < 0:
            raise ValueError(f"gate.power={power} is not allowed: a number >= 0")
        self.scoring, self.selection, self.exploration = scoring, selection, float(exploration)
        self.power, self.unbiased = float(power), bool(unbiased)
        self.refresh_every_epochs, self.anneal_epochs = int(refresh_every_epochs), int(anneal_epochs)
        self.pruning_rate = pruning_epoch_rate(self.target_rate, self.total_epochs, self.anneal_epochs)
        self.significance = SignificanceModel(weights or {"loss": 1.0}, num_classes)
        self.memory = SampleMemory(num_samples, self.device)
        self.history = ScoreHistory(history_size)
        if scoring == "proxy":
            if proxy is None:
                raise ValueError("gate.scoring=proxy needs gate.proxy: a model config with _partial_: true")
            self.scorer = ProxyScorer(proxy(num_classes=num_classes), num_classes, lr=proxy_lr, device=self.device)
        self.temperature, self.min_selected = float(temperature), int(min_selected)
        self.controller = self._make_controller(dict(controller or {}))
        self.norm_momentum = float(norm_momentum)
        self.score_mean: float | None = None
        self.score_var = 1.0
        self.refreshing = self.annealing = False

    @property
    def uses_threshold(self) -> bool:
        """True for the z-score threshold rule; every other rule's controller sets a batch budget."""
        return self.selection == "threshold" and self.scoring != "memory"

    def _make_controller(self, gains: dict) -> PIController:
        rate = self.pruning_rate
        if self.uses_threshold:  # output: a z-score threshold, fed forward from a normal guess
            return PIController(rate, init_threshold=normal_threshold(rate, self.temperature), **gains)
        # output: the batch budget. Too many trained lowers it, hence the negative gain; its
        # only job is to offset clipping and the min_selected floor, so it is integral-only and slow.
        return PIController(rate, kp=0.0, ki=-0.01, ema=gains.get("ema", 0.1),
                            init_threshold=rate, min_threshold=0.0, max_threshold=1.0)

    @property
    def needs_scores(self) -> bool:
        return (self.scoring != "memory" or self.refreshing) and not self.annealing

    @property
    def threshold(self) -> float | None:
        return self.controller.threshold if self.uses_threshold else None

    def epoch_metrics(self) -> dict[str, float]:
        return {} if self.uses_threshold else {"budget": self.controller.threshold}

    def start_epoch(self, epoch: int) -> None:
        n = self.refresh_every_epochs
        self.refreshing = self.scoring == "memory" and n > 0 and epoch > 1 and (epoch - 1) % n == 0
        self.annealing = self.anneal_epochs > 0 and epoch > self.total_epochs - self.anneal_epochs

    def select(self, idx: torch.Tensor, scores: BatchScores | None) -> Selection:
        if self.annealing:  # the last epochs train on everything
            return Selection(torch.arange(len(idx), device=idx.device))
        memory = self.memory
        if self.scoring != "memory":  # forward or proxy: fresh scores of the whole batch
            significance = self.significance.fresh(idx, scores, memory)  # [B]
            memory.record(idx, scores)
        else:
            if scores is not None:  # a refresh epoch
                memory.record(idx, scores)
            significance = self.significance.remembered(idx, memory)  # [B], NaN: never seen
        prob = None
        if self.selection == "percentile":
            keep, prob = self._keep_by_percentile(significance)
        elif self.uses_threshold:
            keep = self._keep_above_threshold(significance)
        else:
            keep = self._keep_by_priority(significance)
        self.controller.update(self.rate_reducer(keep))
        index = keep.nonzero().squeeze(1)
        weight = 1.0 / (len(idx) * prob[index]) if prob is not None and self.unbiased else None
        return Selection(index, weight)

    def _keep_by_percentile(self, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep mask and keep probabilities [B] from significance ranked against recent history."""
        seen = ~score.isnan()
        self.history.add(score[seen])
        pct = torch.where(seen, self.history.percentile(torch.nan_to_num(score)), 1.0)  # [B]
        shape = (self.power + 1.0) * pct ** self.power  # mean 1 over uniform percentiles
        prob = probabilities_with_mean((1.0 - self.exploration) * shape + self.exploration,
                                       self.controller.threshold)
        keep = torch.rand(len(score), generator=self.generator).to(score.device) < prob
        if int(keep.sum()) < self.min_selected:  # the floor: the likeliest samples train anyway
            keep[prob.topk(min(self.min_selected, len(prob))).indices] = True
        return keep, prob

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
                "memory": self.memory.state_dict(), "history": self.history.state_dict(),
                "score_norm": (self.score_mean, self.score_var),
                "proxy": self.scorer.state_dict() if self.scorer else None}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.controller.load_state_dict(state["controller"])
        self.memory.load_state_dict(state["memory"])
        self.history.load_state_dict(state["history"])
        self.score_mean, self.score_var = state["score_norm"]
        if self.scorer:
            self.scorer.load_state_dict(state["proxy"])


class InfoBatchGate(Gate):
    """InfoBatch (Qin et al., ICLR 2024), per batch: prune well-learned samples at random and
    rescale the rest so the expected gradient is unchanged.

    Each sample's score is the loss of its last training forward (free: no scoring pass).
    At the start of each epoch the mean score over the samples seen so far is fixed; a
    sample below it is skipped with probability prune_ratio, and when kept its loss counts
    1 / (1 - prune_ratio) times. Samples at or above the mean, and never-seen ones, always
    train. The last epochs, those after the first anneal_after share of training
    (the paper's delta, 0.875), train on everything. The paper prunes the epoch's sample
    list and refills whole batches; here batches shrink instead, which costs the same
    forward and backward work. It has no target rate: its rate follows from prune_ratio and
    the loss distribution (summary.json's activation_rate says what it was).
    """

    def __init__(self, prune_ratio: float = 0.5, anneal_after: float = 0.875, num_samples: int = 0,
                 num_classes: int = 10, seed: int = 0, total_epochs: int = 1,
                 target_rate: float | None = None, pack: bool = False, device: torch.device | str = "cpu"):
        super().__init__(1.0, num_samples, num_classes, seed, total_epochs, pack, device)
        if target_rate is not None:
            raise ValueError("gate=infobatch has no target_rate: set gate.prune_ratio "
                             "(its rate is about 1 - prune_ratio * the share of samples below the mean loss)")
        if not 0.0 <= prune_ratio < 1.0:
            raise ValueError(f"gate.prune_ratio={prune_ratio} is not allowed: a fraction in [0, 1)")
        if not 0.0 <= anneal_after <= 1.0:
            raise ValueError(f"gate.anneal_after={anneal_after} is not allowed: a fraction in [0, 1]")
        self.target_rate = None  # type: ignore[assignment]  # reported as such in summary.json
        self.prune_ratio, self.anneal_after = float(prune_ratio), float(anneal_after)
        self.memory = SampleMemory(num_samples, self.device)
        self.mean_loss = float("nan")
        self.annealing = False

    def start_epoch(self, epoch: int) -> None:
        self.annealing = epoch > int(self.anneal_after * self.total_epochs)
        seen = self.memory.last_loss[~self.memory.last_loss.isnan()]
        self.mean_loss = seen.mean().item() if len(seen) else float("nan")

    def epoch_metrics(self) -> dict[str, float]:
        return {"prune_below_loss": self.mean_loss}

    def select(self, idx: torch.Tensor, scores: BatchScores | None) -> Selection:
        b = len(idx)
        everything = torch.arange(b, device=idx.device)
        if self.annealing:
            return Selection(everything)
        loss = self.memory.last_loss[idx]  # [B], NaN: never seen (never pruned)
        well_learned = loss < self.mean_loss  # False for NaN
        pruned = well_learned & (torch.rand(b, generator=self.generator).to(idx.device) < self.prune_ratio)
        index = (~pruned).nonzero().squeeze(1)
        scale = torch.where(well_learned[index], 1.0 / (1.0 - self.prune_ratio), 1.0)
        return Selection(index, scale / b)  # the batch mean, with pruned samples made up for

    def observe(self, trained_idx: torch.Tensor, trained: BatchScores) -> None:
        self.memory.record(trained_idx, trained)
        self.memory.record_trained(trained_idx)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "memory": self.memory.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.memory.load_state_dict(state["memory"])


class SelectiveBackpropGate(Gate):
    """Selective-Backprop (Jiang et al., 2019): forward every sample, backpropagate the
    biggest losers.

    A sample is kept with probability percentile(loss)**beta, its loss ranked against the
    last `history_size` losses seen. Over uniform percentiles the expected rate is
    1 / (beta + 1), so beta defaults to 1 / target_rate - 1 (beta=1 keeps half). Kept losses
    are not reweighted: the method means to bias training towards hard samples.
    """

    needs_scores = True

    def __init__(self, target_rate: float = 0.5, beta: float | None = None, history_size: int = 4096,
                 num_samples: int = 0, num_classes: int = 10, seed: int = 0, total_epochs: int = 1,
                 pack: bool = False, device: torch.device | str = "cpu"):
        super().__init__(target_rate, num_samples, num_classes, seed, total_epochs, pack, device)
        self.beta = 1.0 / self.target_rate - 1.0 if beta is None else float(beta)
        if self.beta < 0:
            raise ValueError(f"gate.beta={beta} is not allowed: a number >= 0")
        self.history = ScoreHistory(history_size)

    def select(self, idx: torch.Tensor, scores: BatchScores | None) -> Selection:
        self.history.add(scores.loss)
        prob = self.history.percentile(scores.loss) ** self.beta  # [B]
        keep = torch.rand(len(idx), generator=self.generator).to(prob.device) < prob
        return Selection(keep.nonzero().squeeze(1))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "history": self.history.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.history.load_state_dict(state["history"])


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


def pruning_epoch_rate(target_rate: float, total_epochs: int, anneal_epochs: int) -> float:
    """The rate the pruning epochs must aim at so the whole run spends target_rate, when the
    last anneal_epochs epochs train on everything."""
    if anneal_epochs <= 0:
        return target_rate
    rate = (target_rate * total_epochs - anneal_epochs) / (total_epochs - anneal_epochs) \
        if anneal_epochs < total_epochs else 0.0
    if rate <= 0:
        raise ValueError(f"gate.anneal_epochs={anneal_epochs} of {total_epochs} epochs already trains more than "
                         f"gate.target_rate={target_rate} of all samples; lower it or raise the target")
    return rate


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
