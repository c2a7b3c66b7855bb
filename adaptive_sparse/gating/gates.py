"""Gates decide, batch by batch, which samples get a forward and backward pass.

Every gate answers `select(idx, scores)` with the batch positions to train. A gate with
`needs_scores = True` gets `BatchScores` from one inference-mode forward over the whole
batch; the others get None and cost nothing before selection. Constructors take what the gate
itself needs: the dataset's `num_samples` (per-sample memories are indexed by dataset index),
its target rate, its own parameters, `seed` and `device`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from adaptive_sparse.gating.rules import PercentileRule, PIController, PriorityRule, ThresholdRule, stochastic_round
from adaptive_sparse.gating.scorers import ProxyScorer
from adaptive_sparse.gating.significance import (
    BatchScores,
    FreshScoring,
    MemoryScoring,
    SampleMemory,
    ScoreHistory,
    SignificanceModel,
    prediction_entropy,
)

RateReducer = Callable[[torch.Tensor], float]  # a batch's keep mask [B] -> the achieved rate to control


def local_rate(keep: torch.Tensor) -> float:
    """Achieved rate of one batch from its keep mask."""
    return keep.float().mean().item()


WeightForm = Literal["estimate", "mean"]  # what a Selection's weights divide by (see Selection)


@dataclass
class Selection:
    """The batch positions to train, and optionally how much each one's loss counts.

    weight None: the training loss is the plain mean over the selected rows. Otherwise it is
    sum(weight * per-sample loss) (`gated_loss`), the weights in one of two forms (`form`):
    - "estimate": inverse-probability weights 1 / (B p), p a row's keep probability among the B
      the gate looked at, so that in expectation over the gate's draws the loss (and its
      gradient) is the looked-at batch's mean (sundew's unbiased=True);
    - "mean": w / k over the k selected rows, w a relative weight (1: an ordinary sample), so the
      loss is mean(w * loss) over the step's samples: InfoBatch's own `update` (w = 1 / (1 - r) for
      a kept well-learned sample), whose fewer steps carry about a full epoch's total update.
    """
    index: torch.Tensor                 # [k] positions within the batch, ascending
    weight: torch.Tensor | None = None  # [k] per-sample loss weights, or None
    # samples the gate looked at to choose these: None, the batch itself; a number when the
    # batch holds only the chosen samples, selected before loading (gating/sampler.py)
    looked_at: int | None = None
    form: WeightForm = "estimate"

    def seen(self, batch_size: int) -> int:
        """How many samples this selection chose from, given the batch it came with."""
        return batch_size if self.looked_at is None else self.looked_at

    def relative_weight(self, batch_size: int) -> torch.Tensor | None:
        """[k] weights with 1 for an ordinary sample (None: unweighted), comparable across
        selections from batches of any size: `weight` times the count it was divided by."""
        if self.weight is None:
            return None
        return self.weight.float() * (len(self.index) if self.form == "mean" else self.seen(batch_size))


def step_weight(relative: torch.Tensor, form: WeightForm) -> torch.Tensor:
    """The loss weights of one training step (its loss is sum(result * loss)) from its samples'
    relative weights, gathered from one selection or several (a packed step): InfoBatch's
    mean(w * loss) over the step's samples, or for inverse-probability weights the weighted
    mean sum(w * loss) / sum(w), since a step packed from several looks has no one looked-at
    batch whose mean its weighted sum could estimate."""
    return relative / (len(relative) if form == "mean" else relative.sum())


def gated_loss(losses: torch.Tensor, selection: Selection | torch.Tensor | None) -> torch.Tensor:
    """The training loss of the selected samples' per-sample `losses` [k]: their mean, or
    sum(weight * loss) when the selection carries weights (InfoBatch's mean(w * loss) over the
    kept samples, sundew's unbiased 1 / (B p); see `Selection`). Pass the `Selection` (or its
    weight tensor, or None)."""
    weight = selection.weight if isinstance(selection, Selection) else selection
    return losses.mean() if weight is None else (weight.to(losses.dtype) * losses).sum()


def check_indices(where: str, name: str, idx: torch.Tensor, num_samples: int) -> None:
    """Refuse dataset indices outside [0, num_samples) by name: a gate's per-sample memory has
    num_samples rows, and a negative index would silently read another sample's."""
    outside = (idx < 0) | (idx >= num_samples)
    if len(idx) and bool(outside.any()):
        raise ValueError(f"{where}: {name} holds dataset index {int(idx[outside][0])}, outside the gate's "
                         f"num_samples={num_samples}: build the gate with num_samples=len(dataset)")


