"""The selecting sampler in a Lightning Trainer: one callback.

    pip install adaptive-sparse[lightning]

    from adaptive_sparse.integrations.lightning import SelectingSamplerCallback, gated

    class Model(L.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self.net(x)
            return gated(self, F.cross_entropy(logits, y, reduction="none"), logits)   # (1)

        def train_dataloader(self):
            return SelectingSamplerCallback.of(self.trainer).loader(train_set, num_workers=2)  # (2)

    gate = SundewGate(len(train_set), target_rate=0.5, scoring="memory")
    trainer = L.Trainer(callbacks=[SelectingSamplerCallback(gate, batch_size=64)],     # (3)
                        use_distributed_sampler=False)   # needed under DDP: the sampler shards itself

The callback builds the sampler when the trainer sets up (after DDP's process group exists, so the
sampler finds the ranks), serves the train loader through it, counts each epoch's global
activation rate (`callback.epochs`), and keeps the sampler's state in Lightning's checkpoints.

Epoch numbering: Lightning numbers epochs from 0 and calls `set_epoch` on a loader's sampler, but
not on a batch sampler, so the selecting sampler keeps its own 1-based count: each iteration is
the next epoch, and a checkpoint restores the count.

Lengths: Lightning reads the loader's length once per reload and ends the epoch after that many
batches; the callback reloads the train loader every epoch (`reload_dataloaders_every_n_epochs=1`)
and the sampler plans each epoch when its length is read, so every epoch's length is exact.
Schedules that count steps ahead (`trainer.estimated_stepping_batches`) see the first epoch's.
"""
from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from adaptive_sparse.gating.gates import Gate
from adaptive_sparse.integrations.common import PlannedSampler, checkpoint_state, epoch_record, refuse_mid_epoch

# What the sampler decides in the loader's place: passing one of these would fight it.
_SAMPLER_OWNS = ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last")


class SelectingSamplerCallback(pl.Callback):
    """Serves a LightningModule's training data through a `SelectingBatchSampler` over `gate`.

    `batch_size`, `shuffle`, `seed`, `pack`, `limit_batches` and `indices` are the sampler's
    arguments. `epochs` holds one record per trained epoch: epoch (1-based), samples_trained and
    samples_seen summed over ranks, and activation_rate, their ratio.
    """

    def __init__(self, gate: Gate, batch_size: int, *, shuffle: bool = True, seed: int = 0, pack: bool = True,
                 limit_batches: int | None = None, indices: torch.Tensor | None = None):
        if not gate.can_select_before_loading:
            raise ValueError(f"SelectingSamplerCallback: gate={type(gate).__name__} needs a scoring forward of each "
                             "loaded batch, so it cannot select before loading")
        self.gate = gate
        self.sampler_args = dict(batch_size=batch_size, shuffle=shuffle, seed=seed, pack=pack,
                                 limit_batches=limit_batches, indices=indices)
        self.sampler: PlannedSampler | None = None
        self.epochs: list[dict] = []
        self.trained = 0  # samples handed back this epoch, on this rank
        self._restored: dict | None = None  # a checkpoint's state, for the sampler not yet built

    @staticmethod
    def of(trainer: pl.Trainer) -> "SelectingSamplerCallback":
        """The trainer's SelectingSamplerCallback (ValueError when it has none)."""
        found = [c for c in trainer.callbacks if isinstance(c, SelectingSamplerCallback)]
        if len(found) != 1:
            raise ValueError(f"SelectingSamplerCallback.of: the trainer has {len(found)} SelectingSamplerCallbacks; "
                             "pass exactly one in Trainer(callbacks=[...])")
        return found[0]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.sampler is not None:
            return
        if trainer.world_size > 1 and getattr(trainer._accelerator_connector, "use_distributed_sampler", False):
            raise ValueError("SelectingSamplerCallback: use_distributed_sampler=True would wrap the selecting sampler "
                             "in a DistributedSampler; pass Trainer(use_distributed_sampler=False): it shards itself")
        # Built here, not in __init__: under DDP the process group exists only now, and the sampler
        # finds the ranks when it is built.
        self.sampler = PlannedSampler(self.gate, **self.sampler_args)
        if self._restored is not None:
            self.sampler.load_state_dict(self._restored)
            self._restored = None
        trainer.reload_dataloaders_every_n_epochs = 1  # so Lightning reads each epoch's exact length

    def loader(self, dataset: Dataset, **loader_args: Any) -> DataLoader:
        """A DataLoader over `dataset` whose batches the sampler picks; `loader_args` are the
        DataLoader's others (num_workers, collate_fn, pin_memory...). Call it in train_dataloader()."""
        if self.sampler is None:
            raise ValueError("SelectingSamplerCallback.loader: the trainer has not set up yet; call it in "
                             "train_dataloader(), with the callback in Trainer(callbacks=[...])")
        owned = sorted(set(loader_args) & set(_SAMPLER_OWNS))
        if owned:
            raise ValueError(f"SelectingSamplerCallback.loader: {owned[0]}= is the sampler's to decide; pass it to "
                             "SelectingSamplerCallback instead")
        return DataLoader(dataset, batch_sampler=self.sampler, **loader_args)

    def update(self, losses: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Hand back a training batch's per-sample losses [k] (and logits, for the entropy signal);
        returns the loss to backpropagate: the mean, or the gate's weighted loss (`sampler.update`)."""
        if self.sampler is None:
            raise ValueError("SelectingSamplerCallback.update: no sampler yet; call it from training_step")
        self.trained += len(losses)
        return self.sampler.update(losses, None if logits is None else logits.detach())

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.trained = 0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.sampler is None:
            return
        if not self.sampler.at_epoch_boundary:
            warnings.warn(f"SelectingSamplerCallback: epoch {self.sampler.served_epoch} ended with "
                          f"{self.sampler.updates_left} batches whose losses never came back: return "
                          "gated(self, losses) from training_step (and leave limit_train_batches at 1.0)",
                          stacklevel=2)
        self.epochs.append(epoch_record(self.sampler, self.trained))

    def state_dict(self) -> dict:
        """The sampler's state at an epoch boundary; inside an epoch only a marker, which a resume refuses."""
        if self.sampler is None:
            return {}
        return checkpoint_state(self.sampler,
                                lambda: {"sampler": self.sampler.state_dict(), "epochs": list(self.epochs)})

    def load_state_dict(self, state: dict) -> None:
        refuse_mid_epoch(state, "SelectingSamplerCallback: this checkpoint")
        if "sampler" not in state:
            return
        self.epochs = list(state["epochs"])
        if self.sampler is None:
            self._restored = state["sampler"]
        else:
            self.sampler.load_state_dict(state["sampler"])


def gated(module: pl.LightningModule, losses: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
    """In training_step: hand the batch's per-sample losses [k] back to the trainer's selecting
    sampler; returns the loss to return from training_step."""
    return SelectingSamplerCallback.of(module.trainer).update(losses, logits)
