"""Who scores a batch for a gate that needs scores: the model being trained, or a small proxy.

A scorer runs one inference-mode forward over the whole loader batch (`score`) and, for a
proxy, one training step of its own on the samples the model trains on (`learn`). Both
count as scoring: train.py times them in the scoring phase and charges their FLOPs
(`forward_flops` per scored sample, `learn_flops` per learned sample) to `flops_scoring`.
"""
from __future__ import annotations

import torch
from torch import nn

from adaptive_sparse.metering import FlopMeter, example_like
from adaptive_sparse.significance import BatchScores
from adaptive_sparse.step import score_batch, train_on_subset


class ModelScorer:
    """Forward scoring: the trained model itself scores each batch; it learns nothing extra."""

    learn_flops = 0

    def __init__(self, model: nn.Module, forward_flops: int):
        self.model, self.forward_flops = model, forward_flops

    def score(self, inputs: torch.Tensor, targets: torch.Tensor, precision: str) -> BatchScores:
        return score_batch(self.model, inputs, targets, precision)

    def learn(self, inputs: torch.Tensor, targets: torch.Tensor, precision: str) -> None:
        """The model learns in its own training step."""


class ProxyScorer:
    """A small model of the gate's own (airbench's selection recipe): it scores every batch
    in one inference-mode forward and trains, one Adam step per training step of the main
    model, on exactly the samples the main model trains on, so its losses follow what the
    gate feeds the model. Its FLOPs per sample are counted, like the model's, with torch's
    flop counter on a meta-device copy, at the first batch (which gives the input shape)."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, device: torch.device | str = "cpu"):
        self.model = model.to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.meter: FlopMeter | None = None

    @property
    def forward_flops(self) -> int:
        return self.meter.forward_per_sample if self.meter else 0

    @property
    def learn_flops(self) -> int:
        return self.meter.train_per_sample if self.meter else 0

    def _first_batch(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        if self.meter is None:
            if inputs.dim() == 4 and inputs.is_contiguous(memory_format=torch.channels_last):
                self.model.to(memory_format=torch.channels_last)  # as the model's: faster CPU convolutions
            self.meter = FlopMeter(self.model, example_like(inputs, targets))

    def score(self, inputs: torch.Tensor, targets: torch.Tensor, precision: str) -> BatchScores:
        self._first_batch(inputs, targets)
        return score_batch(self.model, inputs, targets, precision)

    def learn(self, inputs: torch.Tensor, targets: torch.Tensor, precision: str) -> None:
        """One step on the mean loss of these samples (this rank's own: proxies are per rank)."""
        if not len(targets):
            return
        self._first_batch(inputs, targets)
        self.model.train()
        train_on_subset(self.model, self.optimizer, inputs, targets, precision)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