def check_finite(where: str, name: str, losses: torch.Tensor) -> None:
    """Refuse NaN or infinite losses by name: a gate would store them in its memory (and a mean
    over it), and every later decision about those samples would read them."""
    finite = torch.isfinite(losses)
    if not bool(finite.all()):
        raise ValueError(f"{where}: {name} holds non-finite losses (NaN or inf) for {int((~finite).sum())} of "
                         f"{len(losses)} samples: refused, nothing stored; fix or skip that step before handing its "
                         "losses back")


def warn_if_never_observed(gate: Gate, memory: SampleMemory, epoch: int) -> None:
    """A gate that learns only from `observe` warns when an epoch after the first starts with no
    loss ever handed back: it would go on deciding from an empty memory without a word."""
    if epoch > 1 and bool(memory.last_loss.isnan().all()):
        warnings.warn(f"{type(gate).__name__}: epoch {epoch} starts with no loss ever handed back: call "
                      "gate.observe(trained_idx, losses) after each step (or sampler.update(losses))",
                      stacklevel=3)


def _check_rate(gate: str, target_rate: float) -> float:
    if target_rate is None or not 0.0 < float(target_rate) <= 1.0:
        raise ValueError(f"{gate}: target_rate={target_rate!r} is not allowed: a fraction in (0, 1]")
    return float(target_rate)


class Gate:
    """Base gate: trains every sample. Subclasses override `select`.

    `num_samples` is the dataset's size (per-sample memories are indexed by dataset index;
    `SelectingBatchSampler` draws its order over it); `device` is where per-sample state lives.
    `scorer` is None when scores come from the trained model.
    """

    needs_scores = False
    scorer: ProxyScorer | None = None
    has_target_rate = True  # False: the rate is an outcome (InfoBatch), and target_rate is None

    def __init__(self, num_samples: int, target_rate: float | None = 1.0, *, seed: int = 0,
                 device: torch.device | str = "cpu"):
        name = type(self).__name__
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"{name}: num_samples={num_samples!r} is not allowed: the dataset's size, an integer >= 1")
        self.target_rate = _check_rate(name, target_rate) if self.has_target_rate else None
        self.num_samples = num_samples
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)  # CPU: same draws on any device
        self.rate_of: RateReducer = local_rate

    def use_global_rate(self, reduce: RateReducer) -> None:
        """Under torchrun: feed the controller the rate over all ranks' batches (`reduce` all-reduces
        a keep mask's counts), so every rank's controller holds the same threshold."""
        self.rate_of = reduce

    @property
    def can_select_before_loading(self) -> bool:
        """True when no decision needs a scoring forward: then the epoch's selections can be
        made from the dataset indices alone, before anything is loaded, and they are the ones
        the gate would make after loading (gating/sampler.py says why)."""
        return not self.needs_scores

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

    def observe(self, trained_idx: torch.Tensor, trained: BatchScores | torch.Tensor,
                logits: torch.Tensor | None = None) -> None:
        """Hand back what the training forward learnt about the trained samples [k]: their
        BatchScores, or plain per-sample losses [k] (then `logits`, [k, C] or [k, T, V], give
        each one's prediction entropy; without them it counts as 0). Losses of another shape than
        `trained_idx`, non-finite losses and indices outside num_samples are refused by name."""
        where, loss = f"{type(self).__name__}.observe", trained.loss if isinstance(trained, BatchScores) else trained
        if loss.shape != trained_idx.shape:
            raise ValueError(f"{where}: trained holds losses of shape {tuple(loss.shape)} for trained_idx of "
                             f"shape {tuple(trained_idx.shape)}: one loss per trained sample (a sequence's: its "
                             "tokens' mean)")
        check_finite(where, "trained", loss)
        check_indices(where, "trained_idx", trained_idx, self.num_samples)
        if not isinstance(trained, BatchScores):
            losses = trained.detach().float()
            entropy = prediction_entropy(logits.detach()) if logits is not None else torch.zeros_like(losses)
            trained = BatchScores(losses, entropy)
        device = self.device
        self.learn(trained_idx.to(device), BatchScores(trained.loss.to(device), trained.entropy.to(device)))

    def learn(self, trained_idx: torch.Tensor, trained: BatchScores) -> None:
        """What a gate keeps from the trained samples' scores (nothing, here)."""

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class NoGate(Gate):
    """Full training: every sample of every batch (activation rate 1)."""

    def __init__(self, num_samples: int, *, seed: int = 0, device: torch.device | str = "cpu"):
        super().__init__(num_samples, 1.0, seed=seed, device=device)


