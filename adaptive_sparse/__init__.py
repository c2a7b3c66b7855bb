"""Adaptive Sparse Training: gates that decide, batch by batch, which samples to train on.

The public names below load on first use (PEP 562), so that light modules such as
`adaptive_sparse.records` stay importable without torch.

    from adaptive_sparse import SundewGate, BatchScores
    gate = SundewGate(target_rate=0.5, num_samples=len(dataset), scoring="memory")
    selection = gate.select(idx, None)            # positions of the batch to train
    gate.observe(idx[selection.index], BatchScores(losses, entropies))
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.4.0"

_PUBLIC = {
    "Gate": "gates", "NoGate": "gates", "RandomGate": "gates", "SundewGate": "gates",
    "InfoBatchGate": "gates", "SelectiveBackpropGate": "gates", "Selection": "gates",
    "BatchScores": "significance", "SelectionPacker": "packing", "TrainBatch": "packing",
    "FlopMeter": "metering", "train_on_subset": "step",
    "ClassificationTask": "tasks", "CharLMTask": "tasks", "GPT": "gpt",
    "DenseAttention": "attention", "SparseAttention": "attention",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'adaptive_sparse' has no attribute {name!r}")
    return getattr(importlib.import_module(f"adaptive_sparse.{_PUBLIC[name]}"), name)
