"""What the framework adapters share, with torch alone: a sampler whose length is exact before
an epoch starts, the epoch's global activation rate, and a causal language model's per-sequence loss.

Frameworks read `len(dataloader)` before they iterate an epoch and stop the epoch after that many
batches (Lightning), or fix the steps of every epoch from the first (the Hugging Face Trainer,
which also finds the epoch to resume from as global_step // steps). The selecting sampler knows
an epoch's batch count only once the gate has planned it, and the count moves a little with the
gate's choices, so the adapters plan early (`PlannedSampler`) and, for the Trainer, deal each
epoch into the first epoch's number of steps (the sampler's `steps`).
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from adaptive_sparse.gating.sampler import SelectingBatchSampler


class PlannedSampler(SelectingBatchSampler):
    """A `SelectingBatchSampler` whose `len()` is the next epoch's exact number of batches.

    `len()` plans the next epoch when no batch is waiting for its losses (the last epoch is
    over: the gate has learnt all of it), and the next iteration yields that plan; so a
    framework that reads the length at an epoch's start reads the number it will get. Planning
    is what iterating would do first anyway: the same draws, in the same order. An epoch planned
    but not begun is not part of `state_dict` (frameworks read the length after the last epoch
    too): the state is the one from before it, from which a resume plans it again the same way.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ahead: tuple[list[int] | None, Iterator[list[int]]] | None = None  # (first batch, the rest)
        self._before_ahead: dict | None = None  # the state before the epoch planned ahead

    @property
    def served_epoch(self) -> int:
        """The epoch whose batches were served last (`epoch` counts one planned ahead, too)."""
        return self.epoch - 1 if self._ahead is not None else self.epoch

    @property
    def at_epoch_boundary(self) -> bool:
        """Whether `state_dict` can be taken: no batch of a begun epoch waits for its losses."""
        return not self.updates_left or (self._ahead is not None and self._before_ahead is not None)

    def _plan_next_epoch(self) -> None:
        if self._ahead is None:
            self._before_ahead = None if self.updates_left else super().state_dict()  # a copy, before planning
            epoch = super().__iter__()
            self._ahead = (next(epoch, None), epoch)  # the first batch drawn runs the epoch's planning

    def __len__(self) -> int:
        if self._ahead is None and not self.updates_left:
            self._plan_next_epoch()
        return super().__len__()

    def __iter__(self) -> Iterator[list[int]]:
        self._plan_next_epoch()
        (first, rest), self._ahead, self._before_ahead = self._ahead, None, None
        if first is not None:
            yield first
            yield from rest

    def state_dict(self) -> dict:
        if self._ahead is not None and self._before_ahead is not None:
            return self._before_ahead
        return super().state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._ahead = self._before_ahead = None  # an epoch planned before the load belongs to the run replaced
        super().load_state_dict(state)


def checkpoint_state(sampler: PlannedSampler, state: Callable[[], dict]) -> dict:
    """What a checkpoint keeps of the sampler: `state()` at an epoch boundary; inside an epoch,
    where a resume would skip the rest of it, only a marker naming the epoch (`refuse_mid_epoch`)."""
    return state() if sampler.at_epoch_boundary else {"mid_epoch": sampler.served_epoch}


def refuse_mid_epoch(state: dict, where: str, remedy: str = "") -> None:
    """A one-line ValueError when `state` is a mid-epoch marker: `where` names the checkpoint."""
    if "mid_epoch" in state:
        raise ValueError(f"{where} was saved inside epoch {state['mid_epoch']}, where the sampler cannot resume; "
                         f"resume from a checkpoint saved at an epoch's end{remedy}")


def epoch_record(sampler: SelectingBatchSampler, trained: int) -> dict:
    """The epoch's samples trained and looked at, summed over ranks (a collective under torchrun:
    every rank calls it), and their ratio, the global activation rate."""
    trained_all, seen_all = sampler.ranks.all_reduce([trained, sampler.samples_looked_at])
    epoch = getattr(sampler, "served_epoch", sampler.epoch)  # a PlannedSampler may have planned the next
    return {"epoch": epoch, "samples_trained": int(trained_all), "samples_seen": int(seen_all),
            "activation_rate": trained_all / seen_all}


def causal_lm_losses(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Each sequence's loss [B]: the mean next-token cross-entropy over its positions whose label
    is not `ignore_index`, predicting labels[:, t + 1] from logits[:, t] (the shift a causal
    language model's own loss makes). A sequence with no such position gets 0 (it teaches nothing)."""
    logits, labels = logits[:, :-1], labels[:, 1:]  # [B, T-1, V], [B, T-1]
    tokens = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                             ignore_index=ignore_index, reduction="none").view(labels.shape)
    counted = (labels != ignore_index).sum(1)
    return tokens.sum(1) / counted.clamp(min=1)