class RandomGate(Gate):
    """The control: a uniform random subset of each batch, of size target_rate * B.

    The size is rounded stochastically (floor, plus one with the fractional part's
    probability), so the expected rate equals the target exactly at any batch size.
    """

    def __init__(self, num_samples: int, target_rate: float = 0.06, *, seed: int = 0,
                 device: torch.device | str = "cpu"):
        super().__init__(num_samples, target_rate, seed=seed, device=device)

    def select(self, idx: torch.Tensor, scores: BatchScores | None) -> Selection:
        k = stochastic_round(self.target_rate * len(idx), self.generator)
        chosen = torch.randperm(len(idx), generator=self.generator)[:k].sort().values
        return Selection(chosen.to(idx.device))


SUNDEW_WEIGHTS = {"loss": 1.0, "entropy": 0.5, "learning_value": 0.5, "novelty": 0.0}  # conf/gate/sundew.yaml's


class SundewGate(Gate):
    """Significance gating, with the activation rate held on target by a controller: a
    scoring source composed with a selection rule.

    Where significance comes from (`scoring`, gating/significance.py):
    - forward: one inference-mode forward of the trained model scores every batch;
    - proxy: `proxy`, a small model of the gate's own, scores every batch and learns from what
      the model trains on (gating/scorers.py);
    - memory: no scoring forward; each sample's last training forward left its loss and
      entropy in the memory (never-seen samples count as most significant). With
      refresh_every_epochs=N, every N-th epoch scores all samples to renew the memory.

    How significance becomes a selection (`selection`, gating/rules.py):
    - percentile (default): keep probability grows with the significance's percentile among
      recent scores, scaled so each batch's expected rate is the target. With unbiased=True
      each kept loss is weighted 1 / (B * p) (inverse-probability weighting), so the expected
      gradient is the full batch's.
    - threshold: fresh scores, a PI-controlled threshold on running z-scores (soft with
      `temperature`; gains in `controller`); memory scores, as `top`.
    - top: each batch trains its budget (target_rate * B, stochastically rounded): an
      exploration share uniformly at random, then never-seen samples, then the most
      significant. With exploration=0 and loss-only weights it is airbench's "keep the
      higher-loss part of every batch".

    `weights` mixes the signals (default: the report's, as conf/gate/sundew.yaml states them).
    `num_outputs`, the classes (or vocabulary) a loss is over, divides loss, entropy and learning
    value by log(num_outputs), to about [0, 1]; it matters only beside novelty (already in [0, 1]).
    With anneal_epochs=A > 0 the last A of `epochs` epochs train every sample (InfoBatch's
    annealing); target_rate stays the rate over the whole run: the other epochs aim at
    (target_rate * E - A) / (E - A), so sundew spends as many samples as a random gate.
    """

    def __init__(self, num_samples: int, target_rate: float = 0.06, *, scoring: str = "forward",
                 selection: str = "percentile", weights: dict[str, float] | None = None,
                 num_outputs: int | None = None, controller: dict | None = None, power: float = 1.0,
                 unbiased: bool = False, history_size: int = 4096, exploration: float = 0.1,
                 refresh_every_epochs: int = 0, anneal_epochs: int = 0, epochs: int = 1,
                 temperature: float = 1.0, min_selected: int = 1, norm_momentum: float = 0.05,
                 proxy: nn.Module | None = None, proxy_lr: float = 1e-3, seed: int = 0,
                 device: torch.device | str = "cpu"):
        super().__init__(num_samples, target_rate, seed=seed, device=device)
        for key, value, allowed in (("scoring", scoring, ("forward", "memory", "proxy")),
                                    ("selection", selection, ("percentile", "threshold", "top"))):
            if value not in allowed:
                raise ValueError(f"SundewGate: {key}={value!r} is not allowed: one of {allowed}")
        if not 0.0 <= exploration <= 1.0:
            raise ValueError(f"SundewGate: exploration={exploration} is not allowed: a fraction in [0, 1]")
        self.scoring, self.selection, self.unbiased = scoring, selection, bool(unbiased)
        self.epochs, self.anneal_epochs = int(epochs), int(anneal_epochs)
        self.annealing = False
        self.memory = SampleMemory(num_samples, self.device)
        significance = SignificanceModel(SUNDEW_WEIGHTS if weights is None else weights, num_outputs)
        self.source = self._make_source(scoring, significance, refresh_every_epochs, proxy, proxy_lr)
        self.scorer = self.source.scorer
        self.rule = self._make_rule(pruning_epoch_rate(self.target_rate, self.epochs, self.anneal_epochs),
                                    controller, power, exploration, history_size, min_selected, temperature,
                                    norm_momentum)

    def _make_source(self, scoring: str, model: SignificanceModel, refresh_every_epochs: int,
                     proxy: nn.Module | None, proxy_lr: float) -> FreshScoring | MemoryScoring:
        if scoring == "memory":
            return MemoryScoring(model, self.memory, refresh_every_epochs)
        if scoring == "proxy" and proxy is None:
            raise ValueError("SundewGate: scoring='proxy' needs proxy=<a small model that scores each batch>")
        scorer = ProxyScorer(proxy, lr=proxy_lr, device=self.device) if scoring == "proxy" else None
        return FreshScoring(model, self.memory, scorer)

    def _make_rule(self, rate: float, controller: dict | None, power: float, exploration: float,
                   history_size: int, min_selected: int, temperature: float, norm_momentum: float):
        gains = {k: v for k, v in (controller or {}).items() if v is not None}
        fresh_threshold = self.selection == "threshold" and self.scoring != "memory"
        if not fresh_threshold and {"kp", "ki"} & gains.keys():
            raise ValueError(f"SundewGate: controller kp and ki act only with selection='threshold' and fresh scores "
                             f"(scoring 'forward' or 'proxy'), not selection={self.selection!r} with "
                             f"scoring={self.scoring!r}: this rule moves its budget by a fixed slow integral")
        if self.selection == "percentile":
            return PercentileRule(rate, power, exploration, history_size, min_selected, gains.get("ema", 0.1),
                                  self.device)
        if fresh_threshold:  # the same rate EMA as the other rules unless `controller` says otherwise
            return ThresholdRule(rate, temperature, min_selected, norm_momentum, {"ema": 0.1, **gains})
        # top, and threshold on remembered scores (stale losses share no scale for a threshold)
        return PriorityRule(rate, exploration, min_selected, gains.get("ema", 0.1))

    @property
    def controller(self) -> PIController:
        return self.rule.controller

    @property
    def needs_scores(self) -> bool:
        return self.source.needs_scores and not self.annealing

    @property
    def threshold(self) -> float | None:
        return self.controller.threshold if isinstance(self.rule, ThresholdRule) else None

    @property
    def can_select_before_loading(self) -> bool:
        # memory scoring, never refreshed: every epoch decides from remembered losses alone
        return self.scoring == "memory" and self.source.refresh_every == 0

    def epoch_metrics(self) -> dict[str, float]:
        return {} if isinstance(self.rule, ThresholdRule) else {"budget": self.controller.threshold}

    def start_epoch(self, epoch: int) -> None:
        if self.scoring == "memory":  # fresh scores fill the memory themselves
            warn_if_never_observed(self, self.memory, epoch)
        self.source.start_epoch(epoch)
        self.annealing = self.anneal_epochs > 0 and epoch > self.epochs - self.anneal_epochs

    def select(self, idx: torch.Tensor, scores: BatchScores | None) -> Selection:
        check_indices("SundewGate.select", "idx", idx, self.num_samples)
        if self.annealing:  # the last epochs train on everything
            return Selection(torch.arange(len(idx), device=idx.device))
        significance = self.source.significance(idx, scores)  # [B], NaN: never seen
        keep, prob = self.rule.keep(significance, self.generator)
        self.controller.update(self.rate_of(keep))
        index = keep.nonzero().squeeze(1)
        weight = 1.0 / (len(idx) * prob[index]) if prob is not None and self.unbiased else None
        return Selection(index, weight)

    def learn(self, trained_idx: torch.Tensor, trained: BatchScores) -> None:
        self.source.observe(trained_idx, trained)

    def state_dict(self) -> dict:
        # the epoch's own flags too: a checkpoint from inside an epoch resumes without start_epoch
        return {**super().state_dict(), **self.rule.state_dict(), "memory": self.memory.state_dict(),
                "proxy": self.scorer.state_dict() if self.scorer else None,
                "annealing": self.annealing, "refreshing": bool(getattr(self.source, "refreshing", False))}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.rule.load_state_dict(state)
        self.memory.load_state_dict(state["memory"])
        if self.scorer:
            self.scorer.load_state_dict(state["proxy"])
        self.annealing = bool(state.get("annealing", False))
        if hasattr(self.source, "refreshing"):
            self.source.refreshing = bool(state.get("refreshing", False))


