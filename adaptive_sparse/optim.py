"""Optimiser and schedule factories for recipes that need more than `torch.optim.X(params)`."""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch


def sgd_with_scaled_biases(params: Iterable[torch.nn.Parameter], lr: float, momentum: float = 0.9,
                           nesterov: bool = True, weight_decay: float = 0.0, bias_lr_scale: float = 1.0,
                           fused: bool | None = None) -> torch.optim.SGD:
    """SGD whose one-dimensional parameters (biases, BatchNorm shifts) take `bias_lr_scale`
    times the learning rate and 1 / bias_lr_scale times the weight decay, so their decay per
    step stays the weights' (airbench's "scale bias" trick). Frozen parameters are left out."""
    trainable = [p for p in params if p.requires_grad]
    weights = [p for p in trainable if p.ndim > 1]
    biases = [p for p in trainable if p.ndim <= 1]
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


def build_scheduler(cfg, optimizer: torch.optim.Optimizer, total_steps: int | None):
    """`training.scheduler` (a `_partial_` config, or null) for this optimiser. A schedule that
    steps per loader batch (`total_steps` given) is also told how many batches the run has."""
    if not cfg:
        return None
    from hydra.utils import instantiate

    factory = instantiate(cfg)
    return factory(optimizer) if total_steps is None else factory(optimizer, total_steps=total_steps)
