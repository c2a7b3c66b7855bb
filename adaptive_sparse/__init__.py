"""Adaptive Sparse Training: gates that decide, batch by batch, which samples to train on.

Needs torch alone. Selecting after loading, in any loop:

    from adaptive_sparse import SundewGate, gated_loss
    gate = SundewGate(len(dataset), target_rate=0.5, scoring="memory")
    selection = gate.select(idx, None)               # idx: the batch's dataset indices [B]
    losses = per_sample_loss(model(x[selection.index]), y[selection.index])
    gated_loss(losses, selection).backward()         # the selection's weights applied
    gate.observe(idx[selection.index], losses, logits)

or loading only what the gate selects:

    sampler = SelectingBatchSampler(gate, batch_size=128)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=4)
    loss = sampler.update(losses, logits)            # per batch: the loss to backpropagate

Attention layers live in `adaptive_sparse.attention`, models in `adaptive_sparse.models`, and
the Hydra training app in `adaptive_sparse.training` (`pip install adaptive-sparse[train]`).
docs/library.md is the manual.
"""
from adaptive_sparse.gating.gates import (
                                          Gate,
                                          InfoBatchGate,
                                          NoGate,
                                          RandomGate,
                                          Selection,
                                          SelectiveBackpropGate,
                                          SundewGate,
                                          gated_loss,
)
from adaptive_sparse.gating.sampler import SelectingBatchSampler

__version__ = "0.5.0"
__all__ = ["Gate", "InfoBatchGate", "NoGate", "RandomGate", "SelectingBatchSampler", "Selection",
           "SelectiveBackpropGate", "SundewGate", "gated_loss"]