class InfoBatchGate(Gate):
    """InfoBatch (Qin et al., ICLR 2024), per batch: prune well-learned samples at random and
    rescale the rest so the expected gradient is unchanged.

    Each sample's score is the loss of its last training forward (free: no scoring pass).
    At the start of each epoch the mean score over the samples seen so far is fixed; a
    sample below it is skipped with probability prune_ratio, and when kept its loss counts
    1 / (1 - prune_ratio) times. Samples at or above the mean, and never-seen ones, always
    train. The last epochs, those after the first int(anneal_after * epochs) (the paper's
    delta, 0.875), train on everything: `epochs`, the run's length, has no default, since a gate
    that does not know it cannot tell when to stop pruning. The paper prunes the epoch's sample
    list and refills whole batches (here: packed, the sampler's pack=True or train.py's
    gate.pack); unpacked, batches shrink instead, which costs the same forward and backward work.
    Either way a step's loss is InfoBatch's own `update`: mean(w * loss) over the step's samples,
    w the 1 / (1 - prune_ratio) above or 1 (`Selection`'s "mean" form). It has no target rate:
    its rate follows from prune_ratio and the loss distribution (summary.json's activation_rate).
    """

    has_target_rate = False

    def __init__(self, num_samples: int, *, epochs: int, prune_ratio: float = 0.5, anneal_after: float = 0.875,
                 seed: int = 0, device: torch.device | str = "cpu"):
        super().__init__(num_samples, None, seed=seed, device=device)
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"InfoBatchGate: epochs={epochs!r} is not allowed: the run's number of epochs, "
                             "an integer >= 1")
        if not 0.0 <= prune_ratio < 1.0:
            raise ValueError(f"InfoBatchGate: prune_ratio={prune_ratio} is not allowed: a fraction in [0, 1)")
        if not 0.0 <= anneal_after <= 1.0:
            raise ValueError(f"InfoBatchGate: anneal_after={anneal_after} is not allowed: a fraction in [0, 1]")
        self.epochs = epochs
        self.prune_ratio, self.anneal_after = float(prune_ratio), float(anneal_after)
        self.memory = SampleMemory(num_samples, self.device)
        self.mean_loss = float("nan")
        self.annealing = False

    def start_epoch(self, epoch: int) -> None:
        warn_if_never_observed(self, self.memory, epoch)
        self.annealing = epoch > int(self.anneal_after * self.epochs)
        seen = self.memory.last_loss[~self.memory.last_loss.isnan()]
        self.mean_loss = seen.mean().item() if len(seen) else float("nan")

    def epoch_metrics(self) -> dict[str, float]:
        return {"prune_below_loss": self.mean_loss}

    def select(self, idx: torch.Tensor, scores: BatchScores | None) -> Selection:
        check_indices("InfoBatchGate.select", "idx", idx, self.num_samples)
        b = len(idx)
        everything = torch.arange(b, device=idx.device)
        if self.annealing:
            return Selection(everything)
        loss = self.memory.last_loss[idx]  # [B], NaN: never seen (never pruned)
        well_learned = loss < self.mean_loss  # False for NaN
        pruned = well_learned & (torch.rand(b, generator=self.generator).to(idx.device) < self.prune_ratio)
        index = (~pruned).nonzero().squeeze(1)
        scale = torch.where(well_learned[index], 1.0 / (1.0 - self.prune_ratio), 1.0)
        return Selection(index, scale / len(index), form="mean")  # InfoBatch's mean(w * loss) over the kept

    def learn(self, trained_idx: torch.Tensor, trained: BatchScores) -> None:
        self.memory.record(trained_idx, trained)
        self.memory.record_trained(trained_idx)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "memory": self.memory.state_dict(),
                "mean_loss": self.mean_loss, "annealing": self.annealing}  # this epoch's, fixed at its start

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.memory.load_state_dict(state["memory"])
        self.mean_loss = float(state.get("mean_loss", float("nan")))
        self.annealing = bool(state.get("annealing", False))


