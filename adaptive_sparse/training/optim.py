"""Optimiser and schedule factories for recipes that need more than `torch.optim.X(params)`.

airbench's lookahead: a slow copy of the weights that the fast ones are pulled back to.

Every `every_steps` loader batches the slow copy moves toward the live weights by 1 - decay
and the live weights are set to it; decay grows over training as
`decay * (step / total_steps) ** exponent` (airbench94: every 5 steps, 0.95 ** 5, cubed), so
early on the weights move freely and late in training they average over many steps. At the
end (`finish`) the live weights become the slow copy. BatchNorm's running statistics, being
floating-point state, are averaged too; integer counters are not.

`training.lookahead` in the config (null: off); `train.py` steps it after each loader batch,
so a gated run follows full training's schedule, as the learning rate does.
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn


def sgd_with_scaled_biases(params: Iterable[torch.nn.Parameter], lr: float, momentum: float = 0.9,
                           nesterov: bool = True, weight_decay: float = 0.0, bias_lr_scale: float = 1.0,
                           fused: bool | None = None) -> torch.optim.SGD:
    """SGD whose one-dimensional parameters (biases, BatchNorm shifts) take `bias_lr_scale`
    times the learning rate and 1 / bias_lr_scale times the weight decay, so their decay per
    step stays the weights' (airbench's "scale bias" trick); a 1-D parameter marked `base_lr`
    keeps the base rate. Frozen parameters are left out."""
    trainable = [p for p in params if p.requires_grad]
    weights = [p for p in trainable if p.ndim > 1 or getattr(p, "base_lr", False)]  # e.g. FastNet's whitening bias
    biases = [p for p in trainable if p.ndim <= 1 and not getattr(p, "base_lr", False)]
    groups = [{"params": weights, "lr": lr, "weight_decay": weight_decay},
              {"params": biases, "lr": lr * bias_lr_scale, "weight_decay": weight_decay / bias_lr_scale}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=momentum, nesterov=nesterov,
                           fused=fused)


def triangular_schedule(optimizer: torch.optim.Optimizer, total_steps: int, start: float = 0.2,
                        peak_at: float = 0.23, end: float = 0.07) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate times a factor that rises linearly from `start` to 1 over the first
    `peak_at` share of `total_steps`, then falls linearly to `end`. Stepped once per loader
    batch (`training.scheduler_interval: batch`), so a gated run follows the same schedule as
    full training whatever share of each batch it trains."""
    knots = ([0.0, peak_at * total_steps, float(total_steps)], [start, 1.0, end])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: float(np.interp(step, *knots)))


def build_scheduler(cfg, optimizer: torch.optim.Optimizer, total_steps: int | None, lead_in_steps: int = 0):
    """`training.scheduler` (a `_partial_` config, or null) for this optimiser. A schedule that
    steps per loader batch (`total_steps` given) is also told how many batches the run has.

    `lead_in_steps` > 0 makes this run the tail of a longer schedule (`training.schedule_lead_in_epochs`:
    a stage continued from another run's weights by `init_from`, as in DeepSeek's sparse-attention
    recipe): the schedule is built over lead_in_steps + total_steps and advanced past the first
    lead_in_steps, so the stage trains at the learning rates the longer run would have had."""
    if not cfg:
        return None
    factory = instantiate(cfg)
    scheduler = factory(optimizer) if total_steps is None else factory(optimizer, total_steps=lead_in_steps + total_steps)
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": meant here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(lead_in_steps):
            scheduler.step()
    return scheduler


def adamw_decay_matrices(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.1,
                         betas: tuple[float, float] = (0.9, 0.99), fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW whose weight decay applies to matrices only (linear weights, embeddings); biases
    and LayerNorm gains (one-dimensional) are not decayed: nanoGPT's `configure_optimizers`.
    Frozen parameters are left out."""
    trainable = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas), fused=fused)


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 100,
                           min_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate times a factor that rises linearly from 1 / (warmup_steps + 1) to 1 over
    the first `warmup_steps` steps, then follows a cosine from 1 down to `min_ratio` at
    `total_steps` (nanoGPT's `get_lr`: lr 1e-3 to min_lr 1e-4 is min_ratio 0.1). Stepped once
    per loader batch (`training.scheduler_interval: batch`), so a gated run follows full
    training's schedule over the same loader batches."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Lookahead:
    def __init__(self, model: torch.nn.Module, total_steps: int, every_steps: int = 5,
                 decay: float = 0.95 ** 5, exponent: float = 3.0):
        self.total_steps, self.every_steps = total_steps, every_steps
        self.decay, self.exponent = decay, exponent
        self.live = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}  # share storage
        self.slow = {k: v.detach().clone() for k, v in self.live.items()}

    def decay_at(self, step: int) -> float:
        return self.decay * (step / self.total_steps) ** self.exponent

    @torch.no_grad()
    def pull(self, decay: float) -> None:
        """slow <- decay * slow + (1 - decay) * live, then live <- slow."""
        for name, slow in self.slow.items():
            slow.lerp_(self.live[name], 1.0 - decay)
            self.live[name].copy_(slow)

    def step(self, step: int) -> None:
        """After loader batch `step` (1-based, counted over the whole run)."""
        if step % self.every_steps == 0:
            self.pull(self.decay_at(min(step, self.total_steps)))

    def finish(self) -> None:
        """End of training: the live weights become the slow copy."""
        self.pull(1.0)

    def state_dict(self) -> dict:
        return {"slow": self.slow}

    def load_state_dict(self, state: dict) -> None:
        for name, slow in self.slow.items():
            slow.copy_(state["slow"][name])


class Optimisation:
    """The optimiser and what steps beside it, built from `training`: the gradient scaler (fp16's
    narrow range needs its loss scaled; bf16 does not), the learning-rate schedule (per loader
    batch or per epoch) and airbench's lookahead. A gated run steps the schedule and lookahead per
    loader batch, not per optimiser step, so it follows full training's schedule."""

    def __init__(self, cfg: DictConfig, model: nn.Module, batches_per_epoch: int, precision: str,
                 device: torch.device):
        self.optimizer = instantiate(cfg.optimizer)(model.parameters())
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.per_batch = cfg.scheduler_interval == "batch"
        # the last epoch may stop early (airbench94's 9.9 epochs: 48 x 9 + 44 batches of 1,024)
        self.last_epoch_batches = math.ceil(cfg.last_epoch_fraction * batches_per_epoch)
        run_batches = (cfg.epochs - 1) * batches_per_epoch + self.last_epoch_batches
        lead_in = cfg.schedule_lead_in_epochs  # a stage continuing a longer schedule (init_from)
        self.scheduler = build_scheduler(cfg.scheduler, self.optimizer,
                                         total_steps=run_batches if self.per_batch else None,
                                         lead_in_steps=lead_in * batches_per_epoch if self.per_batch else lead_in)
        self.lookahead = instantiate(cfg.lookahead)(model, total_steps=run_batches) if cfg.lookahead else None

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def after_batch(self, step: int) -> None:
        """After each loader batch (`step` counts them over the run)."""
        if self.scheduler is not None and self.per_batch:
            self.scheduler.step()
        if self.lookahead is not None:  # every few batches, the weights back toward their slow copy
            self.lookahead.step(step)

    def after_epoch(self, last: bool) -> None:
        if self.lookahead is not None and last:
            self.lookahead.finish()  # training ends on the slow weights
        if self.scheduler is not None and not self.per_batch:
            self.scheduler.step()
