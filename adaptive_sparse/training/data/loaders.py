"""Batches that carry dataset indices: the base loader every dataset's training and
evaluation loaders build on, and what datasets share (their error, where their files are)."""
from __future__ import annotations

import os
from collections import deque
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch
from omegaconf import DictConfig

from adaptive_sparse.gating.gates import Selection
from adaptive_sparse.gating.sampler import EpochOrder, Look


class DatasetError(RuntimeError):
    """A dataset that cannot be found or read; the message names the key or file."""


def find_root(cfg: DictConfig) -> Path | None:
    """`dataset.root` if set, else the first existing entry of `dataset.search_roots`."""
    if cfg.get("root"):
        return Path(os.path.expanduser(str(cfg.root))).resolve()
    for candidate in cfg.get("search_roots") or []:
        path = Path(os.path.expanduser(str(candidate))).resolve()
        if path.exists():
            return path
    return None


class Batch(NamedTuple):
    """One loader batch: inputs [B, ...], targets [B] or [B, T], dataset indices [B], and the
    gate's selection when the gate selected it before loading (the batch then holds only the
    selected samples), else None."""
    inputs: torch.Tensor
    targets: torch.Tensor
    idx: torch.Tensor
    selection: Selection | None = None


class IndexedBatches:
    """Serves `Batch`es of a dataset of `num_samples` samples held on the device; subclasses
    say what a sample is (`fetch`).

    `start_epoch(epoch)` makes the epoch's draws and its order (`EpochOrder`: one permutation of
    `indices`, all samples unless given, a torchrun rank's slice when `shard` is given, at most
    `limit_batches` batches); `serve_selected(looks)` then replaces that order by a gate's
    selections from it, so skipped samples are never fetched. Iterating serves the epoch
    started (an iteration without one starts one: evaluation loaders). The order's generator is
    the state, and inside an epoch the batches not yet served, so a checkpoint resumes exactly.
    """

    # What the samples are, for a checkpoint to compare on resume: the dataset's fingerprint on a
    # training loader (plain values: `source`, where the data came from, and facts such as a
    # digest and sizes); None where unknown (an evaluation loader, a dataset built by hand).
    fingerprint: dict[str, Any] | None = None

    def __init__(self, num_samples: int, batch_size: int, device: torch.device, *, shuffle: bool,
                 limit_batches: int | None = None, seed: int = 0, indices: torch.Tensor | None = None,
                 shard: tuple[int, int] | None = None, drop_last: bool = False):
        self.num_samples = int(num_samples)
        self.batch_size, self.device = batch_size, device
        # under torchrun every rank draws the same permutation (same seed) and serves its own
        # slice, so every rank runs the same number of equal batches and the collectives line up
        self.order = EpochOrder(indices if indices is not None else torch.arange(self.num_samples), batch_size,
                                shuffle=shuffle, seed=seed, limit_batches=limit_batches, shard=shard,
                                drop_last=drop_last)
        self.generator = self.order.generator  # augmentation and text phases draw from the order's stream
        self.planned: deque | None = None     # the started epoch's batches (index tensors, or Looks)
        self.remaining: deque | None = None   # during an epoch: its batches not yet served
        if drop_last and self.order.samples_served < batch_size:  # airbench: 48 full batches of 1,024
            raise DatasetError(f"training.drop_last=true serves full batches only, and {self.order.samples_served} "
                               f"samples make no batch of training.batch_size={batch_size}")

    @property
    def limit_batches(self) -> int | None:
        return self.order.limit_batches

    @limit_batches.setter
    def limit_batches(self, value: int | None) -> None:
        self.order.limit_batches = value

    def __len__(self) -> int:
        return len(self.order)

    def start_epoch(self, epoch: int) -> None:
        """The epoch's draws (`epoch_draws`), then its order."""
        self.epoch_draws()
        self.planned = deque(self.order.index_batches())

    def epoch_draws(self) -> None:
        """Draws made once per epoch before its order (none here; text windows draw a phase)."""

    def index_batches(self) -> list[torch.Tensor]:
        """The started epoch's batches of dataset indices, each [B] (CPU)."""
        return list(self.planned)

    def serve_selected(self, looks: list[Look]) -> None:
        """Serve only what a gate selected from each batch of the started epoch's order."""
        self.planned = deque(looks)

    def fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Batch]:
        if self.planned is None:
            self.start_epoch(0)
        self.remaining, self.planned = self.planned, None
        while self.remaining:
            item = self.remaining.popleft()
            look = item if isinstance(item, Look) else None
            idx = (look.chosen if look else item).to(self.device)  # [B], or [k] selected before loading
            yield Batch(*self.fetch(idx), idx, look.served_selection(self.device) if look else None)
        self.remaining = None

    def state_dict(self) -> dict:
        """The order's generator; in the middle of an epoch also the batches it has yet to serve."""
        state = self.order.state_dict()
        if self.remaining:
            state["remaining"] = [item.state_dict() if isinstance(item, Look) else item.cpu()
                                  for item in self.remaining]
        return state

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)
        if "remaining" in state:  # resumed inside an epoch: the next iteration serves the rest of it
            self.planned = deque(Look.from_state(item, self.device) if isinstance(item, dict) else item
                                 for item in state["remaining"])