class SelectiveBackpropGate(Gate):
    """Selective-Backprop (Jiang et al., 2019): forward every sample, backpropagate the
    biggest losers.

    A sample is kept with probability percentile(loss)**beta, its loss ranked against the
    last `history_size` losses seen. Over uniform percentiles the expected rate is
    1 / (beta + 1), so beta defaults to 1 / target_rate - 1 (beta=1 keeps half). Kept losses
    are not reweighted: the method means to bias training towards hard samples.
    """

    needs_scores = True

    def __init__(self, num_samples: int, target_rate: float = 0.25, *, beta: float | None = None,
                 history_size: int = 4096, seed: int = 0, device: torch.device | str = "cpu"):
        super().__init__(num_samples, target_rate, seed=seed, device=device)
        self.beta = 1.0 / self.target_rate - 1.0 if beta is None else float(beta)
        if self.beta < 0:
            raise ValueError(f"SelectiveBackpropGate: beta={beta} is not allowed: a number >= 0")
        self.history = ScoreHistory(history_size, self.device)

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


def pruning_epoch_rate(target_rate: float, total_epochs: int, anneal_epochs: int) -> float:
    """The rate the pruning epochs must aim at so the whole run spends target_rate, when the
    last anneal_epochs epochs train on everything."""
    if anneal_epochs <= 0:
        return target_rate
    rate = (target_rate * total_epochs - anneal_epochs) / (total_epochs - anneal_epochs) \
        if anneal_epochs < total_epochs else 0.0
    if rate <= 0:
        raise ValueError(f"SundewGate: anneal_epochs={anneal_epochs} of epochs={total_epochs} already trains more than "
                         f"target_rate={target_rate} of all samples; lower it or raise the target")
    return rate


