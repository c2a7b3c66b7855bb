"""What the framework adapters share, with torch alone: a sampler whose length is exact before
an epoch starts, an epoch served in a fixed number of steps, the epoch's global activation rate,
and a causal language model's per-sequence loss.

Frameworks read `len(dataloader)` before they iterate an epoch and stop the epoch after that many
batches (Lightning), or fix the steps of every epoch from the first (the Hugging Face Trainer,
which also finds the epoch to resume from as global_step // steps). The selecting sampler knows
an epoch's batch count only once the gate has planned it, and the count moves a little with the
gate's choices, so the adapters plan early (`PlannedSampler`) and, for the Trainer, cut each
epoch into the first epoch's number of steps (`EvenSteps`).
"""
from __future__ import annotations

import copy
from collections import deque
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
            # a copy: the state holds the gate's own tensors, which the planning moves
            self._before_ahead = None if self.updates_left else copy.deepcopy(super().state_dict())
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


def recut(batches: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
    """`batches` as `steps` batches, only the epoch's tail changed: the batches past `steps` join
    the last one; with too few, the last batches are split evenly (fewer than `steps` only when
    the epoch has fewer samples than steps)."""
    if len(batches) >= steps:
        return batches[:steps - 1] + [torch.cat(batches[steps - 1:])]
    keep, tail = list(batches), []
    while keep and sum(len(t) for t in tail) < steps - len(keep):
        tail.insert(0, keep.pop())
    joined = torch.cat(tail)
    return keep + list(joined.tensor_split(min(steps - len(keep), len(joined))))


class EvenSteps:
    """A batch sampler serving every epoch of `sampler` in the same number of batches: the first
    epoch's (or `steps`), for a trainer that fixes its steps per epoch once.

    An epoch whose plan has another count is re-cut at its tail (`recut`). `update` takes the
    served batches' losses in order and hands them to the sampler in its own batches. A served
    batch made of whole sampler batches trains on what the sampler returns (their size-weighted
    mean); a piece of a split batch trains on its plain mean, so a weighting gate's weights are
    left out there, in the tail of an epoch whose count differs from the first's.
    """

    def __init__(self, sampler: SelectingBatchSampler, steps: int | None = None):
        self.sampler, self.steps = sampler, steps
        self.sizes: deque[int] = deque()  # the sampler's batch sizes whose losses are not all back
        self.held: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # losses of a split batch so far

    def __len__(self) -> int:
        if self.steps is None:
            self.steps = max(len(self.sampler), 1)  # a PlannedSampler: the first epoch's exact count
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        steps = len(self)
        batches = [torch.as_tensor(b, dtype=torch.long) for b in self.sampler]  # planned at its start anyway
        self.sizes = deque(len(b) for b in batches)
        self.held = []
        for batch in recut(batches, steps) if batches else []:
            yield batch.tolist()

    def update(self, losses: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Hand back a served batch's per-sample losses [k]; returns the loss to backpropagate."""
        whole = self._whole_batches(len(losses))
        if whole is None:
            self.held.append((losses.detach(), None if logits is None else logits.detach()))
            self._hand_back_held()
            return losses.mean()
        parts = [self.sampler.update(loss, None if logits is None else logit)
                 for loss, logit in zip(losses.split(whole), _split(logits, whole))]
        for _ in whole:
            self.sizes.popleft()
        return sum(part * size for part, size in zip(parts, whole)) / len(losses)

    def _whole_batches(self, k: int) -> list[int] | None:
        """The sampler batch sizes that `k` losses complete exactly from a clean start; None otherwise."""
        if self.held:
            return None
        total, sizes = 0, []
        for size in self.sizes:
            total += size
            sizes.append(size)
            if total >= k:
                break
        return sizes if total == k else None

    def _hand_back_held(self) -> None:
        losses = torch.cat([loss for loss, _ in self.held])
        logits = None if any(logit is None for _, logit in self.held) else torch.cat([lg for _, lg in self.held])
        while self.sizes and len(losses) >= self.sizes[0]:
            n = self.sizes.popleft()
            self.sampler.update(losses[:n], None if logits is None else logits[:n])
            losses, logits = losses[n:], None if logits is None else logits[n:]
        self.held = [(losses, logits)] if len(losses) else []

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.steps, self.sizes, self.held = state["steps"], deque(), []


def _split(logits: torch.Tensor | None, sizes: list[int]) -> list[torch.Tensor | None]:
    return [None] * len(sizes) if logits is None else list(logits.split(sizes))


def causal_lm_losses(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Each sequence's loss [B]: the mean next-token cross-entropy over its positions whose label
    is not `ignore_index`, predicting labels[:, t + 1] from logits[:, t] (the shift a causal
    language model's own loss makes). A sequence with no such position gets 0 (it teaches nothing)."""
    logits, labels = logits[:, :-1], labels[:, 1:]  # [B, T-1, V], [B, T-1]
    tokens = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                             ignore_index=ignore_index, reduction="none").view(labels.shape)
    counted = (labels != ignore_index).sum(1)
    return tokens.sum(1) / counted.clamp(min=1)
