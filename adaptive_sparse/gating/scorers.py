"""Who scores a batch for a gate that needs scores: the model being trained, or a small proxy.

A scorer runs one inference-mode forward over the whole loader batch (`score`) and, for a
proxy, one training step of its own on the samples the model trains on (`learn`). Both count
as scoring: the training app times them in its scoring phase and counts their FLOPs from
`scorer.model`.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from adaptive_sparse.gating.significance import BatchScores


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast when asked for, otherwise a no-op."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def score_batch(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                precision: str = "fp32") -> BatchScores:
    """Per-sample loss and entropy from one inference-mode forward (eval mode: no dropout noise)."""
    was_training = model.training
    model.eval()
    with torch.inference_mode(), autocast_context(inputs.device, precision):
        logits = model(inputs)  # [B, C] or [B, T, V]
    model.train(was_training)
    return BatchScores.from_logits(logits, targets)


class ModelScorer:
    """Forward scoring: the trained model itself scores each batch; it learns nothing extra."""

    def __init__(self, model: nn.Module):
        self.model = model

    def score(self, inputs: torch.Tensor, targets: torch.Tensor, precision: str) -> BatchScores:
        return score_batch(self.model, inputs, targets, precision)

    def learn(self, inputs: torch.Tensor, targets: torch.Tensor, precision: str) -> None:
        """The model learns in its own training step."""


class ProxyScorer:
    """A small model of the gate's own (airbench's selection recipe): it scores every batch
    in one inference-mode forward and trains, one Adam step per training step of the main
    model, on exactly the samples the main model trains on, so its losses follow what the
    gate feeds the model. Proxies are per process: under torchrun each rank's learns its own
    samples."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, device: torch.device | str = "cpu"):
        self.model = model.to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.layout_matched = False

    def _match_layout(self, inputs: torch.Tensor) -> None:
        if not self.layout_matched:
            if inputs.dim() == 4 and inputs.is_contiguous(memory_format=torch.channels_last):
                self.model.to(memory_format=torch.channels_last)  # as the model's: faster CPU convolutions
            self.layout_matched = True

    def score(self, inputs: torch.Tensor, targets: torch.Tensor, precision: str) -> BatchScores:
        self._match_layout(inputs)
        return score_batch(self.model, inputs, targets, precision)

    def learn(self, inputs: torch.Tensor, targets: torch.Tensor, precision: str) -> None:
        """One step on the mean loss of these samples."""
        if not len(targets):
            return
        self._match_layout(inputs)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with autocast_context(inputs.device, precision):
            logits = self.model(inputs)  # [k, C] or [k, T, V]
        BatchScores.from_logits(logits, targets).loss.mean().backward()
        self.optimizer.step()

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
