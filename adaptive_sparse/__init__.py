"""Adaptive Sparse Training: gates that decide, batch by batch, which samples to train on.

The public names below load on first use (PEP 562), so that light modules such as
`adaptive_sparse.records` stay importable without torch.

    from adaptive_sparse import SundewGate
    gate = SundewGate(target_rate=0.5, num_samples=len(dataset), scoring="memory")
    keep = gate.select(idx, None).index              # positions of the batch to train
    gate.observe(idx[keep], losses, logits)          # their per-sample losses (and logits)

or, loading only what the gate selects (adaptive_sparse/sampler.py):

    sampler = SelectingBatchSampler(gate, len(dataset), batch_size=128)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=4)
    loss = sampler.update(losses, logits)            # per batch: the loss to backpropagate

docs/library.md is the manual.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.4.0"

_PUBLIC = {
    "Gate": "gates", "NoGate": "gates", "RandomGate": "gates", "SundewGate": "gates",
    "InfoBatchGate": "gates", "SelectiveBackpropGate": "gates", "Selection": "gates",
    "SelectingBatchSampler": "sampler", "BatchScores": "significance", "SelectionPacker": "packing", "TrainBatch": "packing",
    "FlopMeter": "metering", "train_on_subset": "step",
    "SimpleCNN": "models", "FastNet": "models", "ClassificationTask": "tasks", "CharLMTask": "tasks", "GPT": "gpt",
    "DenseAttention": "attention", "SparseAttention": "attention",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'adaptive_sparse' has no attribute {name!r}")
    return getattr(importlib.import_module(f"adaptive_sparse.{_PUBLIC[name]}"), name)
