"""From the gate's selections to training batches: one step per loader batch, or packed.

Unpacked (`gate.pack=false`), each loader batch's selection is one training step, however few
samples it holds: at rate r a step trains about r * batch_size samples, and every step still
pays its fixed costs (the optimiser update of all parameters, dispatch, small matrices).

Packed (`gate.pack=true`), selected samples wait, in the order they were selected, until
`batch_size` of them can train in one full step; the remainder trains at the end of the
epoch, so no sample waits across an epoch (or a checkpoint). At rate r an epoch then takes
about r times full training's optimiser steps.

Weights: a gate's `Selection.weight` makes sum(weight * loss) one loader batch's step loss.
Unpacked, that is the step. A packed batch gathers samples from several loader batches, so each
weight is first made relative (1: an ordinary sample; `Selection.relative_weight`), and the packed
step's weights come from those (`step_weight`): InfoBatch's mean(w * loss) over the step's
samples, as its own `update` returns, or for sundew's inverse-probability weights the weighted
mean sum(w * loss) / sum(w), whatever the number of loader batches the step spans.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from adaptive_sparse.gating.gates import Selection, WeightForm, step_weight


@dataclass
class TrainBatch:
    """The samples of one training step."""
    inputs: torch.Tensor                # [k, ...]: images [k, 3, H, W] or token windows [k, T]
    targets: torch.Tensor               # [k] classes or [k, T] next tokens
    idx: torch.Tensor                  # [k] dataset indices
    weight: torch.Tensor | None = None  # [k] loss weights (see `Selection.weight`), or None

    def __len__(self) -> int:
        return len(self.targets)


def local_count(n: int) -> int:
    """A single process's count reducer: its own count (torchrun sums over ranks)."""
    return n


class SelectionPacker:
    """Turns each loader batch's selection into the training batches due now.

    `add` takes a loader batch and its selection; `ready` then yields the batches to train
    before the next loader batch, and `drain` those left at the end of the epoch. Under
    torchrun `count_reducer` sums counts over the `ranks` processes, so every rank steps at the
    same moments (each with up to batch_size of its own samples, possibly none) and the
    collectives line up.
    """

    def __init__(self, batch_size: int, enabled: bool,
                 count_reducer: Callable[[int], int] = local_count, ranks: int = 1, carry: bool = False):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"SelectionPacker: batch_size={batch_size!r} is not allowed: an integer >= 1")
        self.batch_size, self.enabled = batch_size, bool(enabled)
        # carry (training.pack_remainder=carry): an epoch's remainder waits for the next epoch's
        # samples rather than training as one small batch (see `end_of_epoch`)
        self.carry = self.enabled and bool(carry)
        self.count_reducer, self.ranks = count_reducer, int(ranks)
        self.waiting: list[TrainBatch] = []  # packed: weights relative (1 = an ordinary sample)
        self.empty: TrainBatch | None = None  # a zero-sample batch of the right shapes
        self.weighted = False  # whether any waiting sample came with a gate weight
        self.form: WeightForm = "estimate"  # what those weights are (`Selection.form`)

    @property
    def num_waiting(self) -> int:
        return sum(len(part) for part in self.waiting)

    def add(self, inputs: torch.Tensor, targets: torch.Tensor, idx: torch.Tensor, selection: Selection) -> None:
        chosen = selection.index  # [k] positions in the loader batch
        self.empty = TrainBatch(inputs[:0], targets[:0], idx[:0])
        weight = selection.weight
        if self.enabled:  # relative weights, comparable across loader batches of any size
            relative = selection.relative_weight(len(targets))
            if relative is not None:
                self.weighted, self.form = True, selection.form
            weight = torch.ones(len(chosen), device=targets.device) if relative is None else relative
        self.waiting.append(TrainBatch(inputs[chosen], targets[chosen], idx[chosen], weight))

    def ready(self) -> Iterator[TrainBatch]:
        """Unpacked: the last loader batch's selection as the gate gave it (possibly empty).
        Packed: full batches while enough samples wait (on all ranks together)."""
        if not self.enabled:
            yield self.waiting.pop()
            return
        while self.count_reducer(self.num_waiting) >= self.batch_size * self.ranks:
            yield self._take(self.batch_size)

    def drain(self) -> Iterator[TrainBatch]:
        """End of epoch: whatever still waits (on any rank), in batches of at most batch_size."""
        while self.count_reducer(self.num_waiting) > 0:
            yield self._take(self.batch_size)

    def _take(self, n: int) -> TrainBatch:
        """The first n waiting samples (fewer if fewer wait), in selection order."""
        parts, taken = [], 0
        while self.waiting and taken < n:
            part = self.waiting.pop(0)
            room = n - taken
            if len(part) > room:  # split: the rest keeps its place at the head of the queue
                self.waiting.insert(0, _rows(part, slice(room, None)))
                part = _rows(part, slice(None, room))
            parts.append(part)
            taken += len(part)
        if not parts:
            return self.empty
        batch = TrainBatch(*(torch.cat([getattr(p, f) for p in parts]) for f in ("inputs", "targets", "idx", "weight")))
        batch.weight = step_weight(batch.weight, self.form) if self.weighted else None
        if not self.waiting:
            self.weighted = False
        return batch


    def end_of_epoch(self, last: bool) -> Iterator[TrainBatch]:
        """What trains at an epoch's end: `drain`'s batches; with `carry`, nothing (the remainder
        waits for the next epoch), and after the run's `last` epoch its remainder, under one
        batch, is dropped untrained (at batch 1024 a step on a dozen samples at the full rate,
        and their BatchNorm statistics, wrecked the fast recipe's evaluations)."""
        if not self.carry:
            yield from self.drain()
        elif last:
            self.waiting, self.weighted = [], False

    def state_dict(self) -> dict:
        """The samples still waiting (inside an epoch when a run is stopped mid-way, or carried
        over an epoch's end)."""
        return {"waiting": [{"inputs": b.inputs.cpu(), "targets": b.targets.cpu(), "idx": b.idx.cpu(),
                             "weight": None if b.weight is None else b.weight.cpu()} for b in self.waiting],
                "weighted": self.weighted, "form": self.form}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.waiting = [TrainBatch(w["inputs"].to(device), w["targets"].to(device), w["idx"].to(device),
                                   None if w["weight"] is None else w["weight"].to(device)) for w in state["waiting"]]
        self.weighted = bool(state["weighted"])
        self.form = state.get("form", "estimate")  # saved before forms: its weights divide by the looked-at count
        if self.waiting:
            self.empty = _rows(self.waiting[0], slice(0, 0))


def _rows(batch: TrainBatch, rows: slice) -> TrainBatch:
    return TrainBatch(batch.inputs[rows], batch.targets[rows], batch.idx[rows],
                      None if batch.weight is None else batch.weight[rows])
